"""Data at scale: peak memory and time of loading a large MNTP corpus through the item cache.

Generates a text corpus of ``--gb`` GB (lines of 1 kB drawn from a seeded pool of word sequences: the
content only has to tokenise like prose), then runs the MNTP stage's real ``load`` with SmolLM2's tokenizer
(tokenise once into the on-disk cache, ``engine/token_cache.py``: each item read when drawn, the offsets
memory-mapped), opens it a second time (a resumed run or another rank: a cache hit, timed with the corpus hashed
again for its key, as such a process does), and reads ``--batches`` random global batches as training does.

Memory: ``VmHWM`` (peak RSS) of this process, minus its value after the imports and the tokenizer load, is the
figure the whole run (build, cache hit and batch reads) adds. A thread samples ``/proc/self/status`` every 0.2 s
and reports the two parts of RSS apart: ``RssAnon`` (private memory: what a rank really costs) and ``RssFile``
(pages of mapped files: shared with the page cache, reclaimable, but counted in RSS), each as its peak over the
baseline. ``--path memory`` runs the old in-memory path (``read_texts`` + ``chunk_documents``) instead, for a
smaller corpus.

    python -m benchmarks.bench_data --gb 1 --out benchmarks/results/2026-12-03-cpu-data-scale/bench_data.csv

One CSV row (benchmarks/common.py's columns): ms = the first load (tokenising included), peak_mb = the added
peak RSS; extra: tokens, blocks, corpus bytes, tokenising throughput, cache-hit seconds, RssAnon, VmHWM total.
"""
import os
import random
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import check_outputs, cli_error, parser  # noqa: E402
from engine.cli import int_at_least, nonnegative_int, positive_float  # noqa: E402

WORDS = ("the river valley storm flooded after summer heat dried violinist played concerto town hall sold "
         "instrument market old bridge rebuilt steel collapsed before anyone could cross young chef opened small "
         "noodle shop downtown gave up cooking study law comet visible northern hemisphere burned atmosphere long "
         "ago city library lends telescopes members closed doors fire engine trains encoder model language text "
         "embedding retrieval passage question answer wikipedia article history science 1950 1987 2024 of and in "
         "to a is was for on with as by at from").split()


def status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_corpus(path, n_bytes, seed=0):
    """Lines of ~1 kB drawn from a pool of 4096 seeded random word sequences, up to n_bytes."""
    rng = random.Random(seed)
    pool = []
    for _ in range(4096):
        words, size = [], 0
        while size < 1000:
            w = rng.choice(WORDS)
            words.append(w.capitalize() if rng.random() < 0.08 else w)
            size += len(w) + 1
        pool.append(" ".join(words) + ".\n")
    written = 0
    with open(path, "w") as f:
        while written < n_bytes:
            line = pool[rng.randrange(len(pool))]
            f.write(line)
            written += len(line)
    return written


def main(argv=None):
    ap = parser(__doc__.split("\n")[0])
    ap.add_argument("--gb", type=positive_float, default=1.0, help="corpus size in GB (1e9 bytes)")
    ap.add_argument("--corpus", help="an existing text file instead of a generated one")
    ap.add_argument("--path", choices=("cache", "memory"), default="cache")
    ap.add_argument("--max-seq-len", type=int_at_least(2), default=512, help="tokens per block (>= 2, as the config)")
    ap.add_argument("--batches", type=nonnegative_int, default=200,
                    help="random global batches of 32 blocks read after load")
    ap.add_argument("--out", default="bench_data.csv")
    args = ap.parse_args(argv)
    check_outputs(args, "--out")  # said now, not after minutes of tokenising
    from engine.data import DataError, check_sources

    if args.corpus is not None:
        try:
            check_sources([args.corpus], e5_folders=False)
        except DataError as e:
            cli_error(f"--corpus: {e}")
    work = tempfile.mkdtemp(prefix="bench_data_")
    try:
        return _run(args, work)
    except DataError as e:  # a corpus the reader refuses: one line, exit 2
        cli_error(e)
    finally:  # the generated corpus and the token cache, also after a failure
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def _run(args, work):
    from engine.config import load_config
    from engine.modeling import load_tokenizer
    from engine.stages import build_stage

    from benchmarks.common import CsvWriter

    os.environ["LLM2VEC_ENGINE_TOKEN_CACHE"] = os.path.join(work, "cache")
    corpus = args.corpus
    if corpus is None:
        corpus = os.path.join(work, "corpus.txt")
        t = time.time()
        write_corpus(corpus, int(args.gb * 1e9))
        print(f"[bench_data] wrote {os.path.getsize(corpus) / 1e9:.2f} GB in {time.time() - t:.0f} s", flush=True)
    n_bytes = os.path.getsize(corpus)
    cfg = load_config("configs/smollm2-135m/mntp.yaml", [f"data={corpus}", f"max_seq_len={args.max_seq_len}"])
    tok = load_tokenizer(cfg.model)
    stage = build_stage(cfg, tok)
    base_hwm = status_mb("VmHWM")
    base_anon, base_file = status_mb("RssAnon"), status_mb("RssFile")
    peaks = {"RssAnon": base_anon, "RssFile": base_file}
    done = threading.Event()

    def sample():  # peak of each part of RSS (VmHWM is only their sum's peak)
        while not done.wait(0.2):
            for k in peaks:
                peaks[k] = max(peaks[k], status_mb(k))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    t = time.time()
    if args.path == "cache":
        items, stats, _ = stage.load(cfg.data, 0)
    else:
        from engine.data import chunk_documents, read_texts

        texts, stats = read_texts(cfg.data, 0, seed=cfg.seed)
        items = chunk_documents(texts, tok, cfg.max_seq_len, progress=True)
    first_s = time.time() - t
    hit_s = float("nan")
    if args.path == "cache":
        from engine import token_cache

        # what another rank or a resumed run pays: its process hashes the corpus again for the key (the 1 GB hit
        # measured 1.1 s, the SHA-256 of the file), which this process remembers from the first load
        token_cache._HASHED.clear()
        t = time.time()
        again, _, _ = build_stage(cfg, tok).load(cfg.data, 0)
        hit_s = time.time() - t
        assert len(again) == len(items)
    rng = random.Random(0)
    read = 0
    for _ in range(args.batches):  # what training reads: random global batches
        read += sum(len(items[rng.randrange(len(items))]) for _ in range(32))
    tokens = int(items.offsets[-1]) if args.path == "cache" else sum(len(b) for b in items)
    done.set()
    sampler.join()
    for k in peaks:
        peaks[k] = max(peaks[k], status_mb(k))
    peak = status_mb("VmHWM") - base_hwm
    row = CsvWriter(args.out, "data_scale", device="cpu").add(
        f"{n_bytes / 1e9:.2f}GB text, max_seq_len {args.max_seq_len}", f"mntp-{args.path}", "load", first_s * 1e3,
        peak_mb=peak, tokens=tokens, blocks=len(items), corpus_bytes=n_bytes,
        mb_per_s=f"{n_bytes / 1e6 / first_s:.2f}", cache_hit_s=f"{hit_s:.2f}",
        rss_anon_mb=f"{status_mb('RssAnon'):.0f}", peak_anon_added_mb=f"{peaks['RssAnon'] - base_anon:.0f}",
        peak_file_added_mb=f"{peaks['RssFile'] - base_file:.0f}", vmhwm_total_mb=f"{status_mb('VmHWM'):.0f}",
        baseline_mb=f"{base_hwm:.0f}", cpus=os.cpu_count(), timing="wall")
    print(f"[bench_data] {stats.summary()}", flush=True)
    return row


if __name__ == "__main__":
    main()
