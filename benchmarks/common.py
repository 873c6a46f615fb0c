"""Shared benchmark plumbing: timing, peak memory, CSV rows and plots.

Every benchmark writes rows with the columns in ``FIELDS``; ``extra`` holds anything op-specific
as ``key=value;key=value`` and always ``timing=<mode>``. On CPU, timings are wall-clock (CI runs the
benchmarks on CPU with tiny shapes so they never rot). On CUDA, ``timeit`` has two modes
(``LLM2VEC_BENCH_TIMING`` or ``mode=``):

* ``gpu`` (default): GPU execution time per call. A ``torch.cuda._sleep`` busy kernel is queued
  first, then every iteration (an L2 flush, start event, the call, end event) is queued behind it
  while the GPU sleeps, so the host never starves the GPU and Python launch overhead is not
  counted -- for any implementation. The median over iterations is reported (cold L2).
* ``sync``: one call between two events with a synchronize after each, as the 2026-11-26 H200 run
  measured. The host's launch overhead is inside the figure, which dominates sub-millisecond
  calls (a ~0.15-0.25 ms floor on that machine for SDPA and the Triton wrappers alike).

The protocol (``measure``): ``WARMUP`` = 5 untimed calls, then ``ITERS`` = 20 timed ones; a row reports the
median as ``ms`` and the spread in its extras (``Timing.extra``: min, quartiles, IQR, warm-up and timed counts),
so a reader (``summarize.py``) can tell a difference from noise and a short run from a full one. CPU runs with
tiny shapes (CI's smoke runs) time fewer calls and say so in the same extras.
"""
import csv
import dataclasses
import datetime
import os
import statistics
import subprocess
import sys
import time

import torch

FIELDS = ["gpu", "date", "commit", "bench", "shape", "impl", "pass", "ms", "tflops", "peak_mb", "extra"]


def device_name(device=None):
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return "cpu"


def git_commit():
    """The code a row names, by gpu_lib.sh's code_label rule: LLM2VEC_COMMIT when set (gpu_run.sh sets it for every
    step, a tree hash on a device copy without git metadata), else git's short HEAD, else "unknown"."""
    if os.environ.get("LLM2VEC_COMMIT"):
        return os.environ["LLM2VEC_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


TIMING_MODES = ("gpu", "sync")
_L2_FLUSH_BYTES = 256 * 2**20  # > L2 of H100 (50 MB) / H200 (60 MB)
_ASSUMED_CLOCK_HZ = 3e9  # above any datacenter GPU's clock, so the sleep lasts at least as long as planned
_MAX_SLEEP_S = 1.0


def write_json(path, obj):
    """``obj`` at ``path`` in the committed results' format (JSON indented by 1, a final newline), atomically
    (``engine.files.write_json``): a reader never sees half a file, and an interrupted run leaves the previous one."""
    from engine.files import write_json as atomic_json

    atomic_json(path, obj, indent=1)


def named_paths(specs, flag, is_ok, what, taken=()):
    """``NAME=PATH`` command-line values as ``{name: path}``, in the order given.

    Raises ValueError, one line naming ``flag`` and the value, for a value that is not NAME=PATH, a name given twice
    or in ``taken``, or a path that ``is_ok`` rejects (``what`` says what it should be: "a folder", ...)."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} {spec!r} is not NAME=PATH")
        if name in out or name in taken:
            raise ValueError(f"{flag} {spec!r}: the name {name!r} is taken")
        if not is_ok(path):
            raise ValueError(f"{flag} {spec!r}: {path} is not {what}")
        out[name] = path
    return out


def cli_error(message):
    """Bad command-line input: ``message`` as one line on stderr and exit status 2 (argparse's for a usage error),
    with no traceback; called before any heavy work."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def parser(description, **kw):
    """The benchmarks' command-line parser: engine.cli's, so a usage error is one line and exit 2 (argparse's own
    prints its usage block first)."""
    from engine.cli import ArgumentParser

    return ArgumentParser(description=description, **kw)


def out_problem(path):
    """Why a benchmark's output file cannot be written at ``path`` (the folders it would create included), else
    None: empty, a folder, under a file, or in a folder that takes no new file (tried, as engine.cli.unwritable
    does)."""
    from engine.cli import folder_takes_no_file

    if not path:
        return "an empty path"
    if os.path.isdir(path):
        return f"{path} is a folder"
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{path}: {folder} is a file, not a folder"
    why = folder_takes_no_file(folder)
    return f"{path}: {why}" if why else None


def check_outputs(args, *flags):
    """cli_error for the first output flag (``--out`` -> args.out) whose path cannot be written: said before the
    benchmark runs, not as a traceback after it."""
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        why = None if value is None else out_problem(value)
        if why:
            cli_error(f"{flag} {why}")


def cli_names(text, known, flag):
    """The comma-separated names of ``text``, each one of ``known`` (else cli_error naming the others and the
    choices)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        cli_error(f"{flag} {text!r}: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(known)}")
    return names


def cli_ints(text, flag):
    """The comma-separated positive integers of ``text`` (else cli_error)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        cli_error(f"{flag} {text!r}: want positive integers, comma-separated (e.g. 512,4096)")
    return values


def timing_mode():
    mode = os.environ.get("LLM2VEC_BENCH_TIMING", "gpu")
    if mode not in TIMING_MODES:
        raise ValueError(f"LLM2VEC_BENCH_TIMING={mode!r}; expected one of {TIMING_MODES}")
    return mode


WARMUP, ITERS = 5, 20  # the project's timing protocol: at least 5 warm-up and 20 timed calls, median and IQR


def quartiles(values):
    """(q1, median, q3) of ``values``, interpolated between them (statistics.quantiles, method "inclusive": q at
    position p(n - 1) of the sorted values), so they lie within [min, max]; the exclusive method extrapolates
    beyond them for small n (two calls of 1 and 2 ms: q1 0.75, q3 2.25). One value is all three."""
    v = sorted(values)
    if not v:
        raise ValueError("quartiles of no values")
    if len(v) == 1:
        return v[0], v[0], v[0]
    q1, q2, q3 = statistics.quantiles(v, n=4, method="inclusive")
    return q1, q2, q3


@dataclasses.dataclass(frozen=True)
class Timing:
    """The timed calls of one measurement (milliseconds, in call order) and the untimed warm-up calls before them."""

    times_ms: tuple
    warmup: int

    @property
    def median(self):
        return quartiles(self.times_ms)[1]

    @property
    def q1(self):
        return quartiles(self.times_ms)[0]

    @property
    def q3(self):
        return quartiles(self.times_ms)[2]

    @property
    def full_protocol(self):
        """Whether the measurement followed the protocol (>= WARMUP warm-up and >= ITERS timed calls)."""
        return self.warmup >= WARMUP and len(self.times_ms) >= ITERS

    def extra(self, digits=4):
        """A CSV row's timing extras: min, quartiles and IQR in ms (``digits`` decimals), warm-up, timed calls."""
        q1, _, q3 = quartiles(self.times_ms)
        f = f"{{:.{digits}f}}".format
        return {"min_ms": f(min(self.times_ms)), "q1_ms": f(q1), "q3_ms": f(q3), "iqr_ms": f(q3 - q1),
                "warmup": self.warmup, "timed_steps": len(self.times_ms)}


def measure(fn, warmup=WARMUP, iters=ITERS, device="cuda", mode=None):
    """``Timing`` of fn(): ``warmup`` untimed calls, then ``iters`` timed ones (see the module docstring for the
    CUDA modes; on the CPU, wall-clock time per call)."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"measure: iters {iters} must be >= 1 and warmup {warmup} >= 0")
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda" and torch.cuda.is_available():
        mode = mode or timing_mode()
        torch.cuda.synchronize()
        if mode == "gpu":
            return Timing(tuple(_time_gpu(fn, iters)), warmup)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(tuple(times), warmup)


def timeit(fn, warmup=WARMUP, iters=ITERS, device="cuda", mode=None):
    """Median milliseconds of fn() over ``iters`` timed calls after ``warmup`` (``measure(...).median``)."""
    return measure(fn, warmup, iters, device, mode).median


def _flush_buffer():
    return torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")


def _time_gpu(fn, iters):
    # Host time to enqueue one call, to size the sleep: without a final synchronise it is the launch cost
    # alone (a call that synchronises inside also counts the GPU time before that point: an over-estimate).
    t0 = time.perf_counter()
    fn()
    host_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    flush = _flush_buffer()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    torch.cuda._sleep(int(min(1.5 * host_s * iters + 1e-3, _MAX_SLEEP_S) * _ASSUMED_CLOCK_HZ))
    for i in range(iters):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    del flush
    return times


def peak_memory_mb(fn, device="cuda"):
    """Peak CUDA memory above what was allocated before fn() ran (MB). NaN on CPU."""
    if not (device == "cuda" and torch.cuda.is_available()):
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


class CsvWriter:
    def __init__(self, path, bench, timing=None, device=None):
        """``device``: where the benchmark runs ("cpu", "cuda"; default: CUDA when available), named in every row's
        gpu column ("cpu" for the CPU, whatever card the host has: a --tiny run on a GPU host ran on the CPU).
        ``timing``: how this benchmark's ms were taken, written to every row's extra (default: the timeit mode on
        CUDA, "wall" on the CPU)."""
        on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        self.path, self.bench = path, bench
        self.meta = {"gpu": device_name() if on_cuda else "cpu", "date": datetime.date.today().isoformat(),
                     "commit": git_commit()}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        new = not os.path.exists(path) or os.path.getsize(path) == 0  # empty: a run killed before its first row
        self._f = open(path, "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=FIELDS)
        if new:
            self._w.writeheader()
            self._f.flush()  # on disk now, as each row is: a run killed next leaves a file that reads
        self.rows = []
        self.timing = timing or (timing_mode() if on_cuda else "wall")

    def add(self, shape, impl, pass_, ms, tflops=float("nan"), peak_mb=float("nan"), **extra):
        extra.setdefault("timing", self.timing)
        row = dict(self.meta, bench=self.bench, shape=shape, impl=impl, **{"pass": pass_},
                   ms=f"{ms:.4f}", tflops=f"{tflops:.2f}", peak_mb=f"{peak_mb:.1f}",
                   extra=";".join(f"{k}={v}" for k, v in extra.items()))
        self._w.writerow(row)
        self._f.flush()
        self.rows.append(row)
        print(f"{self.bench:12s} {shape:40s} {impl:22s} {pass_:8s} {float(ms):10.3f} ms "
              f"{float(tflops):8.1f} TFLOP/s {float(peak_mb):10.1f} MB {row['extra']}", flush=True)
        return row


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


RUN = ("gpu", "date", "commit")  # the columns that tell one run's rows from another's (a CsvWriter's meta)


def plot(csv_path, png_path, metric="ms", title=None, run=None):
    """Grouped bar chart of ``metric`` per (shape, pass), one bar per impl, of one run's rows: those whose gpu, date
    and commit are ``run``'s (a CsvWriter's meta; default: the file's last row's), never another run's appended to
    the same CSV. The title names that run. None when the run has no row to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(csv_path)
    run = {k: (run or (rows[-1] if rows else {})).get(k) for k in RUN}
    rows = [r for r in rows if r[metric] not in ("nan", "") and all(r.get(k) == run[k] for k in RUN)]
    if not rows:
        return None
    groups = sorted({(r["shape"], r["pass"]) for r in rows}, key=lambda g: (g[1], g[0]))
    impls = sorted({r["impl"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(8, len(groups) * 0.9), 5))
    width = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        vals = []
        for g in groups:
            match = [float(r[metric]) for r in rows if (r["shape"], r["pass"]) == g and r["impl"] == impl]
            vals.append(match[-1] if match else 0.0)
        ax.bar([x + i * width for x in range(len(groups))], vals, width, label=impl)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))])
    ax.set_xticklabels([f"{s}\n{p}" for s, p in groups], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(metric)
    ax.set_title(f"{title or os.path.basename(csv_path)} ({run['gpu']}, {run['commit']}, {run['date']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def run_elementwise_bench(op, doc, argv, tiny_shapes, gpu_shapes, make_case, impls=("torch", "triton")):
    """The shared CLI and loop of the fused elementwise-op benchmarks (bench_rms_norm, bench_rope, bench_glu).

    ``make_case(name, spec, device, dtype)`` -> (shape label, bytes moved, step(impl)); each impl's fwd+bwd
    ``step`` is timed and written as a CSV row with its GB/s. The Triton impl is skipped (and says so) on a CPU
    without TRITON_INTERPRET=1. Returns the rows."""
    from engine.cli import positive_int

    ap = parser(doc.split("\n")[0])
    ap.add_argument("--out", default=f"benchmarks/results/bench_{op}.csv")
    ap.add_argument("--tiny", action="store_true", help="CPU mode: tiny shapes, interpreter for the kernel")
    ap.add_argument("--iters", type=positive_int, default=None)
    args = ap.parse_args(argv)
    check_outputs(args, "--out")
    tiny = args.tiny or not torch.cuda.is_available()
    device, dtype = ("cpu", torch.float32) if tiny else ("cuda", torch.bfloat16)
    can_triton = not tiny or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    warmup, iters = (1, args.iters or 2) if tiny else (WARMUP, args.iters or ITERS)
    writer, rows = CsvWriter(args.out, op, device=device), []
    for name, spec in (tiny_shapes if tiny else gpu_shapes).items():
        shape, nbytes, step = make_case(name, spec, device, dtype)
        for impl in impls:
            if impl == "triton" and not can_triton:
                rows.append(writer.add(shape, impl, "fwd+bwd", float("nan"),
                                       status="skipped (CPU without TRITON_INTERPRET=1)"))
                continue
            run = lambda impl=impl: step(impl)  # noqa: E731
            t = measure(run, warmup=warmup, iters=iters, device=device)
            rows.append(writer.add(shape, impl, "fwd+bwd", t.median, tflops=nbytes / t.median / 1e6,
                                   peak_mb=peak_memory_mb(run, device=device), status="ok",
                                   dtype=str(dtype).replace("torch.", ""), tflops_column="GB/s", **t.extra()))
    return rows
