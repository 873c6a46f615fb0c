"""Short, terse sentences for the general MNTP corpus: SNLI's hypotheses, one a line.

    python benchmarks/results/quality-smollm2-135m-general/mntp-lr-mask/short_text.py --out FILE

MNTP alone loses to the causal model on STS-B's headlines on every seed, and the loss does not follow length
inside that source (``news-all/``). Headlines are terse: 7.4 words on average, few articles. WikiText-2 has no such
text (8-60 words a sentence, median about 21). SNLI's hypotheses are the shortest general text the recipe ships:
crowd-written, 2-35 words (median 6-7), about photos, not news (``data/snli-triplets/``). This script writes them
as a corpus that MNTP can read beside WikiText-2, so a pilot can ask whether short sentences in training close the
headline gap without any news text entering the held-out protocol.

The rows of ``data/snli-triplets/triplets.jsonl`` are shuffled with ``--seed``. All entailed hypotheses come first,
then all contradicted ones in the same row order, so the two hypotheses of a row, which describe the same photo,
are as many lines apart as there are rows and never share a packed 64-token block (the rule of
``engine.data.split_pairs``). Premises are left out: they are captions of 13 words on median, not short text.
A hypothesis already written (exact text) is dropped and counted. Prints the counts and the file's SHA-256.
"""
import argparse
import hashlib
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
TRIPLETS = os.path.join(ROOT, "data", "snli-triplets", "triplets.jsonl")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from engine.files import atomic_open  # noqa: E402


def hypotheses(rows, seed):
    """(lines, repeats): the entailed hypotheses of the shuffled rows, then their contradicted ones, each text
    kept once (its first place)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    lines, seen, repeats = [], set(), 0
    for field in ("positive", "negative"):
        for i in order:
            text = " ".join(rows[i][field].split())
            if not text:
                continue
            if text in seen:
                repeats += 1
                continue
            seen.add(text)
            lines.append(text)
    return lines, repeats


def read_rows(path):
    """The triplet rows of a JSONL file; ValueError naming the line for one that is not JSON or lacks a field."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                row["positive"], row["negative"]  # noqa: B018 (both fields must be there)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a triplet row ({type(e).__name__}: {e})") from None
            rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the corpus file to write (one sentence a line)")
    ap.add_argument("--triplets", default=TRIPLETS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not os.path.isfile(args.triplets):
        print(f"short_text.py: no triplets file at {args.triplets}", file=sys.stderr)
        return 2
    try:
        rows = read_rows(args.triplets)
    except ValueError as e:
        print(f"short_text.py: {e}", file=sys.stderr)
        return 2
    lines, repeats = hypotheses(rows, args.seed)
    data = "".join(t + "\n" for t in lines).encode("utf-8")
    with atomic_open(args.out, "wb") as f:
        f.write(data)
    words = sorted(len(t.split()) for t in lines)
    print(f"{len(rows)} rows -> {len(lines)} hypotheses ({repeats} repeats dropped); words {words[0]}-{words[-1]}, "
          f"median {words[len(words) // 2]}; sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
