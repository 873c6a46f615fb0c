"""torch.profiler breakdown of one train step by category (attention, the GEMMs of MLP / attention projections /
LoRA, loss, optimizer, ZeRO fetch/release/grad-reduce, other). On the GPU: CUDA activity only, kernel time by
kernel name and GPU busy time against wall time; on CPU: CPU self time per op, classified by the op's name, its
ancestors' scopes and its GEMM shapes."""
import re
import time

from torch.autograd import DeviceType
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from benchmarks.harness import sync as _sync
from benchmarks.harness import wrapped_methods
from benchmarks.train_step_measure import log

try:  # ZeRO-3's fetch / release / gradient reduction get profiler scopes when DeepSpeed is there
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
except Exception:  # DeepSpeed absent or failing to import: the benchmark runs without it
    PartitionedParameterCoordinator = DeepSpeedZeroOptimizer_Stage3 = None

CATEGORIES = ("attention", "linear: MLP", "linear: attention projections", "linear: LoRA", "loss", "optimizer",
              "ZeRO fetch/release/grad-reduce", "other", "unattributed", "linear (all GEMMs)")
_COMM = re.compile(r"nccl|all_gather|allgather|reduce_scatter|all_reduce|allreduce|c10d::|record_param_comms|zero:")
_LOSS = re.compile(r"cross_?entropy|nll_loss|log_softmax|logsumexp|contrastive|_ce_|scope:loss")
_ATTN = re.compile(r"attention|attn|flash|sdpa|scaled_dot|fmha|aten::_?softmax|softmax_backward")
_GEMM = re.compile(r"aten::(mm|addmm|bmm|baddbmm|matmul|linear)\b|gemm|nvjet|xmma|cutlass|gemv")


def _dims(shapes):
    out = set()
    for s in shapes or ():
        if isinstance(s, (list, tuple)):
            out.update(int(x) for x in s if isinstance(x, int))
    return out


def classify(chain, kernel_names, shapes, dims_cfg):
    """Category of one op from its name, its ancestors' names (nearest first), its kernels and input shapes.

    ZeRO scopes and collectives anywhere above the op win, then the optimizer phase; GEMMs are told apart by
    shape (vocab V -> LM head / loss, LoRA rank r, MLP width I, else attention projections); other ops take
    the first loss / attention name found walking up to the autograd node that ran them.
    """
    low = [c.lower() for c in chain]
    full = " ".join(low)
    kn = " ".join(kernel_names).lower()
    if _COMM.search(full) or "nccl" in kn:
        return "ZeRO fetch/release/grad-reduce"
    if "phase:optimizer" in full:
        return "optimizer"
    dims = _dims(shapes)
    own = low[0] if low else ""
    if dims_cfg["V"] in dims and "embedding" not in own:
        return "loss"
    gemm = bool(_GEMM.search(own) or _GEMM.search(kn))
    if gemm and dims_cfg["r"] in dims:
        return "linear: LoRA"
    if gemm and dims_cfg["I"] in dims:
        return "linear: MLP"
    for n in low:
        if _LOSS.search(n):
            return "loss"
        if _ATTN.search(n):
            return "attention"
        if n.startswith("autograd::engine::evaluate_function"):
            break
    if gemm:
        three_d = any(isinstance(s, (list, tuple)) and len(s) == 3 for s in shapes or ())
        if three_d and dims_cfg.get("H") not in dims and "aten::linear" not in full:
            return "attention"  # batched per-head products of the torch attention fallback
        return "linear: attention projections"
    return "other"


def zero_scopes():
    """Wrap DeepSpeed ZeRO-3's parameter fetch/release and gradient reduction in profiler scopes."""
    targets = []
    if PartitionedParameterCoordinator is not None:
        targets += [(PartitionedParameterCoordinator, "fetch_sub_module", "zero:fetch"),
                    (PartitionedParameterCoordinator, "release_sub_module", "zero:release"),
                    (DeepSpeedZeroOptimizer_Stage3, "reduce_independent_p_g_buckets_and_remove_grads",
                     "zero:grad_reduce"),
                    (DeepSpeedZeroOptimizer_Stage3, "independent_gradient_partition_epilogue", "zero:grad_reduce")]

    def scoped(fn, scope):
        def wrapper(*a, **kw):
            with record_function(scope):
                return fn(*a, **kw)
        return wrapper

    return wrapped_methods(targets, scoped)


def _ns(e, which):
    """Start or end of a Kineto event in ns (older torch only has start_us / duration_us)."""
    f = getattr(e, f"{which}_ns", None)
    if f is not None:
        return f()
    start = e.start_us() * 1000
    return start if which == "start" else start + e.duration_us() * 1000


def _raw_ops(prof, on_device):
    """Ops with their weight straight from the Kineto results (no FunctionEvent objects: a 7B step has
    hundreds of thousands of events, which the profiler's Python post-processing would take minutes on).

    Returns (ops, kernels, device_total_us): ops = [(name, chain of ancestor names, weight_us, kernel names,
    kineto event)], weight = the GPU time of the kernels the op launched (CPU self time without a GPU);
    kernels = {kernel name: [us, count]}.
    """
    res = prof.profiler.kineto_results
    frontend, device, launched, kern, device_total = [], [], {}, {}, 0.0
    for e in res.events():
        if e.device_type() == DeviceType.CPU:
            if e.is_async() or e.linked_correlation_id() > 0:  # async ranges and CUDA runtime calls
                continue
            frontend.append(e)
        else:
            device.append(e)
    names = [e.name() for e in frontend]
    scopes = set(names)
    for e in device:
        name = e.name()
        ua = getattr(e, "is_user_annotation", None)
        if (ua is not None and ua()) or name in scopes:  # GPU-side ranges of record_function scopes
            continue
        dur = (_ns(e, "end") - _ns(e, "start")) / 1e3
        device_total += dur
        k = kern.setdefault(name, [0.0, 0])
        k[0] += dur
        k[1] += 1
        launched.setdefault(e.linked_correlation_id(), []).append((name, dur))
    # Nesting per thread by time containment (what the profiler's own tree does).
    recs = [(e.start_thread_id(), _ns(e, "start"), -_ns(e, "end"), i) for i, e in enumerate(frontend)]
    recs.sort()
    parent = [-1] * len(frontend)
    child_ns = [0] * len(frontend)
    stack, thread = [], None
    for tid, start, neg_end, i in recs:
        if tid != thread:
            stack, thread = [], tid
        while stack and stack[-1][1] <= start:
            stack.pop()
        if stack:
            parent[i] = stack[-1][0]
            child_ns[stack[-1][0]] += -neg_end - start
        stack.append((i, -neg_end))
    ops = []
    for i, e in enumerate(frontend):
        if on_device:
            ks = launched.get(e.correlation_id(), ())
            w = sum(d for _, d in ks)
            knames = [n for n, _ in ks]
        else:
            w = (_ns(e, "end") - _ns(e, "start") - child_ns[i]) / 1e3
            knames = []
        if w <= 0:
            continue
        chain, j = [], i
        while j >= 0:
            chain.append(names[j])
            j = parent[j]
        ops.append((names[i], chain, w, knames, e))
    return ops, kern, device_total


def _event_ops(prof, on_device):
    """Fallback through prof.events() (slow on big traces) when the raw Kineto results are not exposed."""
    ops, kern, device_total = [], {}, 0.0
    for e in prof.events():
        if "cpu" not in str(getattr(e, "device_type", "")).lower():
            if getattr(e, "is_user_annotation", False):
                continue
            dur = e.time_range.elapsed_us()
            device_total += dur
            k = kern.setdefault(e.name, [0.0, 0])
            k[0] += dur
            k[1] += 1
            continue
        if getattr(e, "is_async", False):
            continue
        ks = getattr(e, "kernels", []) or []
        w = float(sum(k.duration for k in ks)) if on_device else float(e.self_cpu_time_total)
        if w <= 0:
            continue
        chain, p = [], e
        while p is not None:
            chain.append(p.name)
            p = p.cpu_parent
        ops.append((e.name, chain, w, [k.name for k in ks], e))
    return ops, kern, device_total


def _shapes(ev):
    try:
        sh = ev.shapes() if callable(getattr(ev, "shapes", None)) else getattr(ev, "input_shapes", None)
        return [list(x) for x in sh] if sh else []
    except Exception:
        return []


_K_ATTN = re.compile(r"flash|fmha|attn|sdpa|_attn_")
_K_GEMM = re.compile(r"nvjet|gemm|cutlass|xmma|cublas|sm90_|sm80_|ampere_|hopper_")
_K_LOSS = re.compile(r"cross_entropy|_ce_|masked_ce|lse|log_softmax|nll")
_K_COMM = re.compile(r"nccl|allgather|reducescatter|allreduce")


def classify_kernel(name):
    """Category of a GPU kernel from its name alone (the CUDA-only profile has no op tree or shapes)."""
    n = name.lower()
    if _K_COMM.search(n):
        return "ZeRO fetch/release/grad-reduce"
    if _K_ATTN.search(n):
        return "attention"
    if _K_LOSS.search(n):
        return "loss"
    if _K_GEMM.search(n):
        return "linear (all GEMMs)"
    return "other"


def _profile_kernels(step_fn, device, title, top):
    """GPU profile of one step recording CUDA activity only (no CPU ops, no shapes: the profiler then adds
    almost nothing to the step): kernel time by category from kernel names, and GPU busy time against wall."""
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step_fn()
        _sync(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    kern, spans = {}, []
    for e in prof.profiler.kineto_results.events():
        ua = getattr(e, "is_user_annotation", None)
        if ua is not None and ua():
            continue
        start, end = _ns(e, "start"), _ns(e, "end")
        k = kern.setdefault(e.name(), [0.0, 0])
        k[0] += (end - start) / 1e3
        k[1] += 1
        spans.append((start, end))
    busy_ns, cur_s, cur_e = 0, None, None  # union of kernel intervals (streams may overlap)
    for a, b in sorted(spans):
        if cur_e is None or a > cur_e:
            busy_ns += (cur_e - cur_s) if cur_e is not None else 0
            cur_s, cur_e = a, b
        else:
            cur_e = max(cur_e, b)
    busy_ns += (cur_e - cur_s) if cur_e is not None else 0
    busy = busy_ns / 1e6
    cats = {c: 0.0 for c in CATEGORIES}
    for name, (us, _) in kern.items():
        cats[classify_kernel(name)] += us / 1e3
    total = sum(cats.values())
    lines = [f"== {title}", f"step wall {wall_ms:.1f} ms under a CUDA-only profiler; GPU busy {busy:.1f} ms "
             f"({100 * busy / max(wall_ms, 1e-9):.0f}% of wall), kernel time {total:.1f} ms",
             f"{'category':34s} {'ms':>10s} {'share':>7s}"]
    for c in CATEGORIES:
        if cats[c] or c in ("attention", "linear (all GEMMs)", "loss", "other"):
            lines.append(f"{c:34s} {cats[c]:10.2f} {100 * cats[c] / max(total, 1e-9):6.1f}%")
    lines.append(f"-- top {top} kernels by GPU time")
    for name, (w, n) in sorted(kern.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{w / 1e3:10.2f} ms {n:7d}x  {name[:110]}")
    return "\n".join(lines) + "\n", cats, wall_ms, busy


def profile_step(step_fn, device, dims_cfg, title, top=25):
    """Run step_fn once under torch.profiler -> (text report, {category: ms}, wall ms, busy ms).

    busy ms: total GPU kernel time (CPU self time without a GPU); busy / wall well below 1 means the step is
    bound by the host (Python, launches, ZeRO-3 hooks) rather than by the kernels.
    """
    on_device = device.type == "cuda"
    if on_device:
        return _profile_kernels(step_fn, device, title, top)
    acts = [ProfilerActivity.CPU]
    _sync(device)
    with zero_scopes(), profile(activities=acts, record_shapes=True) as prof:
        t0 = time.perf_counter()
        step_fn()
        _sync(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    t_parse = time.perf_counter()
    try:
        ops, kern, device_total = _raw_ops(prof, on_device)
        source = "kineto results"
    except Exception as exc:
        log(f"raw profiler results unavailable ({type(exc).__name__}: {exc}); using prof.events()")
        ops, kern, device_total = _event_ops(prof, on_device)
        source = "prof.events()"
    cats = {c: 0.0 for c in CATEGORIES}
    agg = {}
    attributed = 0.0
    for name, chain, w, knames, ev in ops:
        cat = classify(chain, knames, _shapes(ev), dims_cfg)
        cats[cat] += w
        attributed += w
        o = agg.setdefault((name, cat), [0.0, 0])
        o[0] += w
        o[1] += 1
    total = device_total if on_device else attributed
    if on_device:
        cats["unattributed"] = max(device_total - attributed, 0.0)
    what = "GPU kernel time" if on_device else "CPU self time"
    lines = [f"== {title}", f"step wall {wall_ms:.1f} ms under the profiler; {what} {total / 1e3:.1f} ms"
             + (f" ({100 * total / 1e3 / wall_ms:.0f}% of wall; the rest is host-bound or idle GPU)"
                if on_device else ""),
             f"{'category':34s} {'ms':>10s} {'share':>7s}"]
    for c in CATEGORIES:
        lines.append(f"{c:34s} {cats[c] / 1e3:10.2f} {100 * cats[c] / max(total, 1e-9):6.1f}%")
    lines.append(f"-- top {top} ops by {what} (the op that launched the kernels; category)")
    for (name, cat), (w, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{w / 1e3:10.2f} ms {n:7d}x  {cat:30s} {name[:90]}")
    if kern:
        lines.append(f"-- top {top} kernels by GPU time")
        for name, (w, n) in sorted(kern.items(), key=lambda kv: -kv[1][0])[:top]:
            lines.append(f"{w / 1e3:10.2f} ms {n:7d}x  {name[:110]}")
    lines.append(f"(parsed from {source} in {time.perf_counter() - t_parse:.1f} s, {len(ops)} weighted ops)")
    return "\n".join(lines) + "\n", {c: v / 1e3 for c, v in cats.items()}, wall_ms, total / 1e3
