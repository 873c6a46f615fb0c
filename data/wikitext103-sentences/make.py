"""Rebuild ``sentences.txt`` from the head of WikiText-103's tokenised training split (see README.md here).

    python data/wikitext103-sentences/make.py --raw FILE   # FILE: data/wiki.train.tokens of the GitHub
                                                           # repository Hongcheng-Gao/RobTest-Demo at 37688d9

The input is the first 2,883,584 bytes of WikiText-103's ``wiki.train.tokens``: it stops in the middle of a
paragraph, so its last, unterminated line is dropped. The rest goes through the same rules as the WikiText-2
corpus beside this folder (``data/wikitext2-sentences/make.py``: tokenisation undone, paragraphs split into
sentences, a sentence kept only when it has no ``<unk>`` and 8 to 60 words, repeats dropped). The input's
SHA-256 is checked first, so the output is the committed file byte for byte.
"""
import argparse
import hashlib
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RAW_SHA256 = "404a35153f7425a473fbca5cb6b5aa500a9dc8800dd0d28a6656c82436feaae5"


def _wikitext_rules():
    """The WikiText-2 corpus's make.py, whose detokeniser, splitter and filter this corpus shares."""
    path = os.path.join(os.path.dirname(HERE), "wikitext2-sentences", "make.py")
    spec = importlib.util.spec_from_file_location("wikitext2_make", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def complete_lines(text):
    """The lines of ``text`` that end in a newline, and the unterminated tail (``""`` when there is none)."""
    body, _, tail = text.rpartition("\n")
    return (body.split("\n") if body else []), tail


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", required=True, help="the head of WikiText-103's wiki.train.tokens (tokenised)")
    ap.add_argument("--out", default=os.path.join(HERE, "sentences.txt"))
    args = ap.parse_args(argv)
    try:
        with open(args.raw, "rb") as f:
            raw = f.read()
    except OSError as e:
        print(f"error: {args.raw}: {e.strerror}", file=sys.stderr)
        return 2
    digest = hashlib.sha256(raw).hexdigest()
    if digest != RAW_SHA256:
        print(f"error: {args.raw}: SHA-256 {digest} is not the pinned {RAW_SHA256}", file=sys.stderr)
        return 2
    lines, tail = complete_lines(raw.decode("utf-8"))
    out = list(_wikitext_rules().sentences(lines))
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(t + "\n" for t in out)
    print(f"{len(out)} sentences from {len(lines)} lines (the unterminated last line, {len(tail)} characters, "
          f"dropped) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
