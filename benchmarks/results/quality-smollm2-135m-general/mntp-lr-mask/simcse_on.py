"""Row (h) again on another general MNTP adapter: general-simcse.yaml unchanged (125 steps, last adapter handed on)
on top of the MNTP adapter that a benchmarks/mntp_curve.py run left, then scored on all of STS-B test and on its
news pairs. Writes ``<OUT>/simcse.json``.

    python benchmarks/results/quality-smollm2-135m-general/mntp-lr-mask/simcse_on.py \\
        --mntp-work WORK --out benchmarks/results/quality-smollm2-135m-general/mntp-lr-mask/seed1

WORK is the ``--work`` folder that mntp_curve.py was given (it holds run/adapter, the interleaved dev file and
holdout/sts-test.csv). Run from the repository root, alone on the machine. A WORK without those is one line on
stderr and exit 2.

``--no-mntp``: the control. The same SimCSE stage on the bidirectional model with no MNTP adapter (WORK gives
only the dev and news files); the run goes to ``WORK/simcse-no-mntp`` and ``mntp_adapter`` is null.
"""
import argparse
import datetime
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
sys.path.insert(0, ROOT)

from benchmarks import quality_smollm2 as q  # noqa: E402
from engine.files import write_json  # noqa: E402
from benchmarks.common import git_commit  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mntp-work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--no-mntp", action="store_true", help="SimCSE on the bidirectional model without MNTP")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for the stage")
    args = ap.parse_args(argv)
    mntp = None if args.no_mntp else os.path.join(args.mntp_work, "run", "adapter")
    dev = os.path.join(args.mntp_work, "sts-dev-interleaved.csv")
    news = os.path.join(args.mntp_work, "holdout", "sts-test.csv")
    needed = (dev, news) if mntp is None else (os.path.join(mntp, "adapter_config.json"), dev, news)
    for path in needed:
        if not os.path.isfile(path):
            print(f"error: {path}: missing; give the --work folder of a mntp_curve.py run", file=sys.stderr)
            return 2
    from engine.distributed import free_port

    os.makedirs(args.out, exist_ok=True)
    name = "simcse" if mntp is not None else "simcse-no-mntp"
    run = os.path.join(args.mntp_work, name)
    log = os.path.join(args.mntp_work, name + ".log")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.nproc), "--master_port",
           str(free_port()), "engine/train.py", "--config", "configs/smollm2-135m/general-simcse.yaml",
           f"model.adapters=[{mntp if mntp is not None else ''}]", f"eval_data={dev}", f"output_dir={run}",
           "progress_bar=false", "model.gradient_checkpointing=false", *args.set]
    train_s = q.sh(cmd, log)
    adapter = os.path.join(run, "adapter")
    scores = {name: q.evaluate(adapter, path, log) for name, path in
              (("test", os.path.join(q.STS, "sts-test.csv")), ("news", news))}
    commit = git_commit()
    out = {"date": datetime.date.today().isoformat(), "commit": commit, "train_seconds": round(train_s, 1),
           "mntp_adapter": None if mntp is None else os.path.relpath(mntp, ROOT),
           "simcse": "configs/smollm2-135m/general-simcse.yaml, last adapter", "overrides": args.set,
           "test_spearman": round(scores["test"]["spearman"], 2), "test_pairs": scores["test"]["pairs"],
           "news_spearman": round(scores["news"]["spearman"], 2), "news_pairs": scores["news"]["pairs"]}
    write_json(os.path.join(args.out, "simcse.json"), out)  # atomic: a reader never sees half a file
    shutil.copy(os.path.join(run, "metrics.csv"), os.path.join(args.out, "simcse_metrics.csv"))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
