"""Costing half of the CPU proxy (benchmarks/bench_step_ops.py): the full-size step on meta tensors, each op
costed from its shapes alone at the H200 roofline, max(FLOPs / PEAK_FLOPS, bytes / PEAK_BYTES), plus a per-launch
floor; and the calibration against the committed H200 profile.

FLOPs come from torch.utils.flop_counter's registry (attention kernels: 4 * sum(L^2) * Hq * D per QK^T-sized
product), bytes = input + output tensor sizes. DeepSpeed is not modelled (no ZeRO copies or collectives).
"""
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakTensorKeyDictionary

from benchmarks.harness import LORA
from benchmarks.step_census import NO_KERNEL, ATEN
from benchmarks.step_paths import FULL, Path, batch_for

PEAK_FLOPS = 790e12  # H200 bf16 dense GEMM throughput a large cuBLAS GEMM reaches (of 989 TFLOP/s spec)
PEAK_BYTES = 4.0e12  # H200 HBM3e bandwidth an elementwise kernel reaches (of 4.8 TB/s spec)
# per launch: fitted (21.78 us) on the engine's "other" ops of the H200 profile, 2026-11-30 CPU run
# (benchmarks/results/2026-11-30-cpu-step-ops/); it also absorbs elementwise kernels slower than 4.0 TB/s
HOST_FLOOR_US = 21.8

# H200 profile, 2026-11-26 (ZeRO-3, bf16, 32 x 512, mask 0.2 BERT): frozen GEMMs = linear: MLP + attention
# projections; other = the profiler's "other" category (elementwise, copies, norms, dropout, rotary).
PROFILE_MS = {"engine": {"gemm": 677.11 + 166.50, "other": 684.08},
              "reference-zero3": {"gemm": 676.22 + 165.66, "other": 712.79}}

GEMMS = {ATEN.mm.default, ATEN.addmm.default, ATEN.addmm_.default, ATEN.bmm.default, ATEN.baddbmm.default}
# in-place GEMMs (the fused LoRA's backward accumulates dX with addmm_): torch's registry has no entry for them,
# so they are costed with the out-of-place formula (same FLOPs)
INPLACE_FLOPS = {ATEN.addmm_.default: ATEN.addmm, ATEN.baddbmm_.default: ATEN.baddbmm}
ATTENTION_OPS = {"_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward"}


class CostMode(TorchDispatchMode):
    """Costs every kernel op of a meta run: rows (name, category, flops, bytes).

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

    def add(self, name, cat, flops, nb):
        self.rows.append((name, "optimizer" if self.phase[0] == "optimizer" else cat, flops, nb))

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
            cat = "linear: LoRA" if self.dims["r"] in dimset else "gemm"
        else:
            cat = "other"
        self.add(name, cat, flops, _nbytes(ins) + _nbytes(outs))
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
        cat = "attention" if "attention" in module else "loss" if "masked_ce" in module else "other"
        self.add("triton:" + name, cat, flops, _nbytes([t for t in ts if t.is_meta]))


def _nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


def with_floor(roof, n, floor_us):
    """{category: ms} and total from roofline times and launch counts per category."""
    out = {c: roof[c] + floor_us * 1e-3 * n.get(c, 0) for c in roof}
    return {"total": sum(out.values()), **out}


def fit_floor(results):
    """Per-launch floor (us) that makes the engine's predicted "other" ops match the H200 profile."""
    r = results.get("engine", {})
    if "cal_roofline" not in r:
        return None
    return 1e3 * (PROFILE_MS["engine"]["other"] - r["cal_roofline"].get("other", 0.0)) / max(r["cal_n"]["other"], 1)


def finish(results, floor_us):
    """Apply the per-launch floor to every path's roofline prediction (and to the calibration runs)."""
    for r in results.values():
        if "roofline" in r:
            r["predicted"] = {k: round(v, 2) for k, v in with_floor(r["roofline"], r["roofline_n"], floor_us).items()}
            r["predicted_ms"] = round(r["predicted"]["total"], 1)
        if "cal_roofline" in r:
            r["calibration"] = with_floor(r["cal_roofline"], r["cal_n"], floor_us)


def predicted(rows, floor_us=HOST_FLOOR_US):
    """{category: ms} + total, per op max(flops / peak, bytes / bandwidth) + floor."""
    cats = collections.Counter()
    n = collections.Counter()
    for _, cat, flops, nb in rows:
        cats[cat] += max(flops / PEAK_FLOPS, nb / PEAK_BYTES) * 1e3 + floor_us * 1e-3
        n[cat] += 1
    return {"total": sum(cats.values()), **cats}, n


def predict_path(name, sets, micro, shape, mask, layers, launches):
    """Meta run of the full-size step -> ({category: ms}, {category: op count})."""
    spec = dict(FULL, num_hidden_layers=layers)
    path = Path(name, spec, "meta", sets, micro)
    if name != "reference":  # DeepSpeed bf16 keeps every parameter, LoRA included, in bf16 (PEFT made LoRA fp32)
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
    del path
    pred, n = predicted(mode.rows, floor_us=0.0)
    census = collections.Counter(("triton:" + r[0][7:]) if r[0].startswith("triton:") else "aten." + r[0]
                                 for r in mode.rows)
    return pred, n, census, batch.masked
