"""MNTP alone against the causal model on every news pair of STS-B, not only the 500 of its test split.

    python benchmarks/results/quality-smollm2-135m-general/mntp-lr-mask/news_pairs.py --work WORK --out DIR \\
        --adapter g42=PATH [--adapter NAME=PATH ...] [--bidirectional]

The general recipe's first rows, (g) MNTP alone and (h) MNTP + SimCSE, never see STS-B: they train on WikiText-2
sentences and hand on their last adapter, chosen by nothing from STS-B. For them every news pair of STS-B is held
out, in train and dev as much as in test: 4,299 rows, 4,285 distinct pairs (MSRpar, headlines, deft-news). The
500 test pairs alone leave about 6 points either way on a difference to the causal model (``intervals.py``); about
nine times the pairs should narrow that to about a third. (Rows that train on STS-B, (i) and (k), cannot be scored
this way: their held-out column's training saw no news pair, but their dev choice and the in-domain column did.)

Writes ``WORK/news-all.csv`` (news rows of sts-test, sts-dev, sts-train in that order; a pair already seen, in
either order, is dropped and counted), scores the causal model and each ``--adapter`` on it through
``engine.evaluate --scores --bootstrap 2000 --compare``, and writes ``DIR/news-all.json``: each model's Spearman
and 95% interval, each adapter minus the causal model with its paired interval, and the same difference on each
split, source and length bin (engine.stats, from the kept cosines; groups of 100 pairs or more). The intervals
cover the pairs' sampling only, not a second training run's. ``--bidirectional`` also scores the base model with
bidirectional attention and no adapter (MNTP's step 0), as ``bidirectional``.
"""
import argparse
import datetime
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import quality_smollm2 as q  # noqa: E402
from engine.files import write_json  # noqa: E402
from benchmarks.common import git_commit, named_paths  # noqa: E402

N_BOOT = 2000
SPLITS = ("test", "dev", "train")  # the order the file keeps them in; a repeated pair keeps its first place


def news_rows(sts_dir):
    """(split, source, line) for every news row of STS-B (engine.data.sts_genre_lines, the held-out protocol's
    genre filter), a repeated pair (either order) dropped; and how many were dropped."""
    from engine.data import sts_genre_lines
    seen, rows, dropped = set(), [], 0
    for split in SPLITS:
        for line in sts_genre_lines(os.path.join(sts_dir, f"sts-{split}.csv"), ["news"]):
            parts = line.split("\t")
            key = frozenset((parts[5].strip(), parts[6].strip()))
            if key in seen:
                dropped += 1
                continue
            seen.add(key)
            rows.append((split, parts[1], line))
    return rows, dropped


WORDS = (0, 7, 9, 12, 20, 10**6)  # bins of a pair's length: the mean of its two sentences' word counts


def words_bin(a, b):
    n = (len(a.split()) + len(b.split())) / 2
    lo = max(x for x in WORDS if x <= n)
    hi = WORDS[WORDS.index(lo) + 1]
    return f"{lo}-{hi}" if hi < WORDS[-1] else f"{lo}+"


MIN_PAIRS = 100  # the smallest group the breakdown reports


def breakdown(rows, pairs, mine, base, gold):
    """The adapter minus the causal model, paired, on each split, each source, each length bin (``WORDS``) and
    each source's length bins; a group under ``MIN_PAIRS`` pairs is left out."""
    import numpy as np
    from engine.stats import paired_bootstrap
    mine, base, gold = np.asarray(mine), np.asarray(base), np.asarray(gold)
    keys = [(f"split={r[0]}", f"source={r[1]}", f"words={words_bin(p[0], p[1])}") for r, p in zip(rows, pairs)]
    keys = [(sp, so, w, f"{so},{w}") for sp, so, w in keys]
    out = {}
    for col in range(4):
        for value in sorted({k[col] for k in keys}):
            idx = np.array([i for i, k in enumerate(keys) if k[col] == value])
            if idx.size < MIN_PAIRS:
                continue
            d = paired_bootstrap(mine[idx], base[idx], gold[idx], n_boot=N_BOOT)
            out[value] = {k: d[k] for k in ("pairs", "difference", "ci", "share_at_or_below_0")}
    return out


def parse_adapters(specs, bidirectional=False):
    adapters = {"bidirectional": None} if bidirectional else {}
    adapters.update(named_paths(specs, "--adapter", os.path.isdir, "a folder", taken=("causal", "bidirectional")))
    if not adapters:
        raise ValueError("give at least one --adapter NAME=PATH or --bidirectional")
    return adapters


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="a folder for the news file, the cosines and the log")
    ap.add_argument("--out", required=True)
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--bidirectional", action="store_true", help="also the base model, bidirectional, no adapter")
    ap.add_argument("--sts-dir", default=os.path.join(ROOT, "data", "stsbenchmark"))
    args = ap.parse_args(argv)
    try:
        adapters = parse_adapters(args.adapter, args.bidirectional)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    missing = [s for s in SPLITS if not os.path.exists(os.path.join(args.sts_dir, f"sts-{s}.csv"))]
    if missing:
        print(f"error: {args.sts_dir} lacks sts-{missing[0]}.csv", file=sys.stderr)
        return 2
    from engine.data import DataError
    try:
        rows, dropped = news_rows(args.sts_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.join(args.work, "scores"), exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    data = os.path.join(args.work, "news-all.csv")
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(r[2] + "\n" for r in rows)
    counts = {f"{field}={v}": sum(1 for r in rows if r[col] == v)
              for field, col in (("split", 0), ("source", 1)) for v in sorted({r[col] for r in rows})}
    print(f"{len(rows)} news pairs ({dropped} repeated pairs dropped): {counts}", flush=True)
    res = {"date": datetime.date.today().isoformat(), "commit": git_commit(), "n_boot": N_BOOT, "level": 0.95,
           "pairs": len(rows), "repeated_pairs_dropped": dropped, "counts": counts, "adapters": {}}
    log = os.path.join(args.work, "news-all.log")
    boot = ["--bootstrap", str(N_BOOT)]
    base_scores = os.path.join(args.work, "scores", "causal-news-all.tsv")
    base = q.evaluate("smollm2-135m", data, log, causal=True, scores=base_scores, extra=boot)
    res["causal"] = {"spearman": base["spearman"], "ci": base["spearman_ci"]["ci"]}
    print("causal", json.dumps(res["causal"]), flush=True)
    from engine.data import read_sts
    from engine.evaluate import read_scores
    pairs = read_sts(data)
    gold = [p[2] for p in pairs]
    base_cos = read_scores(base_scores, pairs)
    for name, path in adapters.items():
        scores = os.path.join(args.work, "scores", f"{name}-news-all.tsv")
        mine = q.evaluate(path or "smollm2-135m", data, log, scores=scores, extra=[*boot, "--compare", base_scores])
        res["adapters"][name] = {
            "path": path and os.path.relpath(path, args.work),
            "spearman": mine["spearman"], "ci": mine["spearman_ci"]["ci"],
            "minus_causal": {k: mine["compare"][k] for k in ("difference", "ci", "share_at_or_below_0")},
            "minus_causal_by": breakdown(rows, pairs, read_scores(scores, pairs), base_cos, gold)}
        print(name, json.dumps(res["adapters"][name]), flush=True)
        write_json(os.path.join(args.out, "news-all.json"), res)  # after each model: a partial run keeps its rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
