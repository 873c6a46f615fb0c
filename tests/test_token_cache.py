"""The item cache (engine/token_cache.py): built once per (tokenizer, data, settings), equal to the in-memory items,
never left half-written, read lazily, and a rank's memory does not grow with the corpus."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from engine import token_cache
from engine.config import load_config
from engine.data import DataError, chunk_documents, read_texts
from engine.modeling import load_tokenizer
from engine.stages import build_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM2VEC_ENGINE_TOKEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class _Counting:
    """Wraps a tokenizer and counts the texts it tokenises."""

    def __init__(self, tok):
        self.tok, self.texts = tok, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __len__(self):
        return len(self.tok)

    def __call__(self, texts, **kw):
        self.texts += 1 if isinstance(texts, str) else len(texts)
        return self.tok(texts, **kw)


def _mntp(overrides=()):
    cfg = load_config("configs/tiny/mntp.yaml", list(overrides))
    tok = _Counting(load_tokenizer(cfg.model))
    stage = build_stage(cfg, tok)
    tok.texts = 0  # (the stage tokenises its mask token)
    return cfg, tok, stage


def test_mntp_items_are_tokenised_once_and_equal_the_in_memory_blocks(tmp_path, _cache):
    docs = tmp_path / "docs.txt"
    docs.write_text("".join(f"document {i}: " + "some words here " * (i % 40) + "\n" for i in range(300)))
    cfg, tok, stage = _mntp([f"data={docs}", "max_seq_len=48"])
    items, stats, _ = stage.load(cfg.data, 0)
    texts, _ = read_texts([str(docs)], seed=cfg.seed)
    expected = chunk_documents(texts, tok.tok, 48)
    assert len(items) == len(expected) == stats.sources["blocks"] and items[:] == expected
    assert items[3] == expected[3] and items[-1] == expected[-1] and items[2:5] == expected[2:5]
    assert stats.kept == 300 and stats.read == 300
    again, stats2, _ = _mntp([f"data={docs}", "max_seq_len=48"])[2].load(cfg.data, 0)
    assert again[:] == expected and stats2.summary() == stats.summary()
    entries = sorted(os.listdir(_cache))
    # other settings or other data: another entry, never the stale one
    _mntp([f"data={docs}", "max_seq_len=32"])[2].load(cfg.data, 0)
    docs.write_text("changed text\n" * 50)
    changed, _, _ = _mntp([f"data={docs}", "max_seq_len=48"])[2].load(cfg.data, 0)
    assert len(os.listdir(_cache)) == len(entries) + 2
    assert changed[:] == chunk_documents(["changed text"] * 50, tok.tok, 48)


def test_the_seed_keys_an_entry_only_where_it_orders_the_items(tmp_path, _cache):
    """A corpus reads in its own order whatever the seed, so runs of several seeds share one entry (a 1M-sentence
    corpus was tokenised again per seed); an STS-style pair file's sentences are shuffled by the seed
    (engine.data.split_pairs), so there each seed has its own entry, holding that seed's order."""
    from engine.data import seed_orders

    docs = tmp_path / "docs.txt"
    docs.write_text("".join(f"document {i}: " + "some words here " * (i % 7) + "\n" for i in range(60)))
    sts = "data/stsbenchmark/sts-dev.csv"
    assert not seed_orders([str(docs)]) and seed_orders([str(docs), sts]) and not seed_orders(["hf:x"])
    for stage in ("mntp", "simcse"):
        cfg = load_config(f"configs/tiny/{stage}.yaml", [f"data={docs}"])
        first = build_stage(cfg, _Counting(load_tokenizer(cfg.model))).load(cfg.data, 0)[0][:]
        n = len(os.listdir(_cache))
        cfg = load_config(f"configs/tiny/{stage}.yaml", [f"data={docs}", "seed=7"])
        tok = _Counting(load_tokenizer(cfg.model))
        st = build_stage(cfg, tok)
        tok.texts = 0
        assert st.load(cfg.data, 0)[0][:] == first and len(os.listdir(_cache)) == n, stage  # the same entry
        # MNTP tokenised nothing; SimCSE's load checks its instruction's room on one text (its entry holds texts,
        # not tokens), and nothing more
        assert tok.texts == (1 if stage == "simcse" else 0), (stage, tok.texts)
        orders = []
        for seed in (1, 2):
            cfg = load_config(f"configs/tiny/{stage}.yaml", [f"data={sts}", f"seed={seed}"])
            orders.append(build_stage(cfg, _Counting(load_tokenizer(cfg.model))).load(cfg.data, 200)[0][:])
        assert orders[0] != orders[1] and len(os.listdir(_cache)) == n + 2, stage


def test_a_tokenizer_changed_under_the_same_path_is_another_entry(tmp_path):
    """The key covers a fast tokenizer's whole pipeline: a post-processor that now adds BOS (same path, vocabulary
    and special tokens) makes other MNTP blocks, so it must not find the old entry."""
    from transformers import AutoTokenizer

    from engine.data import chunk_documents

    path = tmp_path / "tok"
    load_tokenizer(load_config("configs/tiny/mntp.yaml").model).save_pretrained(path)
    docs, settings = ["hello world", "second line here"], {"stage": "mntp", "max_seq_len": 8}
    before = AutoTokenizer.from_pretrained(path)
    key = token_cache.cache_key(before, [], settings)
    assert token_cache.cache_key(AutoTokenizer.from_pretrained(path), [], settings) == key  # stable
    spec = json.loads((path / "tokenizer.json").read_text())
    bos = next(t for t in spec["added_tokens"] if t["content"] == "<|im_start|>")
    special = {"id": bos["content"], "ids": [bos["id"]], "tokens": [bos["content"]]}
    spec["post_processor"] = {"type": "TemplateProcessing", "special_tokens": {bos["content"]: special},
                              "single": [{"SpecialToken": {"id": bos["content"], "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]}
    (path / "tokenizer.json").write_text(json.dumps(spec))
    after = AutoTokenizer.from_pretrained(path)
    assert chunk_documents(docs, after, 8) != chunk_documents(docs, before, 8)  # the blocks now start with BOS
    assert token_cache.cache_key(after, [], settings) != key


def test_a_second_load_does_not_tokenise(tmp_path):
    docs = tmp_path / "docs.txt"
    docs.write_text("alpha beta gamma\n" * 100)
    cfg, tok, stage = _mntp([f"data={docs}"])
    stage.load(cfg.data, 0)
    assert tok.texts > 0
    cfg2, tok2, stage2 = _mntp([f"data={docs}"])
    stage2.load(cfg.data, 0)
    assert tok2.texts == 0


def test_a_failed_build_leaves_no_entry(tmp_path, _cache):
    calls = []

    def build(writer, progress):
        writer.add([1, 2, 3])
        calls.append(1)
        raise DataError("boom")

    with pytest.raises(DataError, match="boom"):
        token_cache.build_or_open("k1", "tokens", build)
    assert not [p for p in os.listdir(_cache) if p.startswith("k1")]  # neither the entry nor its temp folder

    def good(writer, progress):
        writer.add([4, 5])
        writer.add([6])
        return {"n": 2}

    items, meta = token_cache.build_or_open("k1", "tokens", good)
    assert items[:] == [[4, 5], [6]] and meta["stats"] == {"n": 2} and calls == [1]
    # a power cut after the rename can leave meta.json empty: that entry is rebuilt, not trusted or stuck
    (_cache / "k1" / "meta.json").write_text("")
    items, meta = token_cache.build_or_open("k1", "tokens", good)
    assert items[:] == [[4, 5], [6]] and json.loads((_cache / "k1" / "meta.json").read_text())["items"] == 2


def test_an_entry_another_host_finished_first_is_read_not_a_crash(_cache, monkeypatch):
    """Two hosts whose lock does not see the other's (NFS without lockd, Lustre localflock) build the same entry;
    the second rename found the first's folder there and raised (ENOTEMPTY), killing that node's ranks. The finished
    entry is read instead, and the second build's temporary folder removed."""
    import shutil

    real_rename = os.rename

    def other_host_first(src, dst):
        shutil.copytree(src, dst)  # the other host's identical, complete entry lands first
        return real_rename(src, dst)

    def build(writer, progress):
        writer.add([4, 5])
        writer.add([6])
        return {"n": 2}

    monkeypatch.setattr(token_cache.os, "rename", other_host_first)
    items, meta = token_cache.build_or_open("k2", "tokens", build)
    assert items[:] == [[4, 5], [6]] and meta["items"] == 2
    assert [p for p in os.listdir(_cache) if p.startswith("k2")] == ["k2"]


def test_simcse_and_supervised_items_come_from_the_cache(tmp_path):
    sts = os.path.join(ROOT, "data", "stsbenchmark", "sts-dev.csv")
    cfg = load_config("configs/tiny/simcse.yaml", [f"data={sts}"])
    stage = build_stage(cfg, load_tokenizer(cfg.model))
    items, stats, _ = stage.load(cfg.data, 200)
    texts, stats_mem = read_texts([sts], 200, dedup=True, seed=cfg.seed)
    assert isinstance(items, token_cache.CachedItems) and items[:] == texts
    counts = lambda st: {k: v for k, v in dataclasses.asdict(st).items() if k != "not_counted"}  # noqa: E731
    assert counts(stats) == counts(stats_mem)
    assert "truncated: per step at collate" in stats.summary()  # SimCSE cuts its texts per batch
    # the entry keeps counts only: what a stage does not count is the stage's to say when it reads it, so an entry
    # reads the same in engines with and without that field (and a field this engine does not know is left out)
    with open(os.path.join(items.folder, "meta.json")) as f:
        kept = json.load(f)["stats"]
    assert "not_counted" not in kept and kept["kept"] == stats.kept
    from engine.data import DataStats

    later = DataStats.from_cache({**kept, "counted_by_a_later_engine": 1}, not_counted=["truncated"])
    assert later.summary() == stats.summary()


RSS_SCRIPT = textwrap.dedent("""
    import os, sys, random
    sys.path.insert(0, {root!r})
    os.environ["LLM2VEC_ENGINE_TOKEN_CACHE"] = {cache!r}
    from engine.data import BlockChunker, chunk_documents, read_texts


    class WordTokenizer:  # a fast stand-in: one id per word, ids above 256 (no small-int sharing)
        eos_token_id, bos_token_id, all_special_ids = 2, None, [2]

        def __call__(self, texts, add_special_tokens=True, **kw):
            return {{"input_ids": [[300 + len(w) * 997 + ord(w[0]) for w in t.split()] for t in texts]}}

        def get_vocab(self):
            return {{"w": 0}}


    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) // 1024


    tok, path, mode = WordTokenizer(), {path!r}, sys.argv[1]
    import engine.stages.mntp  # imports (torch) counted in the baseline
    base = hwm()
    if mode == "memory":
        texts, _ = read_texts([path])
        items = chunk_documents(texts, tok, 512)
    else:
        from engine import token_cache
        from engine.data import DataStats, iter_texts, tokenized_batches

        def build(writer, progress):
            st, ch = DataStats(), BlockChunker(tok, 512)
            for ids in tokenized_batches(iter_texts([path], st), tok):
                for b in ch.feed(ids):
                    writer.add(b)
            for b in ch.finish():
                writer.add(b)
            return {{}}

        items, _ = token_cache.cached_items("tokens", tok, [path], {{}}, build, progress=False)
    rng = random.Random(0)
    for _ in range(200):  # what training reads: batches of random items
        batch = [items[rng.randrange(len(items))] for _ in range(8)]
    print(len(items), hwm() - base)
""")


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    """A 40 MB corpus (4.8M word tokens, 9,308 blocks): holding its texts and blocks in memory raised the peak RSS
    by 223 MB (measured on the 2-core dev machine, 2026-12-03), the cache's build and 200 random batch reads by
    21 MB (one tokenising batch, whatever the corpus size: benchmarks/bench_data.py). The bound between is 120 MB."""
    path = tmp_path / "corpus.txt"
    words = ["river", "valley", "storm", "violin", "bridge", "comet", "library", "noodle", "steel", "market"]
    line = " ".join(words[(i * 7) % 10] + str(i % 97) for i in range(60)) + "\n"
    with open(path, "w") as f:
        for _ in range(40_000_000 // len(line)):
            f.write(line)
    script = tmp_path / "rss.py"
    script.write_text(RSS_SCRIPT.format(root=ROOT, cache=str(tmp_path / "cache"), path=str(path)))
    out = {}
    for mode in ("memory", "cache"):
        res = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        out[mode] = [int(x) for x in res.stdout.split()]
    assert out["memory"][0] == out["cache"][0]  # the same blocks
    assert out["memory"][1] > 120, out
    assert out["cache"][1] < 120, out


def _rss_file_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status")


def test_random_reads_do_not_grow_the_rss(tmp_path, monkeypatch):
    """An epoch reads every item of an entry; if the data file were memory-mapped, each page read (and the kernel's
    read-around) would stay in the process's RSS, which would grow to the entry's size. Items are read with
    ``pread`` instead: 4,000 random reads over a 64 MB entry add (almost) nothing to the file-backed RSS.
    Measured with a memory-mapped data file (the code before this test): +65 MB here."""
    monkeypatch.setenv("LLM2VEC_ENGINE_TOKEN_CACHE", str(tmp_path / "cache"))
    n, length = 32768, 512

    def build(writer, progress):
        base = np.arange(length, dtype=np.uint32)
        for i in range(n):
            writer.add(base + i)
        return {}

    items, _ = token_cache.build_or_open("rss" + "0" * 29, "tokens", build, progress=False)
    assert len(items) == n and items[5][:3] == [5, 6, 7] and items[-1][-1] == n - 1 + length - 1
    before = _rss_file_mb()
    rng = np.random.default_rng(0)
    total = 0
    for i in rng.integers(0, n, 4000):
        item = items[int(i)]
        assert item[0] == i
        total += len(item)
    grown = _rss_file_mb() - before
    assert total == 4000 * length
    assert grown < 8, f"file-backed RSS grew by {grown:.0f} MB over 4,000 random reads"


def test_items_survive_pickling(tmp_path, monkeypatch):
    """A DataLoader worker or a spawned process gets the items by pickle: the copy reopens the data file."""
    import pickle

    monkeypatch.setenv("LLM2VEC_ENGINE_TOKEN_CACHE", str(tmp_path / "cache"))

    def build(writer, progress):
        for i in range(10):
            writer.add(list(range(i, i + 3)))
        return {}

    items, _ = token_cache.build_or_open("pk" + "0" * 30, "tokens", build, progress=False)
    copy = pickle.loads(pickle.dumps(items))
    assert copy[:] == items[:] and copy[9] == [9, 10, 11]


def test_readme_states_the_committed_data_scale_figures():
    """The README's memory claim is the committed 1 GB measurement (benchmarks/results/2026-12-03-cpu-data-scale/)."""
    import csv

    with open(os.path.join(ROOT, "benchmarks", "results", "2026-12-03-cpu-data-scale", "pread", "bench_data.csv")) as f:
        row = next(csv.DictReader(f))
    extra = dict(kv.split("=", 1) for kv in row["extra"].split(";"))
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = " ".join(f.read().split())
    assert row["gpu"] == "cpu" and float(extra["corpus_bytes"]) >= 1e9  # at least 1 GB of text, as issue 22 asks
    assert f"raise the peak RSS by {float(row['peak_mb']):.0f} MB" in readme
    assert f"tokenises in {float(row['ms']) / 1e3:.0f} s" in readme
    assert f"({int(extra['tokens']) / 1e6:.0f}M tokens)" in readme
    assert float(row["peak_mb"]) < 64  # bounded: one tokenising batch, not the corpus


def test_a_cache_without_file_locks_is_one_line(tmp_path, monkeypatch):
    """A token cache on a filesystem without flock (NFS without lockd, Lustre without -o flock): a ConfigError
    naming LLM2VEC_ENGINE_TOKEN_CACHE (exit 2 from every rank), not an OSError traceback."""
    import errno
    import fcntl

    from engine.config import ConfigError

    def no_locks(f, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setenv("LLM2VEC_ENGINE_TOKEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(ConfigError, match="no file lock on .*No locks available.*LLM2VEC_ENGINE_TOKEN_CACHE"):
        token_cache.build_or_open("k" * 16, "texts", lambda writer, progress: {})


def _two_items(writer, progress):
    writer.add([4, 5])
    writer.add([6])
    return {"n": 2}


def test_a_build_of_one_entry_does_not_wait_for_another_entrys_build(_cache, capsys):
    """One lock for the whole cache made a run needing entry B wait, silently and possibly for hours, while another
    process tokenised entry A. Each entry has its own lock now: B builds while A's build holds A's; a third process
    that needs A says it waits for it, then finds A built (A is built once)."""
    import threading

    started, release, calls, out = threading.Event(), threading.Event(), [], {}

    def slow_a(writer, progress):
        calls.append("a")
        started.set()
        assert release.wait(30)
        return _two_items(writer, progress)

    def run(name, key, build):
        try:
            out[name] = token_cache.build_or_open(key, "tokens", build, progress=False)[0][:]
        except BaseException as e:  # noqa: BLE001 (reported by the asserts below)
            out[name] = e

    threads = {"a": threading.Thread(target=run, args=("a", "a" * 32, slow_a))}
    try:
        threads["a"].start()
        assert started.wait(30)
        threads["b"] = threading.Thread(target=run, args=("b", "b" * 32, _two_items), daemon=True)
        threads["b"].start()
        threads["b"].join(20)
        assert out.get("b") == [[4, 5], [6]], "entry B waited for entry A's build"
        assert "a" not in out
        threads["a2"] = threading.Thread(target=run, args=("a2", "a" * 32, slow_a), daemon=True)
        threads["a2"].start()
        for _ in range(200):  # the waiting line, said before it waits
            if f"entry {'a' * 32} is being built by another process" in capsys.readouterr().out:
                break
            threads["a2"].join(0.05)
        else:
            pytest.fail("no line said that entry A is being built elsewhere and this process waits")
        assert "a2" not in out
    finally:
        release.set()
        for t in threads.values():
            t.join(30)
    assert out["a"] == out["a2"] == [[4, 5], [6]] and calls == ["a"]


def test_a_build_that_meets_bad_data_fails_every_waiting_rank_at_once(_cache, capsys):
    """The ranks of a run wait on one entry's lock for one build. When that build met bad data, each waiter took the
    lock in turn and built again to the same error: 8 ranks failed after 8 build times. Now the waiters re-raise the
    build's DataError (one build), and a later run, which did not wait on that build, builds again."""
    import threading

    started, release, calls, out = threading.Event(), threading.Event(), [], {}

    def bad(writer, progress):
        calls.append("bad")
        started.set()
        assert release.wait(30)
        raise DataError("rows.jsonl:1400000: field 'negative' must be a string, got null")

    def run(name, build):
        try:
            out[name] = token_cache.build_or_open("f" * 32, "json", build, progress=False)[0][:]
        except BaseException as e:  # noqa: BLE001 (reported by the asserts below)
            out[name] = e

    threads = [threading.Thread(target=run, args=("r0", bad), daemon=True)]
    threads[0].start()
    assert started.wait(30)
    threads += [threading.Thread(target=run, args=(f"r{r}", bad), daemon=True) for r in (1, 2, 3)]
    for t in threads[1:]:
        t.start()
    said = ""
    for _ in range(400):  # every waiter has said that it waits (so it waits on the lock) before the build fails
        said += capsys.readouterr().out
        if said.count("this one waits for it") == 3:
            break
        threads[0].join(0.05)
    else:
        pytest.fail(f"the waiters did not all wait: {said!r}")
    release.set()
    for t in threads:
        t.join(30)
    assert calls == ["bad"], "a waiting rank built the entry again"
    assert [str(out[f"r{r}"]) for r in range(4)] == [str(out["r0"])] * 4 and isinstance(out["r3"], DataError)
    assert "'negative' must be a string" in str(out["r0"])
    assert token_cache.build_or_open("f" * 32, "json", lambda w, p: (w.add({"x": 1}), {})[1])[0][:] == [{"x": 1}]


def test_only_bad_data_is_kept_for_the_waiting_ranks_and_only_for_its_entry(_cache, monkeypatch):
    """The record a failed build leaves for the ranks waiting on it holds bad data (a DataError) of that entry only:
    another failure (a filesystem or tokenizer error) is raised by the builder alone and the next build tries again,
    and another entry (another run sharing the cache root) builds. One clock instant stands for "while it waited"."""
    import types

    monkeypatch.setattr(token_cache, "time", types.SimpleNamespace(time=lambda: 100.0))

    def good(writer, progress):
        writer.add({"x": 1})
        return {}

    def crash(writer, progress):
        raise RuntimeError("tokenizer thread died")

    def bad(writer, progress):
        raise DataError("a.jsonl:3: bad row")

    with pytest.raises(RuntimeError):
        token_cache.build_or_open("c" * 32, "json", crash, progress=False)
    assert token_cache.build_or_open("c" * 32, "json", good, progress=False)[0][:] == [{"x": 1}]
    with pytest.raises(DataError, match="bad row"):
        token_cache.build_or_open("a" * 32, "json", bad, progress=False)
    with pytest.raises(DataError, match="bad row"):  # a rank that waited on that build: its error, no build
        token_cache.build_or_open("a" * 32, "json", good, progress=False)
    assert token_cache.build_or_open("b" * 32, "json", good, progress=False)[0][:] == [{"x": 1}]


def test_a_killed_builds_temp_folder_is_removed_by_a_build_of_any_entry(_cache):
    """A build killed before its rename left ``<key>.tmp-<host>-<pid>`` (corpus-sized) until a later build of the
    same key; after a settings change (a new key) it stayed for ever. A build of any entry removes this host's temp
    folders whose process is gone, and keeps a live process's and another host's."""
    import socket

    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _cache.mkdir(parents=True, exist_ok=True)
        folders = {"dead": f"{'d' * 32}.tmp-{host}-{dead.pid}", "live": f"{'e' * 32}.tmp-{host}-{live.pid}",
                   "other_host": f"{'f' * 32}.tmp-{host}x-{dead.pid}",
                   "other_host_dash": f"{'f' * 32}.tmp-{host}-b-{dead.pid}"}
        for name in folders.values():
            (_cache / name).mkdir()
            (_cache / name / "data.bin").write_bytes(b"\0" * 64)
        items, _ = token_cache.build_or_open("c" * 32, "tokens", _two_items, progress=False)
        assert items[:] == [[4, 5], [6]]
        left = set(os.listdir(_cache))
        assert folders["dead"] not in left
        assert {folders["live"], folders["other_host"], folders["other_host_dash"]} <= left
    finally:
        live.kill()
        live.wait()


def test_a_jsonl_file_and_a_byte_identical_txt_file_are_other_entries(tmp_path):
    """A ``.jsonl`` file is read by its "text" fields, a ``.txt`` file by its lines: the same bytes under the two
    extensions are other items, so they must not share a key (the second run was served the first's items)."""
    body = "".join(json.dumps({"text": f"sentence number {i}"}) + "\n" for i in range(30))
    (tmp_path / "c.jsonl").write_text(body)
    (tmp_path / "c.txt").write_text(body)
    settings = {"stage": "simcse"}
    keys = [token_cache.cache_key(None, [str(tmp_path / n)], settings) for n in ("c.jsonl", "c.txt")]
    assert keys[0] != keys[1]
    loaded = []
    for name in ("c.jsonl", "c.txt"):
        cfg = load_config("configs/tiny/simcse.yaml", [f"data={tmp_path / name}"])
        loaded.append(build_stage(cfg, load_tokenizer(cfg.model)).load(cfg.data, 0)[0][:])
    assert loaded[0] == read_texts([str(tmp_path / "c.jsonl")])[0] and loaded[0][0] == "sentence number 0"
    assert loaded[1] == read_texts([str(tmp_path / "c.txt")])[0] and loaded[1][0].startswith('{"text"')


def test_entries_built_under_older_read_rules_are_rebuilt(tmp_path, _cache, monkeypatch):
    """A reader that now refuses what it once read (a lone surrogate, a non-STS table) must not be bypassed by an
    entry an older engine built: data.READ_RULES is in every stage's key. Under unchanged rules the entry is reused;
    under newer ones each stage builds a new entry."""
    from engine import data

    docs = tmp_path / "docs.txt"
    docs.write_text("".join(f"sentence number {i}\n" for i in range(40)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"p{i}", "negative": f"n{i}"}) + "\n"
                             for i in range(8)))

    def entries():
        return sorted(n for n in os.listdir(_cache) if not n.startswith("."))

    def load_all():
        for stage, src in (("mntp", docs), ("simcse", docs), ("supervised", pairs)):
            cfg = load_config(f"configs/tiny/{stage}.yaml", [f"data={src}"])
            build_stage(cfg, load_tokenizer(cfg.model)).load(cfg.data, 0)

    load_all()
    first = entries()
    assert len(first) == 3
    load_all()
    assert entries() == first  # reused
    monkeypatch.setattr(data, "READ_RULES", data.READ_RULES + 1)
    load_all()
    assert len(entries()) == 6 and set(first) < set(entries())  # three new entries, the old ones untouched


@pytest.mark.parametrize("name,cut", [("offsets.bin", 8), ("groups.bin", 4), ("data.bin", 1), ("data.bin", -1)])
def test_a_truncated_entry_file_is_a_clear_error_on_open(_cache, name, cut):
    """Only meta.json was checked: an entry whose offsets.bin, groups.bin or data.bin a copy between nodes cut
    short was read (and failed hours later, or dropped items). Opening it is now one DataError naming the folder
    to delete."""
    def build(writer, progress):
        for i in range(5):
            writer.add({"query": f"q{i}", "source": f"s{i % 2}"}, group=f"s{i % 2}")
        return {}

    items, _ = token_cache.build_or_open("g" * 32, "json", build, progress=False)
    assert len(items) == 5 and list(items.groups) == ["s0", "s1", "s0", "s1", "s0"]
    del items
    path = _cache / ("g" * 32) / name
    data = path.read_bytes()
    path.write_bytes(data[:-cut] if cut > 0 else data + b"\0" * -cut)
    with pytest.raises(DataError, match=f"damaged item cache entry .*{'g' * 32}: {name} is .*delete the folder"):
        token_cache.build_or_open("g" * 32, "json", build, progress=False)


def test_folders_whose_names_hold_glob_characters_are_keyed_by_their_files(tmp_path):
    """A folder's files were listed with glob on its unescaped path: ``e5[v1]`` is a pattern (``e5v`` or ``e51``),
    so it listed nothing, and two such folders with other files had the same cache key (the second run was served
    the first's entry) and the same checkpoint data identity (a resume missed the change)."""
    folders = [tmp_path / "e5[v1]", tmp_path / "e5[v2]*?"]
    for i, folder in enumerate(folders):
        folder.mkdir()
        (folder / "msmarco.jsonl").write_text(json.dumps({"query": f"q{i}", "positive": "p", "negative": "n"}) + "\n")
    idents = [token_cache.source_identity(str(f)) for f in folders]
    assert [[name for name, _ in ident["dir"]] for ident in idents] == [["msmarco.jsonl"]] * 2
    assert idents[0] != idents[1]
    settings = {"stage": "supervised"}
    assert token_cache.cache_key(None, [str(folders[0])], settings) != token_cache.cache_key(None, [str(folders[1])],
                                                                                              settings)
    assert token_cache.data_identity([str(folders[0])], 1) != token_cache.data_identity([str(folders[1])], 1)


def test_a_temp_folder_named_with_this_hosts_name_and_this_pid_does_not_block_the_build(_cache):
    """A build killed in a container that restarts under the same host name and pid (a StatefulSet, a persistent
    cache volume) left ``<key>.tmp-<host>-<pid>`` with this process's pid: the sweep skipped it as this process's own
    and ``os.makedirs`` then failed on it, so every later build of the entry failed. Under the entry's lock no build
    of it is live, this process's included: the folder is removed and the entry built. Another entry's folder with
    this pid is kept (it may be this process's build in another thread)."""
    import socket

    host, pid = socket.gethostname(), os.getpid()
    _cache.mkdir(parents=True, exist_ok=True)
    left = _cache / f"{'h' * 32}.tmp-{host}-{pid}"
    other = _cache / f"{'i' * 32}.tmp-{host}-{pid}"
    for folder in (left, other):
        folder.mkdir()
        (folder / "data.bin").write_bytes(b"\1" * 64)  # a killed build's half-written items
    items, meta = token_cache.build_or_open("h" * 32, "tokens", _two_items, progress=False)
    assert items[:] == [[4, 5], [6]] and meta["items"] == 2 and meta["stats"] == {"n": 2}
    assert not left.exists() and other.exists()


def test_bench_datas_cache_hit_hashes_the_corpus_as_a_fresh_process_does(tmp_path, monkeypatch):
    """token_cache remembers a source's SHA-256 for the life of the process, so bench_data's second load, timed as
    the cache hit another rank or a resumed run sees, skipped the hashing those pay (the 1 GB hit measured 1.1 s,
    the SHA-256 of the file). The timed hit hashes the corpus again: two hashes of it in the run, not one."""
    from benchmarks import bench_data

    docs = tmp_path / "docs.txt"
    docs.write_text("".join(f"document {i}: some words here\n" for i in range(50)))
    hashed, real = [], token_cache.sha256_of
    monkeypatch.setattr(token_cache, "sha256_of", lambda path: hashed.append(os.path.abspath(path)) or real(path))
    row = bench_data.main(["--corpus", str(docs), "--batches", "1", "--max-seq-len", "16",
                           "--out", str(tmp_path / "bench_data.csv")])
    assert hashed.count(str(docs)) == 2
    assert "cache_hit_s=" in row["extra"]
