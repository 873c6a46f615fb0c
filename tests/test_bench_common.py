"""benchmarks/common.py: the CUDA timing modes, checked against a scripted fake of torch.cuda (no GPU here).

The fake keeps a GPU clock that only the timed function advances, and logs the order in which work is
queued, so the test sees what each mode measures and that "gpu" queues the sleep before everything else.
"""
import itertools

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
