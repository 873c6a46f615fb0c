"""A disk cache of training items that every rank and every resumed run reads lazily.

A stage's items are written once to ``<root>/<key>/``: ``data.bin`` holds the items back to back (MNTP: token ids
as uint32; SimCSE and supervised: UTF-8 JSON, tokenised per batch in ``collate`` because their tokenisation
depends on the instruction and the chat wrap), ``offsets.bin`` the int64 boundaries (item i is
``data[offsets[i]:offsets[i + 1]]``), ``groups.bin`` an int32 group per item where batches are grouped, and
``meta.json`` the counts (:class:`engine.data.DataStats`) and the group names. An item is read with one
``os.pread`` of its bytes when its batch is collated, and costs memory only while the batch lives; the small
per-item arrays (offsets, groups: 8 and 4 bytes an item) are memory-mapped. So a rank's memory does not grow with
the corpus: the batch plan keeps one index per item, and the page cache, shared by the ranks and reclaimable,
holds what was read. The data file is deliberately not memory-mapped: a mapping keeps every page a random read
touched (and the kernel's read-around of it, ~40 kB per 2 kB block measured) in the process's RSS, so over an
epoch a rank's RSS would grow to the size of the data file (measured: +255 MB of file-backed RSS after 200
random batches of 32 blocks from a 1 GB corpus's entry; +0 MB with ``pread``).

The key is a SHA-256 of the tokenizer's identity (class, name, hashes of its vocabulary and of its whole pipeline,
its special tokens, its EOS and BOS/EOS flags),
each source's content (SHA-256 of a local file, with its extension, which decides how it is read: a ``.jsonl``
file's ``text`` fields, a ``.txt`` file's lines; the spec and the ``datasets`` fingerprint of an ``hf:`` source)
and the settings that shape the items (stage, max_seq_len, max_samples, the seed where it orders them: an STS
pair file, ...): another tokenizer, other
data or other settings is another entry, never a stale one.

One process builds an entry, under an exclusive lock on that entry (``<root>/.locks/<key>.lock``, fcntl): the
ranks that wait on the lock then find the entry complete, and a run that needs another entry does not wait. A
process that finds the lock taken says so in one line (which entry, that it waits) before it waits. A build that
meets bad data (a :class:`engine.data.DataError`) records it (``<root>/.locks/<key>.failed``), and the processes
that waited on that build raise it rather than build again in turn; a later run builds again. A build writes
into ``<key>.tmp-<host>-<pid>/`` and renames it into place, so a killed build leaves no entry, only a temp folder:
the next build on that host, of any entry, removes every temp folder of this host whose process is gone (never
another host's, nor one whose process lives), and every one of its own entry's (under that entry's lock none is
live, even one named with the builder's own pid: a container restarted under the same host name and pid).
``meta.json`` is written last and fsynced before the rename; an entry whose ``meta.json`` does not read (a power
cut) is rebuilt. An entry whose other files do not have the sizes its ``meta.json`` gives (a copy between nodes
cut short) is not read: opening it is a :class:`engine.data.DataError` that names the folder to delete.

Root: ``$LLM2VEC_ENGINE_TOKEN_CACHE`` if set, else ``$LLM2VEC_ENGINE_CACHE/tokens`` (``~/.cache/llm2vec-engine``).
"""
import fcntl
import glob
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Sequence

import numpy as np

from .assets import CacheLockError, cache_dir, cache_lock, sha256_of
from .config import ConfigError
from . import data
from .data import DataError
from .files import pid_alive, sync_folder, write_json

FORMAT = 3  # 2: the tokenizer's pipeline, EOS and BOS/EOS flags in the key; 3: .JSONL/.ndjson as JSON, line BOMs
_DTYPES = {"tokens": np.uint32, "json": np.uint8}


def cache_root():
    return os.environ.get("LLM2VEC_ENGINE_TOKEN_CACHE") or os.path.join(cache_dir(), "tokens")


def tokenizer_identity(tokenizer):
    """What makes two tokenizers give the same ids: class, name, vocabulary, special tokens, and the whole of a fast
    tokenizer's pipeline (its serialisation: normaliser, pre-tokeniser, merges, post-processor, added tokens), with
    its EOS and BOS/EOS flags (what an MNTP block is built from). A tokenizer whose files changed
    under the same name (a fixed post-processor that now adds BOS) is another entry. Nothing is tokenised here."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    h = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8", "surrogatepass"))
    specials = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pipeline = hashlib.sha256(backend.to_str().encode("utf-8", "surrogatepass")).hexdigest() if backend else None
    vocab_file = getattr(tokenizer, "vocab_file", None)  # a slow (SentencePiece) tokenizer's model file
    if pipeline is None and isinstance(vocab_file, str) and os.path.isfile(vocab_file):
        pipeline = sha256_of(vocab_file)
    return {"class": type(tokenizer).__name__, "name": getattr(tokenizer, "name_or_path", ""),
            "vocab_sha256": h.hexdigest(), "vocab_size": len(vocab), "specials": specials,
            "pipeline_sha256": pipeline, "eos": getattr(tokenizer, "eos_token_id", None),
            "add": {k: getattr(tokenizer, k, None) for k in ("add_bos_token", "add_eos_token")}}


_HASHED = {}  # (path, size, mtime) -> sha256: a run hashes a source for its cache key and again for its identity


def _sha256_once(path):
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_of(path)
    return _HASHED[key]


def data_identity(sources, n_items):
    """What a checkpoint records of its run's data, beside the paths its fingerprint holds: the item count, a hash
    of every source's content (:func:`source_identity`) and the rules that read them (``engine.data.READ_RULES``),
    so that a resume notices data changed under the same paths, or read otherwise by a newer engine (its batches
    would differ)."""
    ident = json.dumps([source_identity(s) for s in sources], sort_keys=True, default=str)
    return {"items": int(n_items), "sha256": hashlib.sha256(ident.encode()).hexdigest()[:32],
            "read_rules": data.READ_RULES}


def source_identity(src):
    """A local file or directory by the SHA-256 of its content; an ``hf:`` spec by the spec and the dataset's
    fingerprint where ``datasets`` gives one."""
    if src.startswith("hf:"):
        from .data import _load_hf

        return {"hf": src, "fingerprint": getattr(_load_hf(src), "_fingerprint", None)}
    if os.path.isdir(src):
        # (escaped: a folder named "e5[v1]" is a pattern matching "e5v" or "e51", and listed nothing)
        files = sorted(f for f in glob.glob(os.path.join(glob.escape(src), "*")) if os.path.isfile(f))
        return {"dir": [(os.path.basename(f), _sha256_once(f)) for f in files]}
    if os.path.isfile(src):
        return {"file": _sha256_once(src)}
    return {"missing": src}  # the reader reports it


def _keyed_source(src):
    """:func:`source_identity`, with a local file's extension: how a file is read depends on it
    (``engine.data``: a ``.jsonl``/``.json``/``.ndjson`` file's ``text`` fields, another file's lines), so
    byte-identical ``c.jsonl`` and ``c.txt`` are other items. (A directory's files are named with theirs already.
    The checkpoint's :func:`data_identity` is left as it was: its fingerprint holds the paths.)"""
    ident = source_identity(src)
    if "file" in ident:
        ident = {**ident, "ext": os.path.splitext(src)[1]}
    return ident


def cache_key(tokenizer, sources, settings):
    ident = {"format": FORMAT, "tokenizer": tokenizer_identity(tokenizer) if tokenizer is not None else None,
             "sources": [_keyed_source(s) for s in sources], "settings": settings}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


class _Writer:
    """Appends items to an entry's files; offsets and groups are flushed in chunks, so building holds one chunk."""

    def __init__(self, folder, kind):
        self.folder, self.kind, self.dtype = folder, kind, _DTYPES[kind]
        self.data = open(os.path.join(folder, "data.bin"), "wb")
        self.offsets = open(os.path.join(folder, "offsets.bin"), "wb")
        self.groups = open(os.path.join(folder, "groups.bin"), "wb")
        self.group_names = {}
        self.end, self.n = 0, 0
        self._off, self._grp = [0], []

    def add(self, item, group=None):
        if self.kind == "tokens":
            arr = np.asarray(item, dtype=self.dtype)
        else:
            arr = np.frombuffer(json.dumps(item, ensure_ascii=False).encode("utf-8", "surrogatepass"), np.uint8)
        arr.tofile(self.data)
        self.end += len(arr)
        self.n += 1
        self._off.append(self.end)
        if group is not None:
            self._grp.append(self.group_names.setdefault(group, len(self.group_names)))
        if len(self._off) >= 65536:
            self._flush()

    def _flush(self):
        np.asarray(self._off, dtype=np.int64).tofile(self.offsets)
        np.asarray(self._grp, dtype=np.int32).tofile(self.groups)
        self._off, self._grp = [], []

    def close(self):
        self._flush()
        for f in (self.data, self.offsets, self.groups):
            f.flush()
            os.fsync(f.fileno())
            f.close()


def _complete(folder):
    """An entry is complete when its meta.json, written last, reads whole (a power cut after the rename could
    leave it empty: that entry is rebuilt, not trusted)."""
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            return isinstance(json.load(f), dict)
    except (OSError, ValueError):
        return False


def cached_items(kind, tokenizer, sources, settings, build, progress=True):
    """:func:`build_or_open` under :func:`cache_key` (``tokenizer`` None: the items are texts, not ids)."""
    return build_or_open(cache_key(tokenizer, sources, settings), kind, build, progress)


def source_bytes(sources):
    """Total size of the local sources (the tokenising bar's total; None with an ``hf:`` source)."""
    total = 0
    for s in sources:
        if s.startswith("hf:") or not os.path.exists(s):
            return None
        files = [os.path.join(s, f) for f in os.listdir(s)] if os.path.isdir(s) else [s]
        total += sum(os.path.getsize(f) for f in files if os.path.isfile(f))
    return total


def build_or_open(key, kind, build, progress=True):
    """The cached entry ``key``, built first if absent: ``build(writer, progress)`` adds the items and returns a
    JSON-able dict (the stats) stored in ``meta.json``. Returns (:class:`CachedItems`, meta dict)."""
    root = cache_root()
    folder = os.path.join(root, key)
    if not _complete(folder):
        try:
            _build_locked(root, folder, kind, build, progress)
        except CacheLockError as e:
            raise ConfigError(f"item cache: {e}; set LLM2VEC_ENGINE_TOKEN_CACHE to a folder on a filesystem with "
                              f"file locks") from None
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    return CachedItems(folder, meta), meta


def _say(msg):
    """One line on stdout from rank 0 (or a process outside a launched run); no torch import for it."""
    if os.environ.get("RANK", "0") in ("", "0"):
        print(f"[engine] {msg}", flush=True)


def _entry_lock(root, key):
    """An exclusive lock (fcntl) on ``<root>/.locks/<key>.lock``: one entry's, so that a run needing another entry
    does not wait behind a build of this one. Taken at once when free; when not, one line says which entry another
    process is building and that this one waits, then it waits. Released if the process dies. CacheLockError when
    there is no lock to be had (a read-only folder, a filesystem without flock)."""
    return cache_lock(os.path.join(root, ".locks"), f"{key}.lock", on_wait=lambda path: _say(
        f"item cache: entry {key} is being built by another process (it holds {path}); this one waits for it"))


def _lock_free(root, key):
    """Whether nobody holds entry ``key``'s lock now (no lock file: nobody does). A process in another PID namespace
    under the same host name looks gone to :func:`engine.files.pid_alive`, but its lock is seen."""
    try:
        # read-write: NFS emulates flock with fcntl byte-range locks, and an exclusive one needs a writable file
        fd = os.open(os.path.join(root, ".locks", f"{key}.lock"), os.O_RDWR)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # (closing releases a lock taken here)
    return True


def _sweep_dead_builds(root, key, host):
    """Remove this host's temp folders ``<k>.tmp-<host>-<pid>`` of builds killed before their rename, whatever their
    entry: all of ``key``'s (the caller holds its lock, so none is a live build, not even one named with this
    process's pid: a build killed in a container that restarted under the same host name and pid, on a persistent
    cache volume, left one, and ``os.makedirs`` of this build's folder failed on it for ever) and those of any
    other entry whose process is gone and whose lock is free. Another host's are never touched (its pids are not
    ours to ask; a lock that is not coherent across hosts must not let one host sweep another's build in
    progress)."""
    tag = f".tmp-{host}-"
    for stale in glob.glob(os.path.join(glob.escape(root), f"*{glob.escape(tag)}*")):
        name = os.path.basename(stale)
        k, _, pid = name.partition(tag)
        if not pid.isdigit() or not os.path.isdir(stale):
            continue  # (another host whose name starts with this one's: "<k>.tmp-<host>-b-<pid>")
        # (another entry's folder named with this process's pid is kept: pid_alive finds this process alive, and it
        # may be building that entry in another thread)
        if k == key or (not pid_alive(int(pid)) and _lock_free(root, k)):
            shutil.rmtree(stale, ignore_errors=True)


def _failure_path(root, key):
    return os.path.join(root, ".locks", f"{key}.failed")


def _failed_since(root, key, since):
    """The DataError text of a build of ``key`` that failed at or after time ``since`` (None: none did). The ranks of
    a run wait on one lock for one build: when that build meets bad data, each waiter re-raises its error instead of
    building again, one after another (8 ranks took 8 build times to fail, and could outlast the collectives'
    timeout). An older failure (an earlier run) is built again: the key holds the data's content, so a fixed
    file is another entry anyway."""
    try:
        with open(_failure_path(root, key), encoding="utf-8") as f:
            failed = json.load(f)
        return failed["error"] if float(failed["time"]) >= since else None
    except (OSError, ValueError, KeyError, TypeError):  # none, or a torn record: build
        return None


def _build_locked(root, folder, kind, build, progress):
    """Build the entry ``folder`` under its lock (unless another process finished it meanwhile, or its build failed
    on bad data while this one waited: :func:`_failed_since`)."""
    host = socket.gethostname()
    key = os.path.basename(folder)
    waited_from = time.time()
    with _entry_lock(root, key):
        if not _complete(folder):
            failed = _failed_since(root, key, waited_from)
            if failed is not None:
                raise DataError(failed)
            _sweep_dead_builds(root, key, host)  # builds killed before their rename, on this host
            if os.path.isdir(folder) and not _complete(folder):  # a meta.json that does not read: rebuilt (asked
                shutil.rmtree(folder)  # again just before: another host may have finished it meanwhile)
            tmp = f"{folder}.tmp-{host}-{os.getpid()}"
            os.makedirs(tmp)
            try:
                writer = _Writer(tmp, kind)
                try:
                    stats = build(writer, progress)
                except DataError as e:  # bad data: the ranks waiting on this lock say it too (_failed_since)
                    try:
                        write_json(_failure_path(root, key), {"error": str(e), "time": time.time()}, indent=None)
                    except OSError:  # (then they build and meet it themselves, as before)
                        pass
                    raise
                writer.close()
                names = sorted(writer.group_names, key=writer.group_names.get)
                meta = {"format": FORMAT, "kind": kind, "items": writer.n, "stats": stats, "groups": names or None}
                write_json(os.path.join(tmp, "meta.json"), meta, indent=None)  # fsynced, then its folder
                try:
                    os.rename(tmp, folder)
                except OSError:
                    if not _complete(folder):
                        raise
                    # another host finished the same entry first (a lock not coherent across hosts let both build
                    # it): its items are these, so this build is dropped and that entry read
                else:
                    sync_folder(root)  # the rename itself survives a power cut
            finally:
                shutil.rmtree(tmp, ignore_errors=True)


class CachedItems(Sequence):
    """The items of a cache entry, read on access: ``items[i]`` (a list of ids, or the stored JSON value) and
    ``items[a:b]`` (a list of those) read only what they return."""

    def __init__(self, folder, meta):
        self.folder, self.kind, self.n = folder, meta["kind"], meta["items"]
        self.dtype = np.dtype(_DTYPES[self.kind])
        names = meta.get("groups")
        self._check_size("offsets.bin", 8 * (self.n + 1))
        if names:
            self._check_size("groups.bin", 4 * self.n)
        self.offsets = self._map("offsets.bin", np.int64)
        self._check_size("data.bin", self.dtype.itemsize * int(self.offsets[-1]))
        self._fd = os.open(os.path.join(folder, "data.bin"), os.O_RDONLY)
        self.groups = None
        if names:
            idx = self._map("groups.bin", np.int32)
            self.groups = _Labels(idx, names)

    def _check_size(self, name, expected):
        """A file of the entry with the size its ``meta.json`` gives (``offsets.bin``: 8 bytes per item and one;
        ``groups.bin``: 4 per item where batches are grouped; ``data.bin``: the item size times the last offset),
        else a DataError naming the folder to delete: a copy between nodes cut short would otherwise be read, and
        fail hours later or drop items."""
        path = os.path.join(self.folder, name)
        try:
            size = f"{os.path.getsize(path)} bytes"
        except FileNotFoundError:
            size = "missing"
        if size != f"{expected} bytes":
            raise DataError(f"damaged item cache entry {self.folder}: {name} is {size}, its meta.json ({self.n} "
                            f"{self.kind} items) needs {expected} bytes (a copy or write cut short?); delete the "
                            f"folder {self.folder} and the entry is built again")

    def _map(self, name, dtype):
        path = os.path.join(self.folder, name)
        if os.path.getsize(path) == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def __len__(self):
        return self.n

    def __del__(self):
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def __getstate__(self):  # a DataLoader worker or a spawned process reopens the file
        state = dict(self.__dict__)
        del state["_fd"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fd = os.open(os.path.join(self.folder, "data.bin"), os.O_RDONLY)

    def read(self, i):
        """Item ``i``'s raw array (token ids, or the JSON's UTF-8 bytes), read with one ``pread``."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        size = self.dtype.itemsize
        buf = os.pread(self._fd, (end - start) * size, start * size)
        if len(buf) != (end - start) * size:
            raise OSError(f"{self.folder}/data.bin is shorter than its offsets say (item {i}): a damaged cache "
                          f"entry; delete the folder to rebuild it")
        return np.frombuffer(buf, dtype=self.dtype)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        chunk = self.read(i)
        if self.kind == "tokens":
            return chunk.tolist()
        return json.loads(chunk.tobytes().decode("utf-8", "surrogatepass"))


class _Labels(Sequence):
    """Group names per item, read from the memory-mapped group indices (what ``BatchPlan(groups=...)`` reads)."""

    def __init__(self, idx, names):
        self.idx, self.names = idx, names

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.names[k] for k in self.idx[i].tolist()]
        return self.names[int(self.idx[i])]

    def __iter__(self):
        names = self.names
        for start in range(0, len(self.idx), 65536):
            for k in self.idx[start:start + 65536].tolist():
                yield names[k]
