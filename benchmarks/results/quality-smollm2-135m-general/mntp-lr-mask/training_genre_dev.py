"""Writes training-genre-dev.json beside this file: the adapters of this folder's 20% (lr1e-3) and 80% (mask0.8-all)
pilot runs scored on the captions and forums pairs of STS-B dev only (the held-out protocol's dev file, 1,000
pairs, no news pair), the signal that chose the mask rate.

    python benchmarks/results/quality-smollm2-135m-general/mntp-lr-mask/training_genre_dev.py \\
        --lr-work WORK_OF_THE_LR1E-3_RUN --mask-work WORK_OF_THE_MASK0.8_RUN

Each WORK is the ``--work`` folder that benchmarks/mntp_curve.py was given for that run (it holds run/checkpoints
and holdout/sts-dev.csv). Run from the repository root, alone on the machine.
"""
import argparse
import datetime
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
sys.path.insert(0, ROOT)

from benchmarks import quality_smollm2 as q  # noqa: E402
from engine.files import write_json  # noqa: E402
from benchmarks.common import git_commit  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lr-work", required=True)
    ap.add_argument("--mask-work", required=True)
    args = ap.parse_args(argv)
    dev = os.path.join(args.lr_work, "holdout", "sts-dev.csv")
    runs = {"mask0.2_bert_lr1e-3": (args.lr_work, (50, 100, 150)), "mask0.8_all_lr1e-3": (args.mask_work, (100, 150))}
    for work, steps in runs.values():
        for s in steps:
            if not os.path.isdir(os.path.join(work, "run", "checkpoints", f"step_{s:07d}", "adapter")):
                ap.error(f"{work}: no adapter at step {s}; give the --work folder of a mntp_curve.py run")
    if not os.path.isfile(dev):
        ap.error(f"{dev}: missing; give the --work folder of a mntp_curve.py run")
    commit = git_commit()
    out = {"what": "STS-B dev Spearman x100 on the training genres only (captions and forums, 1000 pairs), mean "
                   "pooling, engine.evaluate; the held-out protocol's dev file",
           "date": datetime.date.today().isoformat(), "commit": commit}
    log = os.path.join(args.lr_work, "training-genre-dev.log")
    for name, (work, steps) in runs.items():
        adapter = os.path.join(work, "run", "checkpoints", "step_{:07d}", "adapter")
        out[name] = {str(s): round(q.evaluate(adapter.format(s), dev, log)["spearman"], 2) for s in steps}
    write_json(os.path.join(HERE, "training-genre-dev.json"), out)  # atomic: a reader never sees half a file
    return 0


if __name__ == "__main__":
    sys.exit(main())
