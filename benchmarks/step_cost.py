"""Costing half of the CPU proxy (benchmarks/bench_step_ops.py): the full-size step on meta tensors, each op
costed from its shapes alone at the H200 roofline, max(FLOPs / PEAK_FLOPS, bytes / PEAK_BYTES), and sorted into
the op classes the calibration (benchmarks/step_calibration.py) prices at measured efficiencies: GEMMs of the frozen
weights, attention, LoRA GEMMs (and the fused LoRA's Triton kernels), elementwise (pointwise, copies, casts,
dropout, reductions, and the Triton RMSNorm / RoPE / GLU kernels), loss, optimizer (everything in the optimizer
step), hooks (DeepSpeed's gradient hooks: counted, never in a meta run) and other.

FLOPs come from torch.utils.flop_counter's registry (attention kernels: 4 * sum(L^2) * Hq * D per QK^T-sized
product), bytes = input + output tensor sizes. DeepSpeed is not run on meta tensors (no ZeRO copies or collectives).
"""
import collections

import torch
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
        flops = fc(*args, **kwargs, out_val=out) if fc is not None else 0
        name = func.overloadpacket.__name__
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
        self.add(name, cat, flops, _nbytes(ins) + _nbytes(outs), peak=PEAK_FLOPS_FP32 if fp32 else PEAK_FLOPS)
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


def _nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


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
    """{class: {"roof": ms, "n": launches, "roof_triton": ms, "n_triton": launches}}: per op
    max(flops / peak, bytes / PEAK_BYTES) with peak PEAK_FLOPS (PEAK_FLOPS_FP32 for fp32 GEMMs), no per-launch
    floor; the Triton launches apart."""
    out = {c: {"roof": 0.0, "n": 0, "roof_triton": 0.0, "n_triton": 0} for c in CLASSES}
    for _, cat, flops, nb, triton, peak in rows:
        ms = max(flops / peak, nb / PEAK_BYTES) * 1e3
        d = out[cat]
        d["roof"] += ms
        d["n"] += 1
        if triton:
            d["roof_triton"] += ms
            d["n_triton"] += 1
    return out


def predicted(rows, floor_us=HOST_FLOOR_US):
    """{class: ms} + total at the roofline plus floor_us per launch, and {class: launches}."""
    s = summarise(rows)
    cats = {c: v["roof"] + floor_us * 1e-3 * v["n"] for c, v in s.items() if v["n"]}
    return {"total": sum(cats.values()), **cats}, {c: v["n"] for c, v in s.items() if v["n"]}


def predict_path(name, sets, micro, shape, mask, layers, launches, structure=FULL):
    """Meta run of the full-size step of ``structure`` (a model spec; default the Mistral-7B one) at ``layers``
    -> {"summary": summarise(rows), "census": {op: launches}, "masked": rows the loss reads, "recompute": the
    path's policy, "zero_stage": its ZeRO stage (the memory plan's, for the engine)}."""
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
    try:
        with mode:
            path.forward_backward(batch)
            phase[0] = "optimizer"
            path.optimizer_step()
    finally:
        launches.sink = None
    census = collections.Counter(("triton:" + r[0][7:]) if r[0].startswith("triton:") else "aten." + r[0]
                                 for r in mode.rows)
    return {"summary": summarise(mode.rows), "census": dict(census.most_common()), "masked": batch.masked,
            "recompute": path.recompute, "zero_stage": path.zero_stage if not path.hf else None}
