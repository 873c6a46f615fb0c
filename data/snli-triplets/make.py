"""Rebuild ``triplets.jsonl`` from SNLI's validation and test pairs, as e-SNLI ships them (see README.md here).

    python data/snli-triplets/make.py --raw DIR   # DIR holds s1.dev, s2.dev, labels.dev, s1.test, s2.test,
                                                  # labels.test, as in OanaMariaCamburu/e-SNLI's dataset/eSNLI

Each SNLI premise comes with hypotheses labelled entailment, neutral and contradiction. A premise becomes one
supervised row ``{"query": premise, "positive": entailment, "negative": contradiction}`` (its first hypothesis of
each label, in file order); premises lacking either label are skipped. The text ships tokenised (PTB style:
`` `` `` and ``''`` quotes, ``n't`` and ``'s`` split off, spaces before punctuation); the tokenisation is undone.
Rows that share a sentence with any STS Benchmark split (compared lower-cased, on letters and digits only) are
dropped, so a model trained on them has seen no STS-B text. The raw files' SHA-256 are checked first, so the
output is the committed file byte for byte; the counts of every step are printed.
"""
import argparse
import csv
import hashlib
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
STS = os.path.join(os.path.dirname(HERE), "stsbenchmark")
RAW = {"s1.dev": "28a398b5478b10b4b851d4bb5b2e5767171519add6586015ed50b9436df11d00",
       "s2.dev": "a8c59709630b64ba103f7784c0cb7104a6baf23234562487264d9634714f5d2b",
       "labels.dev": "d164d72435c3289fe53cb01e983f7c06e104bf192c0cae9caf2e99bf2e15f974",
       "s1.test": "62cb8107dc3c56a4376e5e521842be24e0d61c92c346b94917da2bbf2a47d8be",
       "s2.test": "1174f3ad30a3c30fc0f9eeffc1b3b6a79e0514026c5a658968a8e2a324b311a1",
       "labels.test": "e25c363e5cc70d5494d6e6555d8053eced22dca836e0f03067530eaad3d4f5f5"}
SPLITS = ("dev", "test")


def detokenise(s):
    """PTB-tokenised text back to ordinary spacing: ``a `` big '' dog , it 's n't ( red ) .`` ->
    ``a "big" dog, it'sn't (red).``"""
    s = re.sub(r"``\s*", ' "', s)
    s = re.sub(r"\s*''", '" ', s)
    s = re.sub(r" ([.,;:!?%)\]}])", r"\1", s)
    s = re.sub(r"([(\[{$]) ", r"\1", s)
    s = re.sub(r" (n't|'s|'re|'ve|'m|'ll|'d)\b", r"\1", s, flags=re.IGNORECASE)
    s = re.sub(r'" ([.,;:!?])', r'"\1', s)
    return re.sub(r"\s+", " ", s).strip()


def normalise(s):
    """The key two sentences are compared by: lower case, letters and digits only, single spaces."""
    return " ".join(re.findall(r"[a-z0-9]+", s.lower()))


def triplets(premises, hypotheses, labels):
    """One (premise, entailment, contradiction) per premise, in the order premises first appear; with the number
    of premises skipped for lacking a label."""
    groups = {}
    for p, h, lab in zip(premises, hypotheses, labels):
        groups.setdefault(p, {}).setdefault(lab, h)
    out, skipped = [], 0
    for p, by_label in groups.items():
        if "entailment" in by_label and "contradiction" in by_label:
            out.append((p, by_label["entailment"], by_label["contradiction"]))
        else:
            skipped += 1
    return out, skipped


def sts_sentences(folder=STS):
    """Normalised sentences of every STS-B split (sentence1 and sentence2: the last two tab-separated fields)."""
    seen = set()
    for split in ("train", "dev", "test"):
        with open(os.path.join(folder, f"sts-{split}.csv"), encoding="utf-8") as f:
            for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                if len(row) >= 7:
                    seen.update(normalise(x) for x in row[5:7])
    return seen


def build(raw, sts=None):
    """The rows and the counts of every step, from ``raw[name]`` = the lines of each RAW file."""
    sts = sts_sentences() if sts is None else sts
    counts, rows, keys = {}, [], set()
    for split in SPLITS:
        s1, s2, lab = (raw[f"{n}.{split}"] for n in ("s1", "s2", "labels"))
        if not len(s1) == len(s2) == len(lab):
            raise ValueError(f"{split}: s1, s2 and labels have {len(s1)}, {len(s2)} and {len(lab)} lines")
        trip, skipped = triplets([detokenise(x) for x in s1], [detokenise(x) for x in s2], [x.strip() for x in lab])
        counts[f"{split}_pairs"], counts[f"{split}_premises_without_both_labels"] = len(s1), skipped
        for t in trip:
            key = tuple(normalise(x) for x in t)
            if any(k in sts for k in key):
                counts["dropped_sharing_a_sentence_with_sts_b"] = counts.get("dropped_sharing_a_sentence_with_sts_b", 0) + 1
            elif key in keys:
                counts["dropped_repeats"] = counts.get("dropped_repeats", 0) + 1
            else:
                keys.add(key)
                rows.append({"query": t[0], "positive": t[1], "negative": t[2]})
    counts["rows"] = len(rows)
    return rows, counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", required=True, help="folder with e-SNLI's s1/s2/labels .dev and .test files")
    ap.add_argument("--out", default=os.path.join(HERE, "triplets.jsonl"))
    args = ap.parse_args(argv)
    raw = {}
    for name, digest in RAW.items():
        path = os.path.join(args.raw, name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            print(f"error: {path}: {e.strerror}", file=sys.stderr)
            return 2
        if hashlib.sha256(data).hexdigest() != digest:
            print(f"error: {path}: SHA-256 {hashlib.sha256(data).hexdigest()} is not the pinned {digest}", file=sys.stderr)
            return 2
        raw[name] = data.decode("utf-8").splitlines()
    rows, counts = build(raw)
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(", ".join(f"{k} {v:,}" for k, v in counts.items()) + f" -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
