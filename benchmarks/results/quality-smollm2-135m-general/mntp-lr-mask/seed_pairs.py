"""Seed against seed on the same pairs: is one MNTP seed's news score really above another's?

    python benchmarks/results/quality-smollm2-135m-general/mntp-lr-mask/seed_pairs.py --out FILE --data CSV \\
        --scores NAME=TSV [--scores NAME=TSV ...] --pair A-B [--pair A-B ...]

Each TSV is an ``engine.evaluate --scores`` file (pair, gold, cosine) that ``news_pairs.py`` keeps in its work
folder (``WORK/scores/NAME-news-all.tsv``), made on ``CSV`` (``WORK/news-all.csv``). Every file is read by
``engine.evaluate.read_scores``, which checks its count, pair numbers and gold scores against ``CSV``'s pairs, as
``engine.evaluate --compare`` does. For each ``A-B`` it writes A's Spearman minus B's with the paired 95% bootstrap
interval over the pairs (engine.stats.paired_bootstrap, 2,000 resamples, seed 0). The interval covers the pairs'
sampling, not a second training run's.
"""
import argparse
import datetime
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

N_BOOT = 2000


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", required=True, help="the STS-style pairs file every scores file was made on")
    ap.add_argument("--scores", action="append", required=True, help="NAME=TSV of engine.evaluate --scores")
    ap.add_argument("--pair", action="append", required=True, help="A-B: A's Spearman minus B's")
    args = ap.parse_args(argv)
    import numpy as np

    from benchmarks.common import git_commit, named_paths, write_json
    from engine.data import read_sts
    from engine.evaluate import read_scores
    from engine.stats import paired_bootstrap

    try:
        files = named_paths(args.scores, "--scores", os.path.isfile, "a scores file")
        pairs = [p.split("-") for p in args.pair]
        for p, spec in zip(pairs, args.pair):
            if len(p) != 2 or not set(p) <= set(files):
                raise ValueError(f"--pair {spec!r} is not A-B of two --scores names")
        data = read_sts(args.data)
        scores = {name: np.array(read_scores(path, data)) for name, path in files.items()}
    except (ValueError, OSError) as e:  # engine.data.DataError is a ValueError
        print(f"seed_pairs.py: {e}", file=sys.stderr)
        return 2
    gold = np.array([p[2] for p in data])
    out = {"date": datetime.date.today().isoformat(), "commit": git_commit(), "pairs": len(gold), "n_boot": N_BOOT,
           "differences": {}}
    for a, b in pairs:
        r = paired_bootstrap(scores[a], scores[b], gold, N_BOOT)
        out["differences"][f"{a}-{b}"] = r
        print(f"{a} - {b}: {r['difference']:+.2f} [{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}]")
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
