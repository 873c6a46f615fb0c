"""Reading training data and planning batches.

Sources are local files or ``hf:NAME[:CONFIG[:SPLIT]]`` (needs the ``datasets`` package and network):

* plain text: one document (or sentence) per line;
* JSONL: a ``text`` field (MNTP/SimCSE), or ``query``/``positive``/``negative(s)``/``instruction``/
  ``doc_instruction`` (supervised; the row's own query and document instructions; an optional ``source`` field
  groups examples so that each batch comes from one source); an ``hf:`` dataset's rows alike (MNTP/SimCSE: its
  ``text`` column, or its only column);
* the E5 directory (llm2vec's echo-data, supervised): one JSONL per dataset, with per-dataset instructions
  (:func:`e5_rows`);
* the STS Benchmark TSV (genre, source, year, id, score, sentence1, sentence2[, extra columns...]).

Nothing is dropped silently: every reader returns a :class:`DataStats` with the empty and duplicate counts it
checks (and MNTP's truncated rows, at tokenisation), which the trainer logs; a malformed row is a DataError naming
its line. Texts the contrastive stages cut to their max length are counted per step, at collate (the
``truncated`` column of metrics.csv: the texts cut since the previous row, so with ``log_every`` > 1 the steps
without a row are counted in the next one).
"""
import collections
import dataclasses
import hashlib
import math
import os
import random

from .config import json_loads


BOM = "\ufeff"
# The version of the rules that turn a source into texts or rows (what is refused, which column is read): the token
# cache's key holds it (the text stages' settings, :func:`rows_rule_digest`), so entries built under older rules are
# rebuilt, not reused, and a checkpoint's data identity (``engine.token_cache.data_identity``), so a resume under
# other rules is refused. Bump it with any change to what a reader yields or refuses. 2: lone surrogates, non-string
# hf: values and non-STS tables refused. 3: .JSONL, .Json and .ndjson read as JSON lines in every stage, a BOM
# dropped at the start of any line, a null source or negative(s) read as a missing field, a row setting both
# negative and negatives refused (the second was dropped).
READ_RULES = 3


class DataError(ValueError):
    pass


@dataclasses.dataclass
class DataStats:
    read: int = 0
    kept: int = 0
    empty: int = 0
    duplicates: int = 0
    truncated: int = 0  # texts cut to the max length at tokenisation
    sources: dict = dataclasses.field(default_factory=dict)
    no_negative: int = 0  # supervised rows without a hard negative, dropped when the stage needs one
    blank_negatives: int = 0  # blank hard negatives dropped (from any row, kept or not)
    negatives_per_row: dict = dataclasses.field(default_factory=dict)  # kept supervised rows by hard negatives held
    repeated_negatives: int = 0  # kept rows with fewer hard negatives than the stage uses: theirs are repeated
    unused_negatives: int = 0  # kept rows with more hard negatives than the stage uses: the rest are never trained on
    not_counted: list = dataclasses.field(default_factory=list)  # "duplicates" / "truncated": not checked here
    missing: list = dataclasses.field(default_factory=list)  # E5 dataset files a folder lacks (not trained on)
    unread: list = dataclasses.field(default_factory=list)  # .jsonl files in an E5 folder that are no E5 dataset

    def summary(self):
        extra = "".join(f", {k.replace('_', ' ')} {v}" for k, v in (("no_negative", self.no_negative),
                                                                   ("blank_negatives", self.blank_negatives),
                                                                   ("repeated_negatives", self.repeated_negatives),
                                                                   ("unused_negatives", self.unused_negatives))
                        if v)
        if self.missing:
            extra += (f", MISSING {len(self.missing)} E5 dataset file(s) (not trained on): "
                      f"{', '.join(self.missing)}")
        if self.unread:
            extra += f", not read (no E5 dataset): {', '.join(self.unread)}"
        dup = "" if "duplicates" in self.not_counted else f", duplicates {self.duplicates}"
        cut = (", truncated: per step at collate (metrics.csv)" if "truncated" in self.not_counted
               else f", truncated {self.truncated}")
        return f"read {self.read}, kept {self.kept}, empty {self.empty}{dup}{cut}{extra}, sources {self.sources}"

    def to_cache(self):
        """The counts an item-cache entry keeps (``not_counted`` is the stage's to say when it reads the entry, so
        an entry reads the same in engines with and without that field)."""
        out = dataclasses.asdict(self)
        out.pop("not_counted")
        return out

    @classmethod
    def from_cache(cls, counts, not_counted=()):
        """The stats of an item-cache entry (:meth:`to_cache`); fields this engine does not know are left out."""
        known = {f.name for f in dataclasses.fields(cls)} - {"not_counted"}
        return cls(**{k: v for k, v in counts.items() if k in known}, not_counted=list(not_counted))

    def count_repeated_negatives(self, n):
        """Set ``repeated_negatives``: the kept rows holding fewer than ``n`` (>= 1) hard negatives, which the
        supervised batch repeats to fill n slots (E5 rows hold one), weighting each repeated negative more; and
        ``unused_negatives``: those holding more, of which the batch takes the first n in every epoch (the rest are
        never trained on)."""
        self.repeated_negatives = sum(v for k, v in self.negatives_per_row.items() if 0 < int(k) < n)
        self.unused_negatives = sum(v for k, v in self.negatives_per_row.items() if int(k) > n)


def _check_file(path):
    if not os.path.exists(path):
        hint = ""
        repo_copy = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
        if not os.path.isabs(path) and os.path.isfile(repo_copy):
            # Relative data paths are relative to the current directory, as everywhere else on the command line.
            hint = (f"; relative paths are read from the current directory ({os.getcwd()}): run from the "
                    f"repository root or give {repo_copy}")
        raise DataError(f"data file not found: {path} (data is a file, an E5 folder, or hf:NAME[:CONFIG[:SPLIT]] "
                        f"for a Hugging Face dataset)"
                        f"{hint}")
    if not os.path.isfile(path):
        raise DataError(f"data path is not a file: {path}")
    if os.path.getsize(path) == 0:
        raise DataError(f"data file is empty: {path}")


def check_sources(sources, e5_folders=True):
    """The checks every reader makes first on a local source (it exists, is a file and is not empty), made at
    once: a mistyped path is one line before anything heavy loads, not after the imports on every rank. ``hf:``
    sources are left to their readers; a ``.csv``/``.tsv`` must be an STS Benchmark TSV. A folder is E5 data
    (``e5_folders``: the supervised InfoNCE stage, the only one that reads a folder), which must hold E5 files
    (:func:`e5_files`); elsewhere a folder is refused here, not after the tokenizer loads. Raises DataError."""
    for src in sources:
        if src.startswith("hf:"):
            continue
        if os.path.isdir(src):
            if not e5_folders:
                raise DataError(f"data path is a folder, not a file: {src} (only the supervised stage reads a "
                                f"folder, as E5 data)")
            e5_files(src)
        else:
            _check_file(src)
            _check_table(src)


def _check_table(src):
    """A ``.csv``/``.tsv`` file is read only as an STS Benchmark TSV, by every stage: another table's lines (its
    header row included) are no corpus, and no stage reads its columns."""
    if src.lower().endswith((".csv", ".tsv")) and not is_sts_file(src):
        raise DataError(f"{src}: not an STS Benchmark TSV (>= 7 tab-separated columns, a numeric score in column 5), "
                        f"the one table the stages read; give .txt lines or .jsonl rows instead")


JSON_LINES = (".jsonl", ".json", ".ndjson")  # read as one JSON object a line, whatever the case of the extension


def is_json_lines(path):
    """Whether ``path`` is read as JSON lines (``.jsonl``, ``.json``, ``.ndjson``, in any case) rather than text."""
    return path.lower().endswith(JSON_LINES)


def is_sts_file(path):
    """STS Benchmark TSV: >= 7 tab-separated fields with a numeric score in column 5."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 7:
                return False
            try:
                float(parts[4])
                return True
            except ValueError:
                return False
    return False


def read_sts(path):
    """[(sentence1, sentence2, score)] from an STS Benchmark TSV. Malformed rows are errors with a line number."""
    return [(a, b, score) for a, b, score, _ in _sts_rows_of(path)]


def _sts_rows_of(path):
    """Every row of an STS Benchmark TSV as (sentence1, sentence2, score, columns); a DataError when it has none."""
    _check_file(path)
    rows = list(_sts_rows(path))
    if not rows:
        raise DataError(f"no STS pairs in {path}")
    return rows


def _sts_rows(path):
    for n, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 7:
            raise DataError(f"{path}:{n}: expected >= 7 tab-separated columns (genre, source, year, id, score, "
                            f"sentence1, sentence2), got {len(parts)}")
        try:
            score = float(parts[4])
        except ValueError:
            raise DataError(f"{path}:{n}: score column is not a number: {parts[4]!r}") from None
        if not math.isfinite(score):  # a NaN gold score makes Spearman NaN and a graded loss NaN
            raise DataError(f"{path}:{n}: score {parts[4]!r} is not a finite number")
        yield parts[5].strip(), parts[6].strip(), score, parts


def read_scored_pairs(sources, max_samples=0):
    """[(sentence1, sentence2, score)] for the graded losses (CoSENT, AnglE): every pair, whatever its score.

    Sources: STS Benchmark TSVs, or JSONL with ``sentence1``, ``sentence2`` and a numeric ``score``. Pairs with an
    empty side are counted as empty and skipped. Returns (pairs, stats).
    """
    if not sources:
        raise DataError("no data given: set data=FILE (an STS TSV or JSONL with sentence1, sentence2, score)")
    out, stats = [], DataStats(not_counted=["duplicates", "truncated"])
    for src in sources:
        _check_file(src)
        if is_sts_file(src):
            rows = read_sts(src)
        elif is_json_lines(src):
            rows = []
            for n, obj in _json_rows(src):
                if obj is None:
                    rows.append(("", "", 0.0))
                    continue
                if not isinstance(obj, dict):
                    raise DataError(f"{src}:{n}: expected a JSON object, got {_json_type(obj)}")
                for key in ("sentence1", "sentence2", "score"):
                    if key not in obj:
                        raise DataError(f"{src}:{n}: missing field {key!r} (scored pairs need sentence1, sentence2, "
                                        f"score)")
                for key in ("sentence1", "sentence2"):
                    if not isinstance(obj[key], str):
                        raise DataError(f"{src}:{n}: field {key!r} must be a string, got {_json_type(obj[key])}")
                    _utf8_text(obj[key], f"{src}:{n}", key)
                try:  # a number, or a string holding one (as STS scores often come)
                    score = float(obj["score"])
                except (TypeError, ValueError):
                    raise DataError(f"{src}:{n}: score is not a number: {obj['score']!r}") from None
                if not math.isfinite(score):
                    raise DataError(f"{src}:{n}: score {obj['score']!r} is not a finite number")
                rows.append((obj["sentence1"].strip(), obj["sentence2"].strip(), score))
        else:
            raise DataError(f"{src}: scored pairs come from an STS Benchmark TSV or JSONL (sentence1, sentence2, "
                            f"score)")
        if _take(out, src, rows, stats, max_samples, lambda row: row if row[0] and row[1] else None):
            break
    stats.kept = len(out)
    if not out:
        raise DataError(f"no usable scored pairs in {sources} ({stats.summary()})")
    return out, stats


def _take(out, src, items, stats, max_samples, clean):
    """Append one source's items to ``out`` through ``clean`` (item -> kept item; None: empty, counted here;
    False: dropped and counted by ``clean``), up to ``max_samples`` in all. Records the source's count in
    ``stats`` and returns whether ``max_samples`` is reached."""
    n_before = len(out)
    for item in items:
        stats.read += 1
        item = clean(item)
        if item is None:
            stats.empty += 1
        elif item is not False:
            out.append(item)
            if max_samples and len(out) >= max_samples:
                break
    stats.sources[src] = len(out) - n_before
    return bool(max_samples and len(out) >= max_samples)


def _load_hf(spec):
    parts = spec[3:].split(":")
    name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "train"
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: Hugging Face datasets need `pip install datasets` (and network)") from None
    exc = getattr(datasets, "exceptions", None)
    build_error = getattr(exc, "DatasetsError", ValueError)  # a file it cannot parse: DatasetGenerationError
    try:
        return datasets.load_dataset(name, config, split=split)
    except (ValueError, FileNotFoundError, build_error) as e:  # a split or config it lacks, no such dataset
        cause = f" ({' '.join(str(e.__cause__).split())})" if e.__cause__ is not None else ""
        raise DataError(f"{spec}: {' '.join(str(e).split())}{cause}") from None
    except ConnectionError as e:  # offline, or the Hub is down: a local folder or file works without it
        raise DataError(f"{spec}: {' '.join(str(e).split())}; give a local path instead when offline") from None


def split_pairs(pairs, seed):
    """Sentences of scored pairs as separate texts, so that no sentence sits next to its paraphrase.

    The pairs are shuffled with ``seed``; all first sentences come first, then all second sentences in
    the same order, so the two sentences of a pair are exactly len(pairs) texts apart. MNTP packs texts
    into blocks of at most max_seq_len tokens (>= 2 tokens per text with its EOS), so a pair never shares
    a block once len(pairs) > max_seq_len / 2; with both sentences side by side, a masked word could be
    copied from the paraphrase through bidirectional attention instead of predicted.
    """
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    return [pairs[i][0] for i in order] + [pairs[i][1] for i in order]


def read_texts(sources, max_samples=0, dedup=False, seed=0):
    """Documents/sentences for MNTP and SimCSE. Returns (texts, stats).

    Documents (lines, JSONL records) stay whole and in order; STS-style pair files become single
    sentences (see :func:`split_pairs`, shuffled with ``seed``).
    """
    stats = DataStats()
    texts = list(iter_texts(sources, stats, max_samples, dedup, seed))
    if not texts:
        raise DataError(f"no non-empty text in {sources} ({stats.summary()})")
    return texts, stats


def iter_texts(sources, stats, max_samples=0, dedup=False, seed=0):
    """:func:`read_texts` as a stream: yields the kept texts one by one and fills ``stats`` as it goes (complete
    once the stream is exhausted), so a corpus larger than memory can be tokenised. ``dedup`` remembers a 16-byte
    digest per text, not the text."""
    if not sources:
        raise DataError("no data given: set data=FILE (or a list of files)")
    if not dedup:
        stats.not_counted.append("duplicates")
    seen, kept = set(), 0
    for src in sources:
        n = 0
        for t in _raw_texts(src, max_samples - kept if max_samples else 0, seed):
            stats.read += 1
            t = (t or "").strip()
            if not t:
                stats.empty += 1
                continue
            if dedup:
                digest = hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                if digest in seen:
                    stats.duplicates += 1
                    continue
                seen.add(digest)
            n += 1
            stats.kept = kept = kept + 1
            yield t
            if max_samples and kept >= max_samples:
                break
        stats.sources[src] = n
        if max_samples and kept >= max_samples:
            break


def seed_orders(sources):
    """Whether the run's seed shapes what ``iter_texts`` yields from ``sources``: only an STS-style pair file's
    sentences are ordered by it (:func:`split_pairs`); a corpus reads in its own order whatever the seed. A missing
    file is read as not ordered (``iter_texts`` then says it is missing)."""
    for src in sources:
        if not src.startswith("hf:") and os.path.isfile(src) and is_sts_file(src):
            return True
    return False


def _raw_texts(src, room, seed):
    """The raw texts of one source (``room``: how many more texts are wanted, 0 for all). A ``.csv``/``.tsv`` file
    is read only as an STS Benchmark TSV: another table's lines (its header row included) are no corpus."""
    if src.startswith("hf:"):
        return _hf_texts(src)
    _check_file(src)
    if is_sts_file(src):
        pairs = read_sts(src)
        if room:  # keep whole pairs, so a cut file still separates them
            pairs = pairs[:max(1, (room + 1) // 2)]
        return split_pairs(pairs, seed)
    _check_table(src)
    if is_json_lines(src):
        return _jsonl_field(src, "text")
    return _lines(src)


def _hf_texts(spec):
    """The ``text`` column of an ``hf:`` dataset, row by row (a null value is an empty text). A dataset without a
    ``text`` column is refused, naming its columns, unless it has one column only, which is then the text; a value
    that is no string is a DataError naming its row (counted from 1)."""
    ds = _load_hf(spec)
    names = list(ds.column_names)
    if "text" in names:
        col = "text"
    elif len(names) == 1:
        col = names[0]
    else:
        raise DataError(f"{spec}: no `text` column (its columns: {', '.join(names)}); the text stages read a "
                        f"dataset's `text` column, or its only column")
    for i, row in enumerate(ds, 1):
        v = row[col]
        if v is None:
            yield ""
            continue
        if not isinstance(v, str):
            raise DataError(f"{spec}:{i}: column {col!r} must be a string, got {_json_type(v)}")
        yield _utf8_text(v, f"{spec}:{i}", col)


def _lines(path):
    """Lines of a UTF-8 text file; bad encoding or binary content is a DataError with the line number."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if b"\0" in raw:
                raise DataError(f"{path}:{n}: NUL byte: this looks like a binary file, not text")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not valid UTF-8 (byte {raw[e.start:e.start + 1]!r} at column "
                                f"{e.start + 1})") from None
            if line.startswith(BOM):  # a UTF-8 byte-order mark is file metadata, not the first text's first
                line = line[1:]  # character: at the top of the file, or of each file `cat` joined into this one
            yield line[:-2] if line.endswith("\r\n") else line.rstrip("\n")


def _jsonl_field(path, field):
    for n, line in enumerate(_lines(path), 1):
        if not line.strip():
            yield ""
            continue
        obj = json_loads(line, f"{path}:{n}", DataError)
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object with a {field!r} field, got {_json_type(obj)}")
        if field not in obj:
            raise DataError(f"{path}:{n}: missing field {field!r}")
        if not isinstance(obj[field], str):
            raise DataError(f"{path}:{n}: field {field!r} must be a string, got {_json_type(obj[field])}")
        yield _utf8_text(obj[field], f"{path}:{n}", field)


def _json_type(v):
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _utf8_text(v, where, field):
    """``v`` (a string) if it is valid Unicode, which UTF-8 encodes. JSON's ``\\ud800`` escape gives a lone UTF-16
    surrogate that ``json.loads`` keeps and no tokenizer takes (a TypeError at the batch that draws it, hours into
    a run): a DataError naming ``where`` and ``field`` when the data is read. (A file's bytes are decoded as strict
    UTF-8, which yields no surrogate: only the values of JSON and ``hf:`` rows need the check.)"""
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{where}: field {field!r} holds an unpaired UTF-16 surrogate ({v[e.start]!r} at "
                            f"character {e.start + 1}); text must be valid Unicode") from None
    return v


def _str_field(obj, key, where):
    """obj[key] as a string; a missing, null or non-string value, or one holding a lone surrogate, is a DataError."""
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r} (supervised rows need query, positive, negative or "
                        f"negatives)")
    v = obj[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {_json_type(v)}")
    return _utf8_text(v, where, key)


def _opt_str_field(obj, key, where):
    """obj[key] as a string, or None where the row has no such field or holds null there (the default applies)."""
    v = obj.get(key)
    return None if v is None else _str_field(obj, key, where)


def read_supervised(sources, max_samples=0, default_instruction="", need_negatives=True):
    """[{query, positive, negatives: [...], instruction, doc_instruction, source}] from JSONL, an STS TSV or an E5
    directory (:func:`e5_rows`). Returns (examples, stats). Blank hard negatives are dropped (counted); a row left
    with none is dropped (counted as ``no_negative``) when ``need_negatives``, else kept with ``negatives: []``
    (``contrastive.num_hard_negatives: 0``: (query, positive) pairs)."""
    stats = DataStats(not_counted=["duplicates", "truncated"])  # cut at collate, counted per step
    out = list(iter_supervised(sources, stats, max_samples, default_instruction, need_negatives))
    if not out:
        raise DataError(f"no usable supervised examples in {sources} ({stats.summary()})")
    return out, stats


def iter_supervised(sources, stats, max_samples=0, default_instruction="", need_negatives=True):
    """:func:`read_supervised` as a stream (``stats`` complete once it is exhausted)."""
    if not sources:
        raise DataError("no data given: set data=FILE.jsonl (or an E5 directory)")
    kept = 0
    # one E5 folder labels its counts by file name; several by folder and file name (the names repeat)
    in_folder = (lambda src, f: os.path.join(src, f)) if sum(map(os.path.isdir, sources)) > 1 else (lambda src, f: f)
    for src in sources:
        if os.path.isdir(src):  # an E5 folder: what it lacks, and what it holds that is not read, are reported
            found = e5_files(src)
            stats.missing += [in_folder(src, f) for f in e5_missing(found)]
            stats.unread += sorted(in_folder(src, f) for f in os.listdir(src)
                                   if f.endswith(".jsonl") and not e5_known_file(f))
            for name in found:  # kept rows per dataset file
                stats.sources.setdefault(in_folder(src, f"{name}.jsonl"), 0)
        else:
            stats.sources.setdefault(src, 0)
        for where, obj, meta in _supervised_rows(src, default_instruction):
            label = in_folder(src, meta["file"]) if "file" in meta else src
            stats.read += 1
            if obj is None:
                stats.empty += 1
                continue
            ex = _supervised_example(obj, where, meta)
            if ex is None:
                stats.empty += 1
                continue
            stats.blank_negatives += ex.pop("blank_negatives")
            if not ex["negatives"] and need_negatives:
                stats.no_negative += 1
                continue
            kept += 1
            stats.sources[label] += 1
            n_neg = len(ex["negatives"])
            stats.negatives_per_row[n_neg] = stats.negatives_per_row.get(n_neg, 0) + 1
            stats.kept = kept
            yield ex
            if max_samples and kept >= max_samples:
                break
        if max_samples and kept >= max_samples:
            break


def _supervised_rows(src, default_instruction):
    """(where, row or None, defaults) for each row of one source; defaults hold the row's source label and its
    query and document instructions where the row names none."""
    meta = {"source": src, "instruction": default_instruction, "doc_instruction": ""}
    if src.startswith("hf:"):
        return ((f"{src}:{i}", dict(r), meta) for i, r in enumerate(_load_hf(src), 1))
    if os.path.isdir(src):
        return e5_rows(src)
    _check_file(src)
    if is_sts_file(src):
        return ((f"{src}:{i}", r, meta) for i, r in enumerate(sts_supervised_rows(src), 1))
    _check_table(src)
    return ((f"{src}:{n}", r, meta) for n, r in _json_rows(src))


def _supervised_example(obj, where, meta):
    """One checked example (its blank hard negatives left out and counted), or None when the query or the positive
    is empty."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with query, positive and negative(s), got "
                        f"{_json_type(obj)}")
    q, p = _str_field(obj, "query", where).strip(), _str_field(obj, "positive", where).strip()
    # null is a missing field (a gap in a column pandas or datasets wrote: a file mixing rows of either field holds
    # both, one null); a row without either has no negative, counted
    given = [k for k in ("negatives", "negative") if obj.get(k) is not None]
    if len(given) == 2:
        raise DataError(f"{where}: both 'negative' and 'negatives' are set: give a row's hard negatives in one of them")
    key = given[0] if given else "negative"
    negs = obj[key] if given else []
    if isinstance(negs, str):
        negs = [negs]
    if not isinstance(negs, list) or not all(isinstance(x, str) for x in negs):
        got = _json_type(negs) if not isinstance(negs, list) else "an array holding " + ", ".join(
            sorted({_json_type(x) for x in negs if not isinstance(x, str)}))
        raise DataError(f"{where}: field {key!r} must be a string or a list of strings, got {got}")
    for x in negs:
        _utf8_text(x, where, key)
    # a row's own instructions (null: none of its own, the default applies)
    instruction, doc_instruction = (_opt_str_field(obj, k, where) for k in ("instruction", "doc_instruction"))
    source = obj.get("source")  # null: the file's own, as for the instructions (a number names a group too)
    source = meta["source"] if source is None else _utf8_text(str(source), where, "source")
    if not q or not p:
        return None
    kept = [x.strip() for x in negs if x.strip()]
    return {"query": q, "positive": p, "negatives": kept, "blank_negatives": len(negs) - len(kept),
            "instruction": meta["instruction"] if instruction is None else instruction,
            "doc_instruction": meta["doc_instruction"] if doc_instruction is None else doc_instruction,
            "source": source}


# The fields a supervised row's item is read from (in the rows rule digest: an engine reading another field, as
# ``doc_instruction`` once was not, never reuses items built without it; nor items holding text it now refuses).
ROW_FIELDS = ("query", "positive", "negative", "negatives", "instruction", "doc_instruction", "source")

# The E5 training data as llm2vec reads it (llm2vec/dataset/E5Data.py, from the echo-embeddings release): one
# ``<dataset>.jsonl`` per dataset (query, positive, negative), each with its own instruction, joined to the text
# with "; ". allnli and quora carry two prompts each (the "alternation"). The echo-data download holds them whole
# (``allnli.jsonl``, ``quora_duplicates.jsonl``), and llm2vec 0.1.6 on alternates the two prompts by row (even rows
# the first, odd rows the second: E5_WHOLE); llm2vec 0.1.5 read them as two files of halves (``allnli_split1.jsonl``
# ...), and the engine reads either layout. The symmetric tasks (allnli's second prompt, both quora prompts) put the
# instruction before the documents too, as llm2vec 0.1.5 does (0.1.6 on names them by the split files only, which
# the whole files never match, so its documents go uninstructed there). The halves of a dataset are one group:
# every global batch comes from one group.
E5_JOINER = "; "
E5_INSTRUCTIONS = {
    "allnli_split1": "Given a premise, retrieve a hypothesis that is entailed by the premise",
    "allnli_split2": "Retrieve semantically similar text",
    "dureader": "Given a Chinese search query, retrieve web passages that answer the question",
    "eli5_question_answer": "Provided a user question, retrieve the highest voted answers on Reddit ELI5 forum",
    "fever": "Given a claim, retrieve documents that support or refute the claim",
    "hotpot_qa": "Given a multi-hop question, retrieve documents that can help answer the question",
    "miracl": "Given a question, retrieve Wikipedia passages that answer the question",
    "mrtydi": "Given a question, retrieve Wikipedia passages that answer the question",
    "msmarco_passage": "Given a web search query, retrieve relevant passages that answer the query",
    "msmarco_document": "Given a web search query, retrieve relevant documents that answer the query",
    "nq": "Given a question, retrieve Wikipedia passages that answer the question",
    "quora_duplicates_split1": "Given a question, retrieve questions that are semantically equivalent to the given "
                               "question",
    "quora_duplicates_split2": "Find questions that have the same meaning as the input question",
    "squad": "Retrieve Wikipedia passages that answer the question",
    "t2ranking": "Given a Chinese search query, retrieve web passages that answer the question",
    "trivia_qa": "Retrieve Wikipedia passages that answer the question",
}
E5_SYMMETRIC = ("allnli_split2", "quora_duplicates_split1", "quora_duplicates_split2")
E5_WHOLE = {"allnli": ("allnli_split1", "allnli_split2"),  # one file, the halves' prompts by row: i % 2
            "quora_duplicates": ("quora_duplicates_split1", "quora_duplicates_split2")}


def rows_rule_digest():
    """A digest of the rules that turn source rows into cached supervised items (the E5 instructions, joiner and
    symmetric datasets; the STS-as-supervised thresholds; the row fields read): the item cache's key holds it, so
    an engine whose rules changed never reuses items built under the old ones."""
    import json

    rules = [E5_INSTRUCTIONS, E5_JOINER, list(E5_SYMMETRIC), E5_WHOLE, STS_SUPERVISED_THRESHOLDS, ROW_FIELDS,
             READ_RULES]
    return hashlib.sha256(json.dumps(rules, sort_keys=True).encode()).hexdigest()[:16]


def e5_group(dataset):
    """The batch group of an E5 dataset file: its name without the _split1 / _split2 half."""
    return dataset.replace("_split1", "").replace("_split2", "")


def e5_files(directory):
    """{name: path} of the known E5 dataset files in ``directory`` (the echo-data download's whole files, or
    llm2vec 0.1.5's halves), in llm2vec's dataset order. A dataset present both whole and in halves is refused
    (it would train twice). :func:`e5_missing` names the known files the folder lacks."""
    def has(name):
        return os.path.isfile(os.path.join(directory, f"{name}.jsonl"))

    names = []
    for name in E5_INSTRUCTIONS:
        whole = next((w for w, halves in E5_WHOLE.items() if name in halves), None)
        if whole and has(whole):
            if has(name):
                raise DataError(f"{directory} holds {whole}.jsonl and {name}.jsonl: the same dataset whole and in "
                                f"halves (it would train twice); keep one layout")
            if whole not in names:
                names.append(whole)
        elif has(name):
            names.append(name)
    if not names:
        raise DataError(f"{directory} is a directory but holds none of the E5 dataset files (allnli.jsonl, "
                        f"msmarco_passage.jsonl, ... as in llm2vec's echo-data); other data must be a file")
    return {name: os.path.join(directory, f"{name}.jsonl") for name in names}


def e5_missing(found):
    """The E5 dataset files an E5 folder lacks, given :func:`e5_files`' result: for allnli and quora the whole file
    (the download's layout) unless the folder holds their halves, then the missing half."""
    missing = []
    for whole, halves in E5_WHOLE.items():
        if whole not in found and not any(h in found for h in halves):
            missing.append(f"{whole}.jsonl")
        elif whole not in found:
            missing += [f"{h}.jsonl" for h in halves if h not in found]
    split = {h for halves in E5_WHOLE.values() for h in halves}
    missing += [f"{n}.jsonl" for n in E5_INSTRUCTIONS if n not in split and n not in found]
    return sorted(missing)


def e5_known_file(filename):
    """Whether ``filename`` is an E5 dataset file the reader knows (either layout)."""
    return filename.endswith(".jsonl") and filename[:-len(".jsonl")] in (*E5_INSTRUCTIONS, *E5_WHOLE)


def e5_rows(directory):
    """Rows of an E5 directory in llm2vec's dataset order, each with its dataset's instruction and group. A whole
    allnli / quora file takes its halves' prompts by row, as llm2vec 0.1.6 on does (row i: half i % 2)."""
    def meta(name, file):
        prompt = E5_INSTRUCTIONS[name] + E5_JOINER
        return {"source": e5_group(name), "instruction": prompt,
                "doc_instruction": prompt if name in E5_SYMMETRIC else "", "file": file}

    for name, path in e5_files(directory).items():
        halves = [meta(h, f"{name}.jsonl") for h in E5_WHOLE.get(name, (name,))]
        for i, (n, obj) in enumerate(_json_rows(path)):
            yield f"{path}:{n}", obj, halves[i % len(halves)]


STS_SUPERVISED_THRESHOLDS = (4.0, 2.0)  # (positive_min, negative_max) of sts_supervised_rows


def sts_supervised_rows(path, positive_min=STS_SUPERVISED_THRESHOLDS[0], negative_max=STS_SUPERVISED_THRESHOLDS[1]):
    """Supervised rows from an STS Benchmark TSV (scores as the only supervision).

    Each pair scoring >= positive_min gives two rows (a -> b and b -> a). The hard negative is a
    sentence of a pair scoring <= negative_max from the same genre and source (similar topic, other
    meaning), picked deterministically; if that group has none, from any low-score pair.
    """
    rows = []
    for a, b, score, parts in _sts_rows(path):
        rows.append(((parts[0], parts[1]), score, a, b))
    low_by_group, low_all = {}, []
    for group, score, a, b in rows:
        if score <= negative_max:
            low_by_group.setdefault(group, []).extend([a, b])
            low_all.extend([a, b])
    if not low_all:
        raise DataError(f"{path}: no pair scores <= {negative_max}; cannot pick hard negatives")
    out = []
    for k, (group, score, a, b) in enumerate(rows):
        if score < positive_min:
            continue
        for q, p in ((a, b), (b, a)):
            pool = [s for s in low_by_group.get(group, low_all) if s not in (q, p)] or low_all
            out.append({"query": q, "positive": p, "negative": pool[(k * 7919 + len(out)) % len(pool)]})
    return out


def sts_genre(value):
    """The genre of an STS Benchmark row's first column: ``main-forum`` (train) and ``main-forums`` (dev, test)
    are one genre, ``forums``; likewise ``captions`` and ``news``."""
    g = value.strip().lower()
    g = g[len("main-"):] if g.startswith("main-") else g
    return g if g.endswith("s") else g + "s"


def in_turn(items, group_of):
    """``items`` reordered group by group in turn (the groups in order of first appearance, each group's items in
    their order): the first N then hold every group, as evenly as the groups' sizes allow."""
    groups = {}
    for x in items:
        groups.setdefault(group_of(x), []).append(x)
    queues = [list(reversed(g)) for g in groups.values()]
    out = []
    while any(queues):
        out += [q.pop() for q in queues if q]
    return out


EVAL_STS_ORDER = "genres in turn"  # how sts_eval_pairs takes a part of an STS file (best/'s record holds it)


def sts_eval_pairs(path, max_pairs):
    """The pairs of an STS Benchmark TSV that the dev score reads (``eval_sts_pairs``): all of them in file order
    when ``max_pairs`` covers the file, else ``max_pairs`` taken genre by genre in turn (:func:`in_turn` over
    :func:`sts_genre`). STS-B dev is sorted by genre: its first 500 pairs are all image and video captions, so a
    best/ chosen on them was chosen on captions alone (forums and news are 55% of STS-B test)."""
    return _eval_pairs_of(_sts_rows_of(path), max_pairs)


def _eval_pairs_of(rows, max_pairs):
    if max_pairs < len(rows):
        rows = in_turn(rows, lambda r: sts_genre(r[3][0]))[:max_pairs]
    return [(a, b, score) for a, b, score, _ in rows]


def sts_eval_pairs_are_the_first(path, max_pairs):
    """Whether :func:`sts_eval_pairs` gives the file's first ``max_pairs`` pairs, the ones a dev score took before
    ``EVAL_STS_ORDER`` (2026-12-07): yes where ``max_pairs`` covers the file or its first pairs are already in
    turn (a file of one genre). A score recorded under the old rule compares with a new one only then."""
    rows = _sts_rows_of(path)
    return _eval_pairs_of(rows, max_pairs) == [(a, b, score) for a, b, score, _ in rows[:max_pairs]]


def sts_genre_lines(path, genres):
    """The rows of an STS Benchmark TSV whose genre (:func:`sts_genre`) is in ``genres``, as TSV lines in file
    order. A genre the file does not hold is a DataError naming the ones it does."""
    _check_file(path)
    wanted = {sts_genre(g) for g in genres}
    rows = [parts for _, _, _, parts in _sts_rows(path)]
    found = {sts_genre(parts[0]) for parts in rows}
    if not wanted or wanted - found:
        raise DataError(f"{path}: no rows of genre {sorted(wanted - found) or '(none given)'}; "
                        f"its genres are {sorted(found)}")
    return ["\t".join(parts) for parts in rows if sts_genre(parts[0]) in wanted]


def _json_rows(path):
    for n, line in enumerate(_lines(path), 1):
        if not line.strip():
            yield n, None
            continue
        yield n, json_loads(line, f"{path}:{n}", DataError)


class BlockChunker:
    """MNTP blocks from a stream of tokenised documents, in time linear in the tokens.

    Documents are joined with EOS into one stream that is cut into blocks of ``body = max_seq_len - len(prefix)``
    tokens, each block being ``prefix + body tokens`` (``prefix``: :func:`engine.encoding.special_prefix`).
    :meth:`feed` keeps only the tail shorter than one block between documents, so every token is copied a
    bounded number of times (the tail, < body, plus the document once): O(n) for n tokens, where cutting the
    front off the whole remaining stream per block is O(n^2 / body).
    """

    def __init__(self, tokenizer, max_seq_len):
        from .encoding import special_prefix

        self.prefix = list(special_prefix(tokenizer))
        self.eos = tokenizer.eos_token_id
        self.body = max_seq_len - len(self.prefix)
        if self.body < 2:
            raise DataError(f"max_seq_len {max_seq_len} is too short")
        self.tail = []

    def feed(self, ids):
        """Add one document's ids; return the blocks it completes."""
        stream = self.tail + list(ids)
        if self.eos is not None:
            stream.append(self.eos)
        b = self.body
        full = len(stream) // b
        self.tail = stream[full * b:]
        return [self.prefix + stream[k * b:(k + 1) * b] for k in range(full)]

    def finish(self):
        """The last, shorter block (kept, padded later), unless it is a lone token."""
        tail, self.tail = self.tail, []
        return [self.prefix + tail] if len(tail) > 1 else []


class SentenceRows:
    """MNTP rows one document each (``mntp.pack: false``): ``prefix + ids + [EOS]``, the text cut to fit
    ``max_seq_len`` and counted in ``stats.truncated``; the row is what the encoder reads for that text (its
    special prefix, the text, the appended EOS). Same interface as :class:`BlockChunker`."""

    def __init__(self, tokenizer, max_seq_len, stats):
        from .encoding import special_prefix

        self.prefix = list(special_prefix(tokenizer))
        self.end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.body = max_seq_len - len(self.prefix) - len(self.end)
        if self.body < 1:
            raise DataError(f"max_seq_len {max_seq_len} is too short")
        self.stats = stats

    def feed(self, ids):
        ids = list(ids)
        if len(ids) > self.body:
            self.stats.truncated += 1
            ids = ids[:self.body]
        row = self.prefix + ids + self.end
        return [row] if len(row) > 1 else []

    def finish(self):
        return []


def tokenized_batches(texts, tokenizer, progress=False, total_chars=None, batch_chars=1 << 20, batch_texts=1024):
    """Yield the ids (no special tokens) of ``texts`` in order, tokenised in batches of about ``batch_chars``
    characters (one call per batch: a fast tokenizer's parallelism, memory bounded by the batch).

    ``progress``: a tqdm bar counting characters (``total_chars`` if known), for loads that take minutes.
    """
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_chars, desc="tokenise", unit="char", unit_scale=True, dynamic_ncols=True)
    batch, size = [], 0
    try:
        for t in texts:
            batch.append(t)
            size += len(t)
            if size >= batch_chars or len(batch) >= batch_texts:
                yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
                if bar is not None:
                    bar.update(size)
                batch, size = [], 0
        if batch:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
            if bar is not None:
                bar.update(size)
    finally:
        if bar is not None:
            bar.close()


def chunk_documents(texts, tokenizer, max_seq_len, progress=False):
    """Tokenise, join documents with EOS, and cut into blocks of max_seq_len tokens (:class:`BlockChunker`).

    Each block starts with the special tokens the tokenizer itself puts before a text
    (:func:`engine.encoding.special_prefix`: BOS for Llama/Mistral/Gemma, nothing for SmolLM2 or Qwen), the
    one rule the encoder follows too, so training and inference see the same first token.
    Nothing is lost: a long document spans several blocks; the last, shorter block is kept (padded later).
    """
    chunker = BlockChunker(tokenizer, max_seq_len)
    blocks = []
    total = sum(len(t) for t in texts) if progress else None
    for ids in tokenized_batches(texts, tokenizer, progress, total):
        blocks += chunker.feed(ids)
    return blocks + chunker.finish()


class BatchPlan:
    """Deterministic global batches, sharded over ranks and accumulation steps.

    Global batch g of epoch e is a fixed function of (seed, e); rank r's a-th micro-batch of it is
    ``g[(a * world + r) * micro : ... + micro]``. The position after k optimizer steps is therefore
    (k // steps_per_epoch, k % steps_per_epoch): resuming at a step resumes at the same data.
    With ``groups`` (a source label per item) every global batch is drawn from one source.
    """

    def __init__(self, n_items, global_batch, micro, world, rank, seed, groups=None):
        if n_items < global_batch:
            raise DataError(f"the data has {n_items} examples, fewer than one global batch ({global_batch})")
        self.n, self.global_batch, self.micro, self.world, self.rank, self.seed = (
            n_items, global_batch, micro, world, rank, seed)
        self.accum = global_batch // (micro * world)
        self.groups = groups
        self._cache = {}
        self.steps_per_epoch = len(self._epoch(0))
        if self.steps_per_epoch == 0:
            raise DataError("no source has enough examples for one global batch")
        # Every epoch leaves out the same number of items (each group's, or the whole set's, last partial batch);
        # a group smaller than one global batch is never trained on.
        self.unused_per_epoch = self.n - self.steps_per_epoch * global_batch
        sizes = collections.Counter(groups) if groups is not None else {}
        self.starved = {g: n for g, n in sorted(sizes.items()) if n < global_batch}

    def summary(self):
        """One line for the run's log: steps per epoch and what no batch holds."""
        line = (f"{self.steps_per_epoch} steps per epoch of {self.global_batch}; {self.unused_per_epoch} of "
                f"{self.n} items in no batch each epoch (a different "
                f"{'partial batch per source' if self.groups is not None else 'partial batch'} each time)")
        if self.starved:
            line += (f"; {len(self.starved)} source(s) smaller than one global batch, never trained on "
                     f"({sum(self.starved.values())} items)")
        return line

    def _epoch(self, epoch):
        if epoch not in self._cache:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            if self.groups is None:
                order = list(range(self.n))
                rng.shuffle(order)
                batches = [order[i:i + self.global_batch]
                           for i in range(0, self.n - self.global_batch + 1, self.global_batch)]
            else:
                by_src = {}
                for i, g in enumerate(self.groups):
                    by_src.setdefault(g, []).append(i)
                batches = []
                for src in sorted(by_src):
                    idx = by_src[src]
                    rng.shuffle(idx)
                    batches += [idx[i:i + self.global_batch]
                                for i in range(0, len(idx) - self.global_batch + 1, self.global_batch)]
                rng.shuffle(batches)
            self._cache = {epoch: batches}
        return self._cache[epoch]

    def position(self, step):
        return step // self.steps_per_epoch, step % self.steps_per_epoch

    def micro_batches(self, step):
        """The `accum` micro-batches (index lists) this rank processes for optimizer step `step`."""
        epoch, i = self.position(step)
        g = self._epoch(epoch)[i]
        return [g[(a * self.world + self.rank) * self.micro:(a * self.world + self.rank + 1) * self.micro]
                for a in range(self.accum)]
