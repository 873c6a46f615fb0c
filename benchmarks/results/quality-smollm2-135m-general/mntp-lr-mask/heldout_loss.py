"""Held-out MNTP loss of finished MNTP runs, all read on the same sentences.

    python benchmarks/results/quality-smollm2-135m-general/mntp-lr-mask/heldout_loss.py --out FILE \\
        --run NAME=RUN_DIR [--run NAME=RUN_DIR ...]

Until engine.stages.base.EVAL_SEED, the trainer split an STS-style ``eval_data`` file into sentences in the run
seed's order and read its first ``eval_batches`` micro-batches. Runs with other seeds were therefore scored on other
samples of STS-B dev (80 of its 64-token blocks each), and the seed ranking by held-out loss in this folder's
README rests on those readings. This script reads each run's last adapter again on one text for all:

- ``first``: the first ``eval_batches`` micro-batches in EVAL_SEED's order, what a run now logs;
- ``all``: every block of the file in that order, the whole of STS-B dev's sentences.

Each run's own config (RUN_DIR/config.yaml) builds the model: its adapter merged into the base (W += alpha/r B A),
bidirectional, the MNTP head, eval mode, the engine's masking with the evaluation's fixed generator. Writes
``FILE`` (JSON): per run, both losses and the number of blocks read.
"""
import argparse
import datetime
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def run_loss(run_dir, eval_data=None):
    """{first, all, blocks_first, blocks_all, eval_data} of one MNTP run folder's last adapter."""
    import torch

    from engine.config import load_config
    from engine.modeling import load_model, load_tokenizer
    from engine.stages import build_stage
    from engine.stages.base import EVAL_SEED, held_out_mean
    from engine.trainer import EngineModule

    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    if cfg.stage != "mntp":
        raise ValueError(f"{run_dir} is a {cfg.stage} run, not MNTP")
    cfg.model.adapters = list(cfg.model.adapters) + [os.path.join(run_dir, "adapter")]
    eval_data = [eval_data] if eval_data else cfg.eval_data
    tok = load_tokenizer(cfg.model)
    stage = build_stage(cfg, tok)
    items, _, _ = stage.load(eval_data, seed=EVAL_SEED)
    model, _ = load_model(cfg.model, "cpu", tok)
    module = EngineModule(stage.prepare_model(model), stage).eval()
    mb = cfg.micro_batch_size
    # One pass over every block: the evaluation draws each batch's masks in turn from one generator, so its first
    # eval_batches losses are what a run logs (Stage.evaluate reads those batches alone).
    with torch.no_grad():
        losses = stage.batch_losses(module, items, max(cfg.eval_batches, len(items) // mb), units=True)
    first = losses[:cfg.eval_batches]
    # Stage.evaluate's arithmetic: the mean over every masked token since 2026-12-06 (the JSON files committed here
    # before then hold means of the batch means)
    return {"first": held_out_mean(first), "all": held_out_mean(losses), "blocks_first": len(first) * mb,
            "blocks_all": len(losses) * mb, "eval_data": eval_data}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--run", action="append", required=True, help="NAME=RUN_DIR of a finished MNTP run")
    ap.add_argument("--eval-data", help="another held-out file than the runs' own eval_data")
    args = ap.parse_args(argv)
    from benchmarks.common import git_commit, named_paths, write_json

    try:
        runs = named_paths(args.run, "--run", lambda p: os.path.isdir(os.path.join(p, "adapter")),
                           "a finished run's folder (with adapter/)")
    except ValueError as e:
        print(f"heldout_loss.py: {e}", file=sys.stderr)
        return 2

    res = {"date": datetime.date.today().isoformat(), "commit": git_commit(), "runs": {}}
    for name, path in runs.items():
        res["runs"][name] = {"path": path, **run_loss(path, args.eval_data)}
        r = res["runs"][name]
        print(f"{name}: first {r['blocks_first']} blocks {r['first']:.4f}; all {r['blocks_all']} blocks {r['all']:.4f}",
              flush=True)
    write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
