"""An MNTP stage's curve on STS-B test, for diagnosis (issue 27 item 3): what MNTP alone does to the mean-pooled
encoder step by step, on all of STS-B test and on one held-out genre.

    python benchmarks/mntp_curve.py --config general-mntp --steps 300 --every 50 \\
        --out benchmarks/results/quality-smollm2-135m-general/mntp-curve

trains ``configs/smollm2-135m/<config>.yaml`` for ``--steps`` steps on 2 ranks, keeping an adapter every
``--every`` steps (``save_every``), then scores each kept adapter, the bidirectional untrained model (step 0) and
the causal model on STS-B test (all pairs) and on its ``--holdout-genre`` pairs. ``--train-without-holdout``
trains on STS-B train less that genre (the held-out protocol's MNTP data) instead of the config's corpus. Writes
``curve.csv`` (step, MNTP loss on the dev sentences, dev Spearman, test Spearman, held-out Spearman) and
``curve.json`` (``genre_in_training``: whether the stage's data held the scored genre, as ``--config mntp``'s
STS-B train does unless ``--train-without-holdout``). A --work an earlier run used is refused (its run would
resume its finished checkpoint rather than train). The test figures are a diagnosis: no budget or adapter is chosen by them (the quality table
chooses on dev, see quality_smollm2.py).
"""
import argparse
import csv
import datetime
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import quality_smollm2 as q  # noqa: E402
from benchmarks.common import git_commit, parser  # noqa: E402
from engine.cli import positive_int  # noqa: E402
from engine.distributed import free_port  # noqa: E402
from engine.files import write_json  # noqa: E402


def _curve(metrics):
    """{step: (eval_loss, eval_sts_spearman)} from a run's metrics.csv."""
    with open(metrics) as f:
        return {int(r["step"]): (float(r["eval_loss"]), float(r["eval_sts_spearman"] or "nan"))
                for r in csv.DictReader(f) if r.get("eval_loss")}


def main(argv=None):
    ap = parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="general-mntp", choices=[c for c in q.CONFIGS if "mntp" in c])
    ap.add_argument("--steps", type=positive_int, default=300)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--holdout-genre", choices=q.GENRES, default="news")
    ap.add_argument("--train-without-holdout", action="store_true",
                    help="train on STS-B train without the held-out genre, not on the config's corpus")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for the stage")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=os.path.join(ROOT, "outputs", "mntp-curve"))
    args = ap.parse_args(argv)
    if args.steps <= 0 or args.every <= 0 or args.steps % args.every:
        ap.error(f"--steps {args.steps} must be a positive multiple of --every {args.every}")
    log = q.fresh_work(args.work)
    os.makedirs(args.out, exist_ok=True)
    sts = {k: os.path.join(q.STS, f"sts-{k}.csv") for k in ("train", "dev", "test")}
    held = q.holdout_files(args.holdout_genre, sts["train"], sts["dev"], sts["test"], os.path.join(args.work, "holdout"))
    dev = q.interleaved_dev(sts["dev"], args.work)
    # selection-free: the dev file feeds the logged curve only; the held-out protocol's dev when training on it
    eval_data = held["dev"] if args.train_without_holdout else dev
    port = free_port()
    run = os.path.join(args.work, "run")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.nproc), "--master_port", str(port),
           "engine/train.py", "--config", f"configs/smollm2-135m/{args.config}.yaml", f"eval_data={eval_data}",
           f"output_dir={run}", "progress_bar=false", f"max_steps={args.steps}", f"eval_every={args.every}",
           f"save_every={args.every}", "keep_checkpoints=0", *([f"data={held['train']}"] if args.train_without_holdout else []),
           *args.set]
    t0 = time.time()
    try:
        train_s = q.sh(cmd, log)
    except q.RowFailed as e:
        raise SystemExit(f"training failed: {e}") from None
    curve = _curve(os.path.join(run, "metrics.csv"))
    tests = {"test": sts["test"], args.holdout_genre: held["test"]}
    rows = []
    models = [("causal", "smollm2-135m", True), (0, "smollm2-135m", False)] + [
        (s, os.path.join(run, "checkpoints", f"step_{s:07d}", "adapter"), False)
        for s in range(args.every, args.steps + 1, args.every)]
    for step, model, causal in models:
        loss, dev_spearman = curve.get(step, ("", ""))  # no MNTP eval for the causal model and step 0
        row = {"step": step, "eval_loss": loss, "dev_spearman": dev_spearman}
        for name, path in tests.items():
            try:
                row[f"{name}_spearman"] = round(q.evaluate(model, path, log, causal=causal)["spearman"], 2)
            except q.RowFailed as e:
                raise SystemExit(f"step {step}: {e}") from None
        rows.append(row)
        print(row, flush=True)
    with open(os.path.join(args.out, "curve.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    commit = git_commit()
    write_json(os.path.join(args.out, "curve.json"), {
        "date": datetime.date.today().isoformat(), "commit": commit, "config": args.config,
        "train": "sts-train without " + args.holdout_genre if args.train_without_holdout else "config",
        "genre_in_training": args.config == "mntp" and not args.train_without_holdout,
        "steps": args.steps, "every": args.every, "nproc": args.nproc, "overrides": args.set,
        "train_seconds": round(train_s, 1), "wall_seconds": round(time.time() - t0, 1),
        "eval_data": os.path.relpath(eval_data, ROOT), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
