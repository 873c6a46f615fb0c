"""Costing half of the CPU proxy (benchmarks/bench_step_ops.py): the full-size step on meta tensors, each op
costed from its shapes alone at the H200 roofline, max(FLOPs / PEAK_FLOPS, bytes / PEAK_BYTES), and sorted into
the op classes the calibration (benchmarks/step_calibration.py) prices at measured efficiencies: GEMMs of the frozen
weights, attention, LoRA GEMMs (and the fused LoRA's Triton kernels), elementwise (pointwise, copies, casts,
dropout, reductions, and the Triton RMSNorm / RoPE / GLU kernels), loss, optimizer (everything in the optimizer
step), hooks (DeepSpeed's gradient hooks: counted, never in a meta run) and other.

FLOPs come from torch.utils.flop_counter's registry (SDPA's with grouped K/V at the query's heads: full_head_kv);
the Triton attention kernels' from their role (triton(): each QK^T-sized product is 2 * sum(L^2) * Hq * D over the
real sequence lengths L, bidirectional, so never halved; the forward runs 2 of them (Q K^T, P V), the dK/dV kernel 4
(Q K^T recomputed, dV, dP, dK), the dQ kernel 3 (Q K^T and dP recomputed, dQ): forward 4 * sum(L^2) * Hq * D,
backward 14 * sum(L^2) * Hq * D).

Bytes are what the op reads plus what it writes (op_bytes): every tensor input is read, except a target the op only
overwrites (out= arguments, copy_ / fill_ / zero_ and the random fills' self; the scatters' self, of which only the
indexed rows, the size of the source, are written); every new output is written, and so is every input the op
mutates (the schema's Tensor(a!)): an in-place add_ reads self and other and writes self, 3 tensors' bytes. A read
counts the elements its input's storage holds for it, not the view's: an expanded view (stride 0, such as the
(B, 1, S, S) attention mask expanded over the heads) reads its storage once, since the kernel's repeated reads of
the same bytes come from cache; the elements, not the storage allocation, so a slice reads only itself.
DeepSpeed is not run on meta tensors (no ZeRO copies or collectives); predict_path sets torch.nn.functional.linear
as the path's ZeRO stage leaves it (ZeRO-3 replaces it with deepspeed's zero3_linear_wrap).
"""
import collections
import contextlib
import math

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakTensorKeyDictionary

from benchmarks.harness import LORA
from benchmarks.step_census import ATEN, NO_KERNEL
from benchmarks.step_paths import FULL, Path, batch_for

PEAK_FLOPS = 790e12  # H200 bf16 dense GEMM throughput a large cuBLAS GEMM reaches (of 989 TFLOP/s spec)
PEAK_BYTES = 4.0e12  # H200 HBM3e bandwidth an elementwise kernel reaches (of 4.8 TB/s spec)
# fp32 GEMMs (torch's default on CUDA: no TF32) run on the CUDA cores, 67 TFLOP/s spec; taken at the same 80% of
# spec as the bf16 figure. Only the engine's exact torch attention path and PEFT's fp32 adapters have them.
PEAK_FLOPS_FP32 = 0.8 * 67e12
# The H200's spec peaks: no kernel beats them, so no predicted time is below max(FLOPs / SPEC, bytes / SPEC_BYTES)
# (summarise's "roof_hw"). The achievable figures above are not such a bound: the profile's frozen GEMMs ran at 0.97x
# their time at PEAK_FLOPS (about 815 TFLOP/s).
SPEC_FLOPS = 989.4e12  # dense bf16 (benchmarks/train_step_measure.PEAK_TFLOPS)
SPEC_FLOPS_FP32 = 67e12
SPEC_BYTES = 4.8e12
SPEC_OF = {PEAK_FLOPS: SPEC_FLOPS, PEAK_FLOPS_FP32: SPEC_FLOPS_FP32}
# a lower bound of roof_hw from roof alone (rows saved before roof_hw was recorded)
HW_OVER_ROOF = min(PEAK_FLOPS / SPEC_FLOPS, PEAK_FLOPS_FP32 / SPEC_FLOPS_FP32, PEAK_BYTES / SPEC_BYTES)
# per launch: fitted (21.78 us) on the engine's "other" ops of the H200 profile, 2026-11-30 CPU run
# (benchmarks/results/2026-11-30-cpu-step-ops/); it also absorbs elementwise kernels slower than 4.0 TB/s
HOST_FLOOR_US = 21.8

GEMMS = {ATEN.mm.default, ATEN.addmm.default, ATEN.addmm_.default, ATEN.bmm.default, ATEN.baddbmm.default}
# in-place GEMMs (the fused LoRA's backward accumulates dX with addmm_): torch's registry has no entry for them,
# so they are costed with the out-of-place formula (same FLOPs)
INPLACE_FLOPS = {ATEN.addmm_.default: ATEN.addmm, ATEN.baddbmm_.default: ATEN.baddbmm}
# what streams its tensors once besides the ops torch tags pointwise (is_elementwise)
ELEMENTWISE_EXTRA = {"copy_", "_to_copy", "native_dropout", "mean", "sum", "fill_", "zero_", "linalg_vector_norm",
                     "amax", "amin"}
# in-place ops that overwrite their target without reading it
OVERWRITE = {"copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_", "exponential_",
             "geometric_", "cauchy_", "log_normal_"}
# in-place scatters: of the target only the indexed rows are written (the source's bytes: index_copy_'s source,
# index_put_'s values, the op's last tensor argument), the rest is neither read nor written
SCATTER = {"index_copy_", "index_put_", "_index_put_impl_"}
CLASSES = ("gemm", "attention", "lora", "elementwise", "loss", "optimizer", "hooks", "other")
ATTENTION_OPS = {"_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward"}


class CostMode(TorchDispatchMode):
    """Costs every kernel op of a meta run: rows (name, class, flops, bytes, triton) with class in CLASSES.

    The batch enters as meta tensors that carry a real CPU "shadow" (to_meta); an op whose tensor inputs all have
    shadows also runs on them, so data-dependent ops (nonzero, .item(), .tolist()) on the batch, its masks and
    index tensors see real values while every float tensor of the model stays shape-only. dims: {"V": vocab,
    "r": LoRA rank} (an op touching V is the loss, a GEMM touching r a LoRA GEMM); lens: the real sequence
    lengths (the attention kernels' FLOPs); phase: a one-item list, "optimizer" once the optimizer step runs.
    """

    def __init__(self, dims, lens, phase):
        super().__init__()
        self.rows = []
        self.phase = phase
        self.dims = dims
        self.sq = sum(n * n for n in lens)
        self.shadow = WeakTensorKeyDictionary()

    def to_meta(self, t):
        """A real tensor -> a meta tensor shadowed by it."""
        m = t.to("meta")
        self.shadow[m] = t
        return m

    def add(self, name, cat, flops, nb, triton=False, peak=PEAK_FLOPS):
        self.rows.append((name, "optimizer" if self.phase[0] == "optimizer" else cat, flops, nb, triton, peak))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not any(t.is_meta for t in leaves):
            return func(*args, **kwargs)  # host-side data (seed draws)
        shadowed = all((not t.is_meta) or t in self.shadow for t in leaves)
        if shadowed:  # every input has real values: compute them too
            rargs, rkw = tree_map(lambda t: self.shadow.get(t, t) if isinstance(t, torch.Tensor) and t.is_meta
                                  else t, (args, kwargs))
            if "device" in rkw:
                rkw = dict(rkw, device="cpu")
            real = func(*rargs, **rkw)
            if func is ATEN._local_scalar_dense.default:
                return real
        if func is ATEN._local_scalar_dense.default:
            return 1  # a value computed on the GPU from model data (Adam's step, a finiteness check)
        if func in (ATEN.nonzero.default, ATEN.masked_select.default) and not shadowed:
            raise RuntimeError(f"{func} on a meta tensor without real values: its size depends on GPU data")
        args, kwargs = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) and not t.is_meta
                                else t, (args, kwargs))
        if shadowed and func in (ATEN.nonzero.default, ATEN.masked_select.default):
            out = real.to("meta")
        else:
            out = func(*args, **kwargs)
        if shadowed:
            for m, r in zip(tree_leaves(out), tree_leaves(real)):
                if isinstance(m, torch.Tensor) and isinstance(r, torch.Tensor):
                    self.shadow[m] = r
        if func.is_view or func in NO_KERNEL:
            return out
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        outs = [t for t in outs if not any(t is i for i in ins)]
        fc = flop_registry.get(INPLACE_FLOPS.get(func, func.overloadpacket))
        name = func.overloadpacket.__name__
        if fc is None:
            flops = 0
        elif name in ATTENTION_OPS:
            flops = fc(*full_head_kv(func, args), **kwargs, out_val=out)
        else:
            flops = fc(*args, **kwargs, out_val=out)
        dimset = {d for t in ins for d in t.shape}
        if name in ATTENTION_OPS:
            cat = "attention"
        elif self.dims["V"] in dimset:
            cat = "loss"
        elif func in GEMMS:
            cat = "lora" if self.dims["r"] in dimset else "gemm"
        else:
            cat = "elementwise" if is_elementwise(name) else "other"
        fp32 = func in GEMMS and all(t.dtype == torch.float32 for t in ins)
        self.add(name, cat, flops, op_bytes(func, args, kwargs, outs), peak=PEAK_FLOPS_FP32 if fp32 else PEAK_FLOPS)
        return out

    def triton(self, module, name, args):
        """A Triton launch (from TritonLaunches): attention FLOPs from the launch's role, bytes of its tensors."""
        ts = [t for t in args if isinstance(t, torch.Tensor)]
        q = ts[0] if ts else None
        flops = 0
        if "attention" in module and q is not None and q.dim() >= 2:
            hq_d = q.shape[-2] * q.shape[-1]
            per = {"_attn_fwd": 2, "_attn_bwd_dkdv": 4, "_attn_bwd_dq": 3}.get(name, 0)
            flops = per * 2 * self.sq * hq_d
        cat = ("attention" if "attention" in module else "loss" if "masked_ce" in module
               else "lora" if "lora" in module else "elementwise")  # rms_norm, rope, glu
        self.add("triton:" + name, cat, flops, _nbytes([t for t in ts if t.is_meta]), triton=True)


def full_head_kv(func, args):
    """An SDPA op's positional arguments with a grouped K and V replaced by meta tensors at the query's head count,
    for its FLOPs alone.

    With grouped-query attention (Hkv K/V heads, Hq = g Hkv query heads, enable_gqa) query head h attends to K/V
    head h // g, and each of the Hq heads still computes its own L_q x L_k scores over D and its own P V: the FLOPs
    are those of Hq-head attention, 4 B Hq L_q L_k D forward (2 B Hq L_q L_k D per product), whatever Hkv is.
    torch 2.13's sdpa_flop_count counts so; torch 2.11's asserts that K and V have the query's heads. The bytes
    stay the op's own (op_bytes): the kernel reads a grouped K/V once, Hkv heads."""
    names = [a.name for a in func._schema.arguments]
    qi, ki, vi = (names.index(n) for n in ("query", "key", "value"))
    q, k = args[qi], args[ki]
    if k.dim() != 4 or k.shape[1] == q.shape[1]:
        return args
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{func}: {q.shape[1]} query heads are not groups of {k.shape[1]} K/V heads")
    args = list(args)
    for i in (ki, vi):
        t = args[i]
        args[i] = t.new_empty((t.shape[0], q.shape[1], *t.shape[2:]), device="meta")
    return tuple(args)


def _nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


def _read_nbytes(ts):
    """Bytes a kernel reads from these inputs: the elements each one's storage holds for it (a stride-0
    dimension, as in an expanded view, reads the same elements again: from cache, not memory)."""
    return sum(math.prod(n for n, st in zip(t.shape, t.stride()) if st != 0) * t.element_size() if t.numel() else 0
               for t in ts)


def op_bytes(func, args, kwargs, new_outs):
    """Bytes one ATen op moves: reads + writes (see the module docstring). new_outs: its outputs that are not
    its inputs (an in-place op returns its target: that one is counted as a mutated input)."""
    name = func.overloadpacket.__name__
    overwritten, mutated = [], []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        v = kwargs.get(a.name) if a.kwarg_only or i >= len(args) else args[i]
        ts = [t for t in tree_leaves(v) if isinstance(t, torch.Tensor)]
        (overwritten if a.is_out or name in OVERWRITE else mutated).extend(ts)
    ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if name in SCATTER:  # the indexed rows alone are written: as many bytes as the source, its last tensor
        targets = overwritten + mutated
        reads = [t for t in ins if not any(t is m for m in targets)]
        return _read_nbytes(reads) + _nbytes(reads[-1:]) + _nbytes(new_outs)
    reads = [t for t in ins if not any(t is w for w in overwritten)]
    return _read_nbytes(reads) + _nbytes(new_outs) + _nbytes(overwritten) + _nbytes(mutated)


def is_elementwise(name):
    """An ATen op (overload packet name) that streams its tensors once: pointwise, copies, casts, dropout, fills
    and reductions. Used for the meta run's ops and for the profile's op names alike."""
    if name in ELEMENTWISE_EXTRA:
        return True
    packet = getattr(ATEN, name, None)
    if packet is None or not hasattr(packet, "overloads"):
        return False
    return any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads())


def summarise(rows):
    """{class: {"roof": ms, "n": launches, "roof_triton": ms, "n_triton": launches, "roof_hw": ms,
    "roof_hw_triton": ms}}: per op max(flops / peak, bytes / PEAK_BYTES) with peak PEAK_FLOPS (PEAK_FLOPS_FP32 for
    fp32 GEMMs), no per-launch floor; the Triton launches apart; roof_hw the same at the spec peaks (SPEC_*), the
    time no kernel beats."""
    out = {c: {"roof": 0.0, "n": 0, "roof_triton": 0.0, "n_triton": 0, "roof_hw": 0.0, "roof_hw_triton": 0.0}
           for c in CLASSES}
    for _, cat, flops, nb, triton, peak in rows:
        ms = max(flops / peak, nb / PEAK_BYTES) * 1e3
        hw = max(flops / SPEC_OF.get(peak, SPEC_FLOPS), nb / SPEC_BYTES) * 1e3
        d = out[cat]
        d["roof"] += ms
        d["roof_hw"] += hw
        d["n"] += 1
        if triton:
            d["roof_triton"] += ms
            d["roof_hw_triton"] += hw
            d["n_triton"] += 1
    return out


def predicted(rows, floor_us=HOST_FLOOR_US):
    """{class: ms} + total at the roofline plus floor_us per launch, and {class: launches}."""
    s = summarise(rows)
    cats = {c: v["roof"] + floor_us * 1e-3 * v["n"] for c, v in s.items() if v["n"]}
    return {"total": sum(cats.values()), **cats}, {c: v["n"] for c, v in s.items() if v["n"]}


try:  # optional, as in benchmarks.harness: ZeRO-3's linear, which linear_under_zero puts in place
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Init
except Exception:
    zero3_linear_wrap = Init = None


@contextlib.contextmanager
def linear_under_zero(stage):
    """torch.nn.functional.linear as DeepSpeed leaves it on a path of ZeRO ``stage`` (None: no DeepSpeed):
    ZeRO-3 replaces it with deepspeed's zero3_linear_wrap (an autograd Function: under PEFT's LoRA its step runs one
    more LoRA GEMM a layer than torch's linear, 1792 against 1760 on 32 layers, the profile's 1792), and leaves it
    so for the rest of the process; other stages keep torch's. DeepSpeed does not run on meta
    tensors, so the meta run sets it here, whatever the process ran before, and restores it after."""
    if zero3_linear_wrap is None:  # no DeepSpeed: no ZeRO-3 path to cost (the paths that need it fail to build)
        yield
        return
    current = F.linear
    plain = getattr(Init, "linear_bk", torch._C._nn.linear) if current is zero3_linear_wrap else current
    F.linear = zero3_linear_wrap if stage == 3 else plain
    try:
        yield
    finally:
        F.linear = current


def predict_path(name, sets, micro, shape, mask, layers, launches, structure=FULL):
    """Meta run of the full-size step of ``structure`` (a model spec; default the Mistral-7B one) at ``layers``
    -> {"summary": summarise(rows), "census": {op: launches}, "masked": rows the loss reads, "recompute": the
    path's policy, "zero_stage": its ZeRO stage (the memory plan's, for the engine; None without DeepSpeed)}.
    F.linear is the one the path's ZeRO stage leaves (linear_under_zero)."""
    spec = dict(structure, num_hidden_layers=layers)
    path = Path(name, spec, "meta", sets, micro)
    if not path.hf:  # DeepSpeed bf16 keeps every parameter, LoRA included, in bf16 (PEFT made LoRA fp32)
        path.module.to(path.dtype)
    for p in path.params:  # the optimizer's state exists already: cost a steady-state step, not the first
        p.grad = torch.zeros_like(p)
    path.opt.step()
    path.opt.zero_grad(set_to_none=True)
    batch = batch_for(shape, spec["vocab_size"], mask)
    phase = ["fwd_bwd"]
    mode = CostMode({"V": spec["vocab_size"], "r": LORA["r"]}, batch.lens, phase)
    batch.engine = {k: mode.to_meta(v) if torch.is_tensor(v) else v for k, v in batch.engine.items()}
    batch.hf = {k: mode.to_meta(v) for k, v in batch.hf.items()}
    launches.sink = mode
    zero_stage = None if path.hf else path.zero_stage
    try:
        with linear_under_zero(zero_stage), mode:
            path.forward_backward(batch)
            phase[0] = "optimizer"
            path.optimizer_step()
    finally:
        launches.sink = None
    census = collections.Counter(("triton:" + r[0][7:]) if r[0].startswith("triton:") else "aten." + r[0]
                                 for r in mode.rows)
    return {"summary": summarise(mode.rows), "census": dict(census.most_common()), "masked": batch.masked,
            "recompute": path.recompute, "zero_stage": zero_stage}
