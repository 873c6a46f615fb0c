"""Training-genre dev Spearman of MNTP adapters: would a labelled dev file of the training genres choose the seed?

    python benchmarks/results/quality-smollm2-135m-general/mntp-lr-mask/seed_dev.py --dev WORK/holdout/sts-dev.csv \\
        --out FILE --adapter NAME=PATH [--adapter NAME=PATH ...]

Scores each adapter (mean pooling, engine.evaluate) on ``--dev``: the held-out protocol's dev file, STS-B dev's
captions and forums pairs (1,000, no news pair), which ``benchmarks/mntp_curve.py`` writes to ``WORK/holdout/``.
Held-out news stays unseen, so this is a selector the protocol allows, unlike all-genre dev. Writes ``FILE`` (JSON):
each adapter's Spearman x100, with the date and commit.
"""
import argparse
import datetime
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import quality_smollm2 as q  # noqa: E402
from benchmarks.common import git_commit, named_paths, write_json  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dev", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--adapter", action="append", required=True, help="NAME=PATH of an adapter folder")
    args = ap.parse_args(argv)
    try:
        adapters = named_paths(args.adapter, "--adapter", os.path.isdir, "an adapter folder")
    except ValueError as e:
        print(f"seed_dev.py: {e}", file=sys.stderr)
        return 2
    if not os.path.isfile(args.dev):
        print(f"seed_dev.py: no dev file at {args.dev}", file=sys.stderr)
        return 2
    from engine.data import read_sts

    out = {"what": "Spearman x100 on the held-out protocol's dev file (STS-B dev, captions and forums), mean pooling",
           "date": datetime.date.today().isoformat(), "commit": git_commit(), "dev_pairs": len(read_sts(args.dev)),
           "adapters": {}}
    log = args.out + ".log"
    for name, path in adapters.items():
        out["adapters"][name] = round(q.evaluate(path, args.dev, log)["spearman"], 2)
        print(name, out["adapters"][name], flush=True)
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
