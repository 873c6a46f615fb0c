"""Rebuild ``sentences.txt`` from WikiText-2's tokenised validation and test files (see README.md here).

    python data/wikitext2-sentences/make.py --raw DIR   # DIR holds valid.txt and test.txt, as in
                                                        # pytorch/examples' word_language_model/data/wikitext-2

WikiText ships tokenised: spaces around punctuation, ``@-@`` / ``@,@`` / ``@.@`` inside numbers and compounds,
``<unk>`` for rare words, and ``= Title =`` headings. This script undoes the tokenisation, splits paragraphs into
sentences, and keeps a sentence only when it has no ``<unk>`` and 8 to 60 words. It checks the raw files' SHA-256
against the pinned ones first, so the output is the committed file byte for byte (the test suite checks the
committed file's own hash and the rules on it).
"""
import argparse
import hashlib
import os
import re
import sys

RAW = {"valid": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
       "test": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"}
MIN_WORDS, MAX_WORDS = 8, 60


def detokenise(s):
    """WikiText's tokenised text back to ordinary spacing: ``0 @.@ 7 kg ( 24 in ) , it 's`` -> ``0.7 kg (24 in), it's``."""
    s = re.sub(r" @([-.,])@ ", r"\1", s)
    s = re.sub(r" ([.,;:!?%)\]}])", r"\1", s)
    s = re.sub(r"([(\[{$£]) ", r"\1", s)
    s = re.sub(r" (n't|'s|'re|'ve|'m|'ll|'d|'t)\b", r"\1", s)
    s = re.sub(r" ' s\b", "'s", s)
    # straight double quotes, when balanced: the opening one glued to the word after it, the closing one to the
    # word before it
    parts = s.split('"')
    if len(parts) % 2 == 1:
        s = _quotes(parts)
    return re.sub(r"\s+", " ", s).strip()


def _quotes(parts):
    out = parts[0].rstrip()
    for i in range(1, len(parts), 2):
        inner, after = parts[i].strip(), parts[i + 1]
        out += ("" if not out or out[-1] in "([{" else " ") + '"' + inner + '"'
        tail = after.strip()
        if tail:
            out += ("" if tail[0] in ".,;:!?)" else " ") + tail
    return out


def split_sentences(line):
    """One tokenised WikiText paragraph cut into sentences: after a ``.``, ``?`` or ``!`` token (and the straight
    quote that closes, when a quote is open) that comes before a capital, a digit or an opening quote."""
    toks, out, cur, inside, i = line.split(), [], [], False, 0
    while i < len(toks):
        cur.append(toks[i])
        if toks[i] == '"':
            inside = not inside
        elif toks[i] in (".", "?", "!"):
            if inside and i + 1 < len(toks) and toks[i + 1] == '"':  # the closing quote belongs to this sentence
                i += 1
                cur.append('"')
                inside = False
            nxt = toks[i + 1] if i + 1 < len(toks) else ""
            if nxt[:1].isupper() or nxt[:1].isdigit() or nxt == '"':
                out.append(" ".join(cur))
                cur = []
        i += 1
    if cur:
        out.append(" ".join(cur))
    return out


def sentences(lines):
    """Kept sentences of WikiText lines, in order, deduplicated."""
    seen = set()
    for line in lines:
        line = line.strip()
        if not line or line.startswith("= "):
            continue
        for sent in split_sentences(line):
            if "<unk>" in sent:
                continue
            text = detokenise(sent)
            n = len(text.split())
            if MIN_WORDS <= n <= MAX_WORDS and text not in seen:
                seen.add(text)
                yield text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", required=True, help="folder with valid.txt and test.txt (WikiText-2, tokenised)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "sentences.txt"))
    args = ap.parse_args(argv)
    lines = []
    for split, digest in RAW.items():
        path = os.path.join(args.raw, f"{split}.txt")
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            print(f"error: {path}: {e.strerror}", file=sys.stderr)
            return 2
        if hashlib.sha256(raw).hexdigest() != digest:
            print(f"error: {path}: SHA-256 {hashlib.sha256(raw).hexdigest()} is not the pinned {digest}", file=sys.stderr)
            return 2
        lines += raw.decode("utf-8").splitlines()
    out = list(sentences(lines))
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(t + "\n" for t in out)
    print(f"{len(out)} sentences -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
