"""Row (h) again on another general MNTP adapter: general-simcse.yaml unchanged (125 steps, last adapter handed on)
on top of the MNTP adapter that a benchmarks/mntp_curve.py run left, then scored on all of STS-B test and on its
news pairs. Writes ``<OUT>/simcse.json``.

    python benchmarks/results/quality-smollm2-135m-general/mntp-lr-mask/simcse_on.py \\
        --mntp-work WORK --out benchmarks/results/quality-smollm2-135m-general/mntp-lr-mask/seed1

WORK is the ``--work`` folder that mntp_curve.py was given (it holds run/adapter, the interleaved dev file and
holdout/sts-test.csv). Run from the repository root, alone on the machine. A WORK without those is one line on
stderr and exit 2.
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
from benchmarks.common import git_commit  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mntp-work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args(argv)
    mntp = os.path.join(args.mntp_work, "run", "adapter")
    dev = os.path.join(args.mntp_work, "sts-dev-interleaved.csv")
    news = os.path.join(args.mntp_work, "holdout", "sts-test.csv")
    for path in (os.path.join(mntp, "adapter_config.json"), dev, news):
        if not os.path.isfile(path):
            print(f"error: {path}: missing; give the --work folder of a mntp_curve.py run", file=sys.stderr)
            return 2
    from engine.distributed import free_port

    os.makedirs(args.out, exist_ok=True)
    run = os.path.join(args.mntp_work, "simcse")
    log = os.path.join(args.mntp_work, "simcse.log")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.nproc), "--master_port",
           str(free_port()), "engine/train.py", "--config", "configs/smollm2-135m/general-simcse.yaml",
           f"model.adapters=[{mntp}]", f"eval_data={dev}", f"output_dir={run}", "progress_bar=false",
           "model.gradient_checkpointing=false"]
    train_s = q.sh(cmd, log)
    adapter = os.path.join(run, "adapter")
    scores = {name: q.evaluate(adapter, path, log) for name, path in
              (("test", os.path.join(q.STS, "sts-test.csv")), ("news", news))}
    commit = git_commit()
    out = {"date": datetime.date.today().isoformat(), "commit": commit, "train_seconds": round(train_s, 1),
           "mntp_adapter": os.path.relpath(mntp, ROOT), "simcse": "configs/smollm2-135m/general-simcse.yaml, last adapter",
           "test_spearman": round(scores["test"]["spearman"], 2), "test_pairs": scores["test"]["pairs"],
           "news_spearman": round(scores["news"]["spearman"], 2), "news_pairs": scores["news"]["pairs"]}
    with open(os.path.join(args.out, "simcse.json"), "w") as f:
        json.dump(out, f, indent=2)
    shutil.copy(os.path.join(run, "metrics.csv"), os.path.join(args.out, "simcse_metrics.csv"))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
