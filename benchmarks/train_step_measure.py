"""The train-step benchmark's measuring conventions: its clock and log, batch shapes and masking, the FLOPs a
row divides by its step time (model and hardware FLOPs, see bench_train_step's docstring), the card's peak,
the timing protocol (early stop on the time budget, step statistics) and the end of a run cut by SIGTERM."""
import os
import signal
import time

from benchmarks.common import Timing


def process_start():
    """The process's start on the time.perf_counter() clock: now - (boot clock now - the process's start time in
    /proc/self/stat, clock ticks since boot). gpu_run.sh's `timeout` counts from the process's start, so the
    time budget does too: imports (torch, transformers, DeepSpeed: seconds on a bare machine) count against it.
    Without /proc (not Linux) the import of this module stands in for it."""
    now = time.perf_counter()
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime; field 3 is index 0
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return now
    return now - age if 0.0 <= age < 3600.0 else now


T0 = process_start()  # the benchmark's start: the time budget and the log count from here

BENCH = "train_step"
# written into every step row (extra flops_def): what mfu / hfu divide by the step time (module docstring)
FLOPS_DEF = ("model: 4*N_frozen*T + 6*N_lora*T + 12*sum(L^2)*Hq*D*layers + 4*head_rows*V*H (MNTP) or "
             "6*B*N*E (contrastive)| hfu adds the recompute: full 2*N_frozen*T + 2*N_lora*T + "
             "4*sum(L^2)*Hq*D*layers, selective 4*sum(L^2)*Hq*D*layers (the Triton attention reruns), none 0 "
             "(the row's recompute extra; full where absent)")

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name substring; first match wins.
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4),
               ("GH200", 989.4), ("A100", 312.0), ("L40S", 362.0)]

# Batch shapes: mntp (batch, seq); simcse (sentences, min len, max len); supervised (queries, q min, q max,
# doc min, doc max, hard negatives per query).
GPU_SHAPES = dict(mntp=(32, 512), simcse=(128, 16, 128), supervised=(64, 16, 64, 64, 512, 1))
TINY_SHAPES = dict(mntp=(4, 48), simcse=(6, 6, 24), supervised=(4, 6, 16, 12, 40, 1))
# MNTP masking (probability, scheme) of every path: llm2vec's per-model setting, set in main() (llm2vec_masking)
MASK = {"gpu": (0.8, "all"), "tiny": (0.2, "bert")}


def log(*a):
    print(f"[train_step {time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def stage_flops(stage, st, mcfg, n_frozen, n_lora, head_rows=None, recompute="full"):
    """(model FLOPs, hardware FLOPs) of one step; see the module docstring. head_rows: the rows the MNTP LM head
    computes (default: the masked rows, as the engine does; a full-logit path computes every position).
    recompute: what the hardware FLOPs add for the recomputed forward: full, selective (GEMM outputs are kept;
    the engine's Triton attention reruns) or none."""
    layers, hq_d = mcfg.num_hidden_layers, mcfg.num_attention_heads * _head_dim(mcfg)
    T = st["tokens"]
    attn_fwd = 4.0 * sum(n * n for n in st["lens"]) * hq_d * layers
    model = 4.0 * n_frozen * T + 6.0 * n_lora * T + 3.0 * attn_fwd
    if stage == "mntp":
        model += 4.0 * (st["masked"] if head_rows is None else head_rows) * mcfg.vocab_size * mcfg.hidden_size
    else:
        model += 6.0 * st["n_queries"] * st["n_docs"] * mcfg.hidden_size
    redo = {"full": 2.0 * n_frozen * T + 2.0 * n_lora * T + attn_fwd, "selective": attn_fwd, "none": 0.0}
    return model, model + redo[recompute]


def _head_dim(mcfg):
    return getattr(mcfg, "head_dim", None) or mcfg.hidden_size // mcfg.num_attention_heads


def shape_name(stage, shapes):
    if stage == "mntp":
        B, S = shapes["mntp"]
        p, scheme = MASK["tiny" if shapes is TINY_SHAPES else "gpu"]
        return f"mntp {B}x{S} mask{p:g}-{scheme}"
    if stage == "simcse":
        n, lo, hi = shapes["simcse"]
        return f"simcse 2x{n} len{lo}-{hi}"
    nq, qlo, qhi, dlo, dhi, nneg = shapes["supervised"]
    return f"supervised {nq}q+{nq}p+{nq * nneg}n q{qlo}-{qhi} d{dlo}-{dhi}"


def peak_tflops(name, override=None):
    if override:
        return float(override), "--peak-tflops"
    for key, val in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return val, f"spec dense bf16 ({key})"
    return float("nan"), "unknown card"


def out_of_time(args, times, min_steps=5):
    """Stop timing early (after at least min_steps) when the next step and a profiled one would end past the
    budget, so a run under a hard timeout still writes its row; the row then says cut=budget."""
    budget = getattr(args, "budget_resolved", float("inf"))
    return len(times) >= min_steps and time.perf_counter() - T0 + 3 * max(times) > budget


class Terminated(Exception):
    """SIGTERM arrived (gpu_run.sh's `timeout` for the step; its SIGKILL follows KILL_S = 10 s later): raised once,
    in the main thread, where the signal is handled. An Exception, so that every measurement's recording
    handler catches it and writes its row from the steps timed so far (term_cut) instead of the process dying
    with them; the run then ends (bench_train_step.main, exit 143 = 128 + SIGTERM)."""


TERM = {"at": None}  # seconds from T0 when SIGTERM came; None before


def _on_sigterm(signum, frame):
    if TERM["at"] is None:  # once: a second TERM must not cut the row being written
        TERM["at"] = time.perf_counter() - T0
        raise Terminated(f"SIGTERM at {TERM['at']:.0f}s (the step's timeout)")


def catch_sigterm():
    """Turn SIGTERM into Terminated for this process (main thread only); returns the handler it replaced, or
    None where none could be set (another thread)."""
    try:
        return signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:
        return None


def terminated():
    return TERM["at"] is not None


def term_cut(extra, timed):
    """A measurement ended by SIGTERM: with ``timed`` > 0 steps timed its row keeps them (status=ok, cut=term,
    timed_steps says how many: fewer than the protocol's 20 makes a verdict on it provisional, as cut=budget
    does); with none it measured nothing (status=timeout). Mutates and returns ``extra``."""
    extra["cut"] = "term"
    extra["status"] = "ok" if timed else "timeout"
    extra.pop("detail", None)
    if not timed:
        extra["detail"] = f"SIGTERM at {TERM['at'] or 0:.0f}s before the first timed step"
    return extra


def step_stats(times, warmup):
    """CSV extras of a timed run (step times in seconds): min, quartiles and IQR of the step times (ms, one
    decimal) and the protocol, in the kernel benchmarks' format (benchmarks.common.Timing.extra)."""
    return Timing(tuple(t * 1e3 for t in times), warmup).extra(digits=1)
