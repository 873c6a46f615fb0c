"""Writes same-pairs.json beside this file: the committed general table's adapters, both columns, scored on the
same test pairs split by genre. So the held-out column's gap can be read on equal pairs (issue 27 item 1).

    python benchmarks/results/quality-smollm2-135m-general/same_pairs.py --work outputs/quality-general2

WORK is the ``--work`` folder of the quality_smollm2.py run that wrote results.json here; results.json names the
adapters each row used. Rows (g), (h) and (j) never see STS-B, so one adapter serves both columns. (i) and (k)
have an in-domain adapter (graded on all three genres) and a held-out one (graded without news). Each adapter is
scored with engine.evaluate on STS-B test's news pairs and on its other genres' pairs. The held-out adapters'
news figures must reproduce results.json's held-out column to the last digit; the script stops if they do not.
Run from the repository root, alone on the machine. A WORK that lacks an adapter, or whose adapters do not
reproduce results.json, is one line on stderr and exit 2.
"""
import argparse
import datetime
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, ROOT)

from benchmarks import quality_smollm2 as q  # noqa: E402
from engine.files import write_json  # noqa: E402
from benchmarks.common import git_commit  # noqa: E402
from engine.data import sts_genre_lines  # noqa: E402

STAGE_DIRS = {"g": "general-mntp/adapter", "h": "general-simcse/adapter", "j": "general-supervised/adapter"}
GRADED = {"i": "general-graded", "k": "general-nli-graded"}


def adapters(work, results):
    """{(row, column): adapter path} for the rows of ``results`` (results.json), as that run used them."""
    held = results["holdout"]
    genre = held["genre"]
    out = {("a", c): None for c in ("in-domain", f"holdout-{genre}")}
    for row, sub in STAGE_DIRS.items():
        for c in ("in-domain", f"holdout-{genre}"):
            out[(row, c)] = os.path.join(work, sub)
    for row, stage in GRADED.items():
        out[(row, "in-domain")] = os.path.join(work, stage, results["selected"][stage]["adapter"])
        out[(row, f"holdout-{genre}")] = os.path.join(work, f"holdout-{genre}", stage, held["selected"][stage]["adapter"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="the quality_smollm2.py --work folder of results.json's run")
    ap.add_argument("--results", default=os.path.join(HERE, "results.json"))
    ap.add_argument("--out", default=os.path.join(HERE, "same-pairs.json"))
    args = ap.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    genre = results["holdout"]["genre"]
    others = [g for g in q.GENRES if g != genre]
    paths = adapters(args.work, results)
    for p in paths.values():
        if p is not None and not os.path.isdir(p):
            print(f"error: {p}: no adapter; give the --work folder of the run that wrote {args.results}",
                  file=sys.stderr)
            return 2
    test = os.path.join(q.STS, "sts-test.csv")
    subsets = {genre: sts_genre_lines(test, [genre]), "+".join(others): sts_genre_lines(test, others)}
    files = {}
    for name, lines in subsets.items():
        files[name] = q._write(os.path.join(args.work, f"same-pairs-test-{name}.csv"), lines)
    log = os.path.join(args.work, "same-pairs.log")
    commit = git_commit()
    out = {"what": "STS-B test Spearman x100 by genre, mean pooling, engine.evaluate, for the adapters of "
                   "results.json's two columns (in-domain: every stage trained on all genres; holdout: without "
                   f"{genre})",
           "date": datetime.date.today().isoformat(), "commit": commit,
           "pairs": {name: len(lines) for name, lines in subsets.items()}, "rows": {}}
    done = {}
    for (row, col), path in paths.items():
        cell = out["rows"].setdefault(row, {}).setdefault(col, {})
        for name, f in files.items():
            key = (path, name)
            if key not in done:  # (a), (g), (h) and (j) use one model for both columns
                r = q.evaluate("smollm2-135m", f, log, causal=True) if path is None else q.evaluate(path, f, log)
                done[key] = round(r["spearman"], 2)
            cell[name] = done[key]
        if col != "in-domain":
            want = round(results["holdout"]["rows"][row]["spearman"], 2)
            if cell[genre] != want:
                print(f"error: row ({row}) held out scores {cell[genre]} on {genre}, not {want} as in {args.results}: "
                      f"{args.work} is not the run that wrote it", file=sys.stderr)
                return 2
    write_json(args.out, out)  # atomic: a reader never sees half a file
    return 0


if __name__ == "__main__":
    sys.exit(main())
