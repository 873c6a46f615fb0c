"""benchmarks/common.py: the CUDA timing modes, checked against a scripted fake of torch.cuda (no GPU here).

The fake keeps a GPU clock that only the timed function advances, and logs the order in which work is
queued, so the test sees what each mode measures and that "gpu" queues the sleep before everything else.
"""
import itertools
import os

import pytest
import torch

from benchmarks import common


class _FakeCuda:
    def __init__(self, monkeypatch, durations):
        self.log, self.clock, self.durations = [], 0.0, list(durations)
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                self.t = fake.clock
                fake.log.append("event")

            def elapsed_time(self, end):
                return end.t - self.t

        class Flush:
            def zero_(self):
                fake.log.append("flush")

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: self.log.append("sync"))
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: self.log.append(("sleep", cycles)))
        monkeypatch.setattr(common, "_flush_buffer", lambda: Flush())

    def fn(self):
        self.log.append("fn")
        self.clock += self.durations.pop(0) if self.durations else 100.0


def test_gpu_mode_queues_everything_behind_a_sleep_and_takes_the_median(monkeypatch):
    cuda = _FakeCuda(monkeypatch, durations=[100.0, 100.0, 100.0, 5.0, 1.0, 3.0, 2.0, 4.0])
    ms = common.timeit(cuda.fn, warmup=2, iters=5, device="cuda", mode="gpu")
    assert ms == 3.0  # median of the 5 timed calls; warm-up and the sizing call are not counted
    log = cuda.log
    # warm-up x2, sync, the sizing call + sync, then the sleep before any timed work, then 5 x (flush, event, fn,
    # event)
    assert log[:2] == ["fn", "fn"] and log[2] == "sync" and log[3:5] == ["fn", "sync"]
    assert log[5][0] == "sleep" and log[5][1] > 0
    assert log[6:-1] == ["flush", "event", "fn", "event"] * 5 and log[-1] == "sync"


def test_gpu_mode_sleep_is_capped(monkeypatch):
    cuda = _FakeCuda(monkeypatch, durations=[])
    clock = itertools.chain([0.0, 50.0], itertools.repeat(60.0))  # the sizing call takes 50 s of host time
    monkeypatch.setattr(common.time, "perf_counter", clock.__next__)
    common.timeit(cuda.fn, warmup=0, iters=3, device="cuda", mode="gpu")
    sleeps = [e for e in cuda.log if isinstance(e, tuple)]
    assert sleeps == [("sleep", int(common._MAX_SLEEP_S * common._ASSUMED_CLOCK_HZ))]


def test_sync_mode_times_one_synchronised_call_at_a_time(monkeypatch):
    cuda = _FakeCuda(monkeypatch, durations=[7.0, 2.0, 9.0, 4.0])
    ms = common.timeit(cuda.fn, warmup=1, iters=3, device="cuda", mode="sync")
    assert ms == 4.0  # median of 2, 9, 4
    assert not any(isinstance(e, tuple) for e in cuda.log)  # no sleep
    assert cuda.log[2:] == ["event", "fn", "event", "sync"] * 3


def test_timing_mode_from_env_and_rows_say_how_they_were_timed(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM2VEC_BENCH_TIMING", "sync")
    assert common.timing_mode() == "sync"
    monkeypatch.setenv("LLM2VEC_BENCH_TIMING", "fast")
    with pytest.raises(ValueError, match="LLM2VEC_BENCH_TIMING"):
        common.timing_mode()
    monkeypatch.delenv("LLM2VEC_BENCH_TIMING")
    w = common.CsvWriter(str(tmp_path / "a.csv"), "x")  # CPU: wall clock
    assert "timing=wall" in w.add("s", "impl", "fwd", 1.0)["extra"]
    w = common.CsvWriter(str(tmp_path / "b.csv"), "x", timing="wall-synced-step")
    row = w.add("s", "impl", "step", 1.0, status="ok")
    assert row["extra"] == "status=ok;timing=wall-synced-step"


@pytest.mark.parametrize("module, argv, says", [
    ("bench_masked_ce", ["--shapes", "bogus"], "--shapes 'bogus': unknown bogus"),
    ("bench_contrastive", ["--tiny", "--batches", "x"], "--batches 'x': want positive integers"),
    ("bench_step_ops", ["--from-json", "missing.json"], "--from-json missing.json: FileNotFoundError"),
    ("bench_train_step", ["--big-batch", "x"], "--big-batch 'x': want positive integers"),
    ("bench_train_step", ["--stages", "mntp,bogus"], "--stages 'mntp,bogus': unknown bogus"),
    ("bench_attention", ["--cases", "bogus"], "--cases: unknown bogus"),
    # review helper-41: each of these was a usage block, a traceback, a silent default or an empty CSV
    ("bench_attention", ["--impls", "bogus"], "--impls 'bogus': unknown bogus"),
    ("bench_rope", ["--tiny", "--iters", "0"], "argument --iters: 0 is not a positive integer"),
    ("bench_masked_ce", ["--iters", "-1"], "argument --iters: -1 is not a positive integer"),
    ("bench_train_step", ["--tiny", "--steps", "0"], "argument --steps: 0 is not a positive integer"),
    ("bench_contrastive", ["--budget-ms", "-5"], "argument --budget-ms: -5 is not a positive finite number"),
    ("bench_step_ops", ["--arch", "foo"], "argument --arch: invalid choice"),
    ("bench_rope", ["--tiny", "--out", "/proc/llm2vec-x.csv"], "--out /proc/llm2vec-x.csv: /proc cannot be written"),
    ("bench_rope", ["--tiny", "--out", ""], "--out an empty path"),
    ("bench_data", ["--corpus", "missing.txt"], "--corpus: data file not found"),
    ("bench_data", ["--gb", "-1"], "argument --gb: -1 is not a positive finite number"),
    # review: each of these ran (every impl skipped, a negative MFU, a ConfigError traceback after the corpus was
    # written) or was silently ignored (--peak-tflops 0)
    ("bench_attention", ["--tiny", "--dropout", "1.5"], "argument --dropout: 1.5 is not in [0, 1)"),
    ("bench_attention", ["--tiny", "--dropout", "-0.1"], "argument --dropout: -0.1 is not in [0, 1)"),
    ("bench_attention", ["--tiny", "--budget-s", "-1"], "argument --budget-s: -1 is not a positive finite number"),
    ("bench_data", ["--max-seq-len", "-3"], "argument --max-seq-len: -3 is not an integer >= 2"),
    ("bench_data", ["--batches", "-3"], "argument --batches: -3 is negative"),
    ("bench_train_step", ["--tiny", "--peak-tflops", "0"], "argument --peak-tflops: 0 is not a positive finite"),
    ("bench_train_step", ["--tiny", "--peak-tflops", "-5"], "argument --peak-tflops: -5 is not a positive finite"),
    ("bench_train_step", ["--tiny", "--big-batch", "8", "--grad-cache-chunk", "0"],
     "argument --grad-cache-chunk: 0 is not a positive integer"),
    ("bench_step_ops", ["--from-json", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                    "benchmarks/results/2026-11-30-cpu-step-ops/results.json")],
     "lacks tokens, recompute: saved by an older bench_step_ops"),
])
def test_bad_command_line_input_is_one_line_and_exit_2(module, argv, says, capsys, tmp_path, monkeypatch):
    """Each benchmark CLI refuses bad input with one line on stderr and exit status 2 (common.cli_error), before
    any work: no traceback, no model built, no CSV started."""
    import importlib

    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(f"benchmarks.{module}").main
    out = ["--out", str(tmp_path / "rows.csv")] if module != "bench_step_ops" and "--out" not in argv else []
    with pytest.raises(SystemExit) as e:
        main(argv + out)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and says in err and "\n" not in err, err
    assert not (tmp_path / "rows.csv").exists()


def test_attention_on_cpu_without_the_interpreter_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch):
    """bench_attention on the CPU with TRITON_INTERPRET=0 said so by SystemExit(message): exit 1, no "error:"."""
    from benchmarks import bench_attention

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit) as e:
        bench_attention.main(["--tiny", "--out", str(tmp_path / "rows.csv")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "TRITON_INTERPRET=1" in err and "\n" not in err, err
    assert not (tmp_path / "rows.csv").exists()


def test_timeit_reports_the_median_of_an_even_count(monkeypatch):
    """An even number of timed calls reports the mean of the two middle times (the median), not the upper one: on
    CPU, and in both CUDA modes."""
    clock = iter([0.0, 0.001, 10.0, 10.002, 20.0, 20.004, 30.0, 30.003])  # calls of 1, 2, 4, 3 ms
    monkeypatch.setattr(common.time, "perf_counter", clock.__next__)
    assert common.timeit(lambda: None, warmup=0, iters=4, device="cpu") == pytest.approx(2.5)
    monkeypatch.undo()
    for mode in ("gpu", "sync"):
        cuda = _FakeCuda(monkeypatch, durations=[100.0, 1.0, 2.0, 4.0, 3.0])  # the gpu mode's sizing call first
        if mode == "sync":
            cuda.durations.pop(0)
        assert common.timeit(cuda.fn, warmup=0, iters=4, device="cuda", mode=mode) == 2.5, mode


def test_measure_keeps_every_timed_call_and_rows_carry_the_spread(monkeypatch, tmp_path):
    """The protocol is 5 warm-up + 20 timed calls by default; a Timing keeps the timed calls, and a row written from
    it carries min, quartiles, IQR and both counts, so summarize.py can tell a short run or a noisy ratio."""
    calls = []
    times = iter(range(1000))
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(times) * 1e-3)
    t = common.measure(lambda: calls.append(1), device="cpu")
    assert len(calls) == common.WARMUP + common.ITERS == 25 and len(t.times_ms) == 20 and t.full_protocol
    monkeypatch.undo()
    t = common.Timing((4.0, 1.0, 3.0, 2.0, 5.0), warmup=2)
    assert (t.median, t.q1, t.q3) == (3.0, 2.0, 4.0) and not t.full_protocol
    ex = t.extra()
    assert ex == {"min_ms": "1.0000", "q1_ms": "2.0000", "q3_ms": "4.0000", "iqr_ms": "2.0000", "warmup": 2,
                  "timed_steps": 5}
    row = common.CsvWriter(str(tmp_path / "r.csv"), "x", device="cpu").add("s", "i", "fwd", t.median, **ex)
    assert "q1_ms=2.0000;q3_ms=4.0000;iqr_ms=2.0000;warmup=2;timed_steps=5" in row["extra"]
    with pytest.raises(ValueError):
        common.measure(lambda: None, iters=0, device="cpu")


def test_tiny_rows_on_a_gpu_host_say_they_ran_on_the_cpu(monkeypatch, tmp_path):
    """--tiny runs on the CPU with wall-clock timing even where a GPU is present: its rows say gpu=cpu and
    timing=wall, not the card's name and its timing mode."""
    from benchmarks import bench_rms_norm

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.delenv("LLM2VEC_BENCH_TIMING", raising=False)
    on_card = common.CsvWriter(str(tmp_path / "card.csv"), "x").add("s", "impl", "fwd", 1.0)
    assert on_card["gpu"] == "NVIDIA H100 80GB HBM3" and "timing=gpu" in on_card["extra"]
    rows = bench_rms_norm.main(["--tiny", "--iters", "1", "--out", str(tmp_path / "tiny.csv")])
    assert rows and all(r["gpu"] == "cpu" and "timing=wall" in r["extra"] for r in rows), rows
    timed = [r for r in rows if "status=ok" in r["extra"]]
    assert timed and all("warmup=1;timed_steps=1" in r["extra"] for r in timed), timed  # the row says how it ran


def test_elementwise_benchmarks_count_the_bytes_the_kernels_move():
    """GB/s divides what the fused kernels must move: RMSNorm's backward re-reads x (5 activation tensors, plus
    the weight twice and rstd written and read), the gated activation's re-reads gate and up (8 tensors)."""
    from benchmarks import bench_glu, bench_rms_norm

    _, nbytes, _ = bench_rms_norm._case("t", (6, 8, False), "cpu", torch.bfloat16)
    assert nbytes == bench_rms_norm.moved_bytes(6, 8, 2) == 5 * 6 * 8 * 2 + 2 * 8 * 2 + 2 * 4 * 6
    _, nbytes, _ = bench_glu._case("t", (6, 8, "silu"), "cpu", torch.bfloat16)
    assert nbytes == bench_glu.moved_bytes(6, 8, 2) == 8 * 6 * 8 * 2


def test_attention_flops_follow_the_train_steps_useful_work():
    """bench_attention's TFLOP/s count the work bench_train_step's MFU counts for attention: the forward's two
    products and the backward's four (2x the forward, 3x a step), not the scores recomputed in the backward."""
    from types import SimpleNamespace

    from benchmarks import bench_attention
    from benchmarks.train_step_measure import stage_flops

    lens, hq, d = [6, 4], 4, 8
    fwd = bench_attention.attention_flops(lens, hq, d)
    assert fwd == 4 * (36 + 16) * hq * d
    assert bench_attention.PASS_FACTOR == {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}
    mcfg = SimpleNamespace(num_hidden_layers=1, num_attention_heads=hq, head_dim=d, hidden_size=32, vocab_size=10)
    model, _ = stage_flops("mntp", {"tokens": 10, "lens": lens, "masked": 0}, mcfg, n_frozen=0, n_lora=0)
    assert model == bench_attention.PASS_FACTOR["fwd+bwd"] * fwd


def _write_csv(path, rows):
    """Rows with common.FIELDS columns (missing ones empty) as a benchmark's CSV."""
    import csv

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=common.FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in common.FIELDS})


def _step_row(gpu, impl, tokens_per_s, commit="abc1234"):
    return {"gpu": gpu, "date": "2026-12-07", "commit": commit, "bench": "train_step", "shape": "mntp 32x512",
            "impl": impl, "pass": "step", "ms": f"{1e3 * 16384 / tokens_per_s:.1f}", "peak_mb": "nan",
            "extra": f"status=ok;tokens_per_s={tokens_per_s};q1_ms=1;q3_ms=1;warmup=5;timed_steps=20;zero=none"}


H100, H200, MNTP_TARGET = "NVIDIA H100 80GB HBM3", "NVIDIA H200", "mntp step tokens/s >= 1.5x reference"


def _summary_table(text):
    """{target: [measured, verdict, notes]} of a summary's table."""
    return {c[1]: c[2:] for c in (ln.strip("|").split(" | ") for ln in text.splitlines()) if len(c) == 5}


def test_summary_leaves_out_a_rerun_on_another_gpu(tmp_path):
    """A follow-up call (rerun/) on another card than the first call's (same commit) is not merged into its rows, and
    the notes say so. (The rerun's H200 engine row replaced the H100 one: "2.000x met" of an H200 engine over an H100
    reference.)"""
    from benchmarks import summarize

    run = tmp_path / "rerun-run"
    _write_csv(str(run / "bench_train_step.csv"), [_step_row(H100, "reference", 1000), _step_row(H100, "engine", 1000)])
    _write_csv(str(run / "rerun" / "train_step_again.csv"), [_step_row(H200, "engine", 2000)])
    text = summarize.main(["--dir", str(run)])
    got = _summary_table(text)[MNTP_TARGET]
    assert got[0].strip() == "1.000x" and got[1].strip() == "MISSED", got  # the first call's H100 rows alone
    assert text.splitlines()[0] == f"# GPU run summary ({H100}, commit abc1234)", text.splitlines()[0]
    assert f"rerun/: 1 train-step rows measured on {H200}, not the first call's GPU, left out" in text
    assert "mntp/engine/step" in text


def test_summary_makes_no_ratio_of_two_gpus_rows_and_names_both(tmp_path):
    """A train-step CSV holding two cards' rows (same commit) makes no ratio of them, and the header names every GPU
    it read. (An H200 engine over an H100 reference read "2.000x met", under a header naming the H100 alone.)"""
    from benchmarks import summarize

    mixed = tmp_path / "mixed-run"
    _write_csv(str(mixed / "bench_train_step.csv"),
               [_step_row(H100, "reference", 1000), _step_row(H200, "engine", 2000)])
    text = summarize.main(["--dir", str(mixed)])
    got = _summary_table(text)[MNTP_TARGET]
    assert got[:2] == ["n/a", "n/a"] and f"on {H100}" in got[2] and f"on {H200}" in got[2], got
    assert text.splitlines()[0] == f"# GPU run summary ({H100}, {H200}, commit abc1234)", text.splitlines()[0]


def _kernel_row(gpu, commit, impl, ms):
    return {"gpu": gpu, "date": "2026-12-07", "commit": commit, "bench": "masked_ce", "shape": "llama3_8b",
            "impl": impl, "pass": "fwd+bwd", "ms": str(ms), "tflops": "nan", "peak_mb": "nan", "extra": "status=ok"}


def test_summary_pairs_no_kernel_rows_of_two_devices(tmp_path):
    """A kernel CSV holding a --tiny rehearsal's rows (gpu=cpu) before the GPU run's: a target reads the rows of the
    file's last device alone, and the notes count the others. (The GPU run's full_logits row missing, its masked-CE
    ratio was the H200 triton time over the CPU rehearsal's full_logits time: "0.002x met".)"""
    from benchmarks import summarize

    run = tmp_path / "appended"
    rows = [_kernel_row("cpu", "abc1234", "full_logits", 5000.0), _kernel_row("cpu", "abc1234", "triton_fused", 900.0),
            _kernel_row(H200, "abc1234", "triton_fused", 10.0)]
    _write_csv(str(run / "bench_masked_ce.csv"), rows)
    text = summarize.main(["--dir", str(run)])
    got = _summary_table(text)["Llama-3-8B vs full logits (memory, time)"]
    assert got[:2] == ["n/a", "n/a"], got
    assert "bench_masked_ce.csv: 2 rows measured on cpu, not its last row's device (NVIDIA H200), left out" in text
    assert text.splitlines()[0] == f"# GPU run summary ({H200}, commit abc1234)", text.splitlines()[0]
    _write_csv(str(run / "bench_masked_ce.csv"), rows + [_kernel_row(H200, "abc1234", "full_logits", 40.0)])
    got = _summary_table(summarize.main(["--dir", str(run)]))["Llama-3-8B fwd+bwd time <= 0.35x full-logits path"]
    assert got[0].strip() == "0.250x" and got[1].strip().startswith("met"), got  # the H200's own pair


def test_a_plot_draws_one_runs_rows_and_names_that_run(tmp_path, monkeypatch):
    """Runs appended to one CSV: the chart draws the writer's run (its meta; by default the file's last row's), never
    an earlier run's bars beside it, and its title names the run drawn. (An H100 run's full_logits 100 ms and a later
    H200 run's triton 20 ms were drawn as one 5x chart, titled with the H100.)"""
    import matplotlib.pyplot as plt

    path = str(tmp_path / "rows.csv")
    _write_csv(path, [_kernel_row("NVIDIA H100 80GB HBM3", "aaa1111", "full_logits", 100.0),
                      _kernel_row("NVIDIA H100 80GB HBM3", "aaa1111", "triton_fused", 30.0),
                      _kernel_row("NVIDIA H200", "bbb2222", "triton_fused", 20.0)])
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)

    def drawn(**kw):
        assert common.plot(path, str(tmp_path / "p.png"), **kw)
        ax = figs.pop().axes[0]
        bars = {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers}
        return bars, ax.get_title()

    bars, title = drawn(title="masked CE")  # the file's last run: the H200's
    assert bars == {"triton_fused": [20.0]} and title == "masked CE (NVIDIA H200, bbb2222, 2026-12-07)", (bars, title)
    meta = {"gpu": "NVIDIA H100 80GB HBM3", "date": "2026-12-07", "commit": "aaa1111"}
    bars, title = drawn(run=meta)
    assert bars == {"full_logits": [100.0], "triton_fused": [30.0]}, bars
    assert title == "rows.csv (NVIDIA H100 80GB HBM3, aaa1111, 2026-12-07)", title
    assert common.plot(path, str(tmp_path / "q.png"), run=dict(meta, commit="ccc3333")) is None  # no row of that run


def test_a_csv_header_is_on_disk_before_the_first_row(tmp_path):
    """The header is written through as soon as the writer opens a new file: a run killed before its first row leaves
    a CSV that reads (it stayed in the buffer, and a SIGKILL left a 0-byte file)."""
    path = tmp_path / "rows.csv"
    w = common.CsvWriter(str(path), "x", device="cpu")
    assert path.read_text().strip() == ",".join(common.FIELDS)  # before any row, without closing the writer
    w._f.close()


def test_a_csv_left_empty_by_a_killed_run_gets_its_header(tmp_path):
    """A file a killed run left empty (0 bytes) is a new file: the next run writes the header, and its rows read back
    (it wrote no header, and read_rows returned [])."""
    path = tmp_path / "rows.csv"
    path.write_text("")  # what a SIGKILL before the first row left
    w = common.CsvWriter(str(path), "x", device="cpu")
    w.add("s", "impl", "fwd", 1.0)
    w._f.close()
    rows = common.read_rows(str(path))
    assert [(r["shape"], r["impl"], r["ms"]) for r in rows] == [("s", "impl", "1.0000")], rows
