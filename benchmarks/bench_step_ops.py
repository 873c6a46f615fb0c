"""A CPU proxy of the GPU MNTP train step: kernel launches, host syncs, ZeRO hooks, host time and a predicted
H200 step time for each path, so a change to the step can be judged without a GPU.

    python -m benchmarks.bench_step_ops                       # all three paths, < 5 min on 2 cores
    python -m benchmarks.bench_step_ops --set model.fused_ops=triton --paths engine   # after an engine change
    python -m benchmarks.bench_step_ops --reduced             # CI: 2 layers, small batch, a few host steps

Paths (one optimizer step of MNTP, the same tokens, masks and micro-batching on every path):
  * reference        llm2vec's one-GPU recipe: HF model + PEFT LoRA, SDPA non-causal with no mask, full
                     gradient checkpointing, full-logit CE inside the HF loss, clip 1.0 + torch AdamW, no
                     DeepSpeed (benchmarks.bench_train_step.build_hf_reference; no engine code);
  * reference-zero3  the older reference of bench_train_step: the engine's model under DeepSpeed ZeRO-3 with
                     SDPA given a dense (B, 1, S, S) mask and full logits;
  * engine           the engine's own code: engine.config (configs/mistral-7b/mntp.yaml + --set overrides),
                     engine.modeling.load_model, engine.trainer.setup_model (fused LoRA, the memory plan's ZeRO
                     stage and recompute policy for an H200), engine.stages.mntp, DeepSpeed from
                     engine.config.deepspeed_config. model.attention / model.loss default to triton here.

Model: the Mistral-7B structure (32 layers, 32 query / 8 KV heads, MLP ratio 3.5, untied LM head) with LoRA r16
on all seven projections (dropout 0.05, on), bf16. Counting and host time run it at tiny width (hidden 64,
head_dim 2, intermediate 224, vocab 1024); the prediction runs it at full size (hidden 4096, vocab 32000) on
meta tensors. Batch: 32 x 512 tokens in one micro-batch, masking as llm2vec does for Mistral (0.8, every
masked token replaced: configs/mistral-7b/mntp.yaml), mask token = EOS.

Figures per path:
  launches      kernel launches in one optimizer step (forward, backward, optimizer, ZeRO): ATen ops that are
                neither views nor bare allocations or reshapes (empty*, resize_, set_, lift_fresh,
                _unsafe_view) and that touch a
                device tensor, plus Triton launches. Triton kernels are enabled (TRITON_INTERPRET=1) and
                their launcher is intercepted: each launch is counted and not executed (the floating tensors
                it was handed are made finite, so that DeepSpeed's inf/NaN check does not skip the optimizer
                step: see TritonLaunches; skipped steps are reported and must be 0). A tensor is host-side
                when a factory op made it with
                at most one element (the seed draws) or from Python data (torch.tensor), or when every
                tensor it was computed from is host-side; everything else would live on the GPU.
                dropout is dispatched as aten::native_dropout, as on CUDA (the CPU build decomposes it);
                AdamW and gradient clipping use their foreach (multi-tensor) ops, CUDA's default.
  syncs         device-to-host syncs inside forward + backward: _local_scalar_dense (.item(), bool(), int()),
                nonzero, masked_select, unique, .tolist() on device tensors.
  opt           launches of the optimizer step alone (DeepSpeed's wrapper, clipping, AdamW), part of
                launches; opt_syncs its host syncs (DeepSpeed's inf/NaN checks read bools back).
  zero_hooks    DeepSpeed ZeRO-3 module fetch_sub_module + release_sub_module calls in the step.
  host_ms       wall time of the step at tiny width on one thread, min and median over --host-steps steps,
                on a --host-batch batch (the same op sequence as 32 x 512; the launch count at that batch is
                printed beside it). Triton launches cost nothing here (intercepted), so this is dispatcher +
                Python + hooks + small CPU kernels.
  predicted_ms  the full-size step on an H200, from shapes alone: the path's forward, backward and optimizer
                step run on meta tensors (the batch and its index tensors stay real, so packing and row
                selection see real lengths); per op max(FLOPs / 790 TFLOP/s, bytes / 4.0 TB/s) + a per-launch
                floor (HOST_FLOOR_US). FLOPs from torch.utils.flop_counter's registry (attention kernels:
                4 * sum(L^2) * Hq * D per QK^T-sized product), bytes = input + output tensor sizes. SDPA is
                dispatched to the fused op a GPU would run (flash without a mask, memory-efficient with one).
                DeepSpeed is not modelled (no ZeRO copies or collectives in the prediction).

Calibration (--calibrate, and printed on every full run): the ZeRO-3 engine and reference MNTP steps that the
2026-11-26 H200 profile measured (benchmarks/results/2026-11-26-h200/train_step_profile.txt; mask 0.2, BERT
scheme) are predicted and compared on two figures: GEMMs of the frozen weights (MLP + attention projections:
843.6 ms engine, 841.9 ms reference) and "other" ops (684.1 ms engine, 712.8 ms reference). HOST_FLOOR_US was
fitted once on the engine's "other" figure (each run prints the floor that would fit it); the reference's two
figures and the engine's GEMMs are out of sample. Errors at 21.8 us (2026-11-30): engine GEMMs +4.7%, other
0.0% (fitted); reference-zero3 GEMMs +4.9%, other -2.6%.

The table goes to stdout; its last line is one JSON object keyed by path, each with launches, syncs,
zero_hooks, host_ms ({"min", "median"}) and predicted_ms. Each path runs in its own process.
"""
import argparse
import collections
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, ROOT)

PATHS = ("reference", "reference-zero3", "engine")
CONFIG = os.path.join(ROOT, "configs", "mistral-7b", "mntp.yaml")

PEAK_FLOPS = 790e12  # H200 bf16 dense GEMM throughput a large cuBLAS GEMM reaches (of 989 TFLOP/s spec)
PEAK_BYTES = 4.0e12  # H200 HBM3e bandwidth an elementwise kernel reaches (of 4.8 TB/s spec)
# per launch: fitted (21.78 us) on the engine's "other" ops of the H200 profile, 2026-11-30 CPU run
# (benchmarks/results/2026-11-30-cpu-step-ops/); it also absorbs elementwise kernels slower than 4.0 TB/s
HOST_FLOOR_US = 21.8

# H200 profile, 2026-11-26 (ZeRO-3, bf16, 32 x 512, mask 0.2 BERT): frozen GEMMs = linear: MLP + attention
# projections; other = the profiler's "other" category (elementwise, copies, norms, dropout, rotary).
PROFILE_MS = {"engine": {"gemm": 677.11 + 166.50, "other": 684.08},
              "reference-zero3": {"gemm": 676.22 + 165.66, "other": 712.79}}

FULL = dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
            sliding_window=None, tie_word_embeddings=False)
TINY = dict(FULL, vocab_size=1024, hidden_size=64, intermediate_size=224, head_dim=2)
LORA = dict(r=16, alpha=32, dropout=0.05)


def log(*a):
    print("[step_ops]", *a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Interception: Triton launches, dropout, SDPA, ZeRO hooks, .tolist()
# ----------------------------------------------------------------------------------------------

class TritonLaunches:
    """Replace the interpreter's launcher: record (kernel module, name, args) and skip execution.

    A skipped kernel leaves its outputs as whatever the allocator handed out: often zeros, sometimes bits that
    read as inf or NaN. Values do not matter to a census, but control flow that reads them does: DeepSpeed's
    stage-0 bf16 optimizer checks every gradient for inf / NaN and skips the whole step (no norm, no AdamW, no
    copy-back) on the first bad one, so an unsanitised count was sometimes a skipped step, and its size varied
    between runs. Every floating tensor a skipped kernel was handed therefore gets its non-finite entries
    zeroed and is clamped to +-1e3 (finite inputs of a tiny model are far inside that, so they do not change),
    outside any dispatch mode so that this costs no counted launch.
    """

    def __init__(self):
        self.calls = []
        self.sink = None  # a CostMode that wants each launch's cost

    @contextlib.contextmanager
    def active(self):
        from triton.runtime.interpreter import InterpretedFunction

        orig = InterpretedFunction.run
        rec = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            if warmup:
                return None
            fn = getattr(fn_self, "fn", None)
            name, module = getattr(fn, "__name__", "?"), getattr(fn, "__module__", "?")
            rec.calls.append(name)
            if rec.sink is not None:
                rec.sink.triton(module, name, args)
            else:
                _sanitise(args)
            return None

        InterpretedFunction.run = run
        try:
            yield self
        finally:
            InterpretedFunction.run = orig


def _sanitise(args):
    import torch
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        for a in args:
            if isinstance(a, torch.Tensor) and a.is_floating_point() and not a.is_meta and a.numel():
                # .data: no autograd record and no version bump (these tensors may be saved for backward)
                a.data.nan_to_num_(0.0, 0.0, 0.0).clamp_(-1e3, 1e3)


@contextlib.contextmanager
def gpu_like_ops(meta=False):
    """Dispatch what CUDA dispatches: dropout as one aten::native_dropout (the CPU build decomposes it into
    bernoulli_ / div_ / mul); on meta tensors SDPA as the fused op a GPU picks (flash without a mask,
    memory-efficient with one) rather than the math decomposition."""
    import torch
    import torch.nn.functional as F

    orig_dropout, orig_sdpa = F.dropout, F.scaled_dot_product_attention

    def dropout(x, p=0.5, training=True, inplace=False):
        if not training or p == 0.0:
            return x
        return torch.ops.aten.native_dropout(x, p, True)[0]

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **kw):
        if not q.is_meta:
            return orig_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                             enable_gqa=enable_gqa, **kw)
        if k.shape[1] != q.shape[1]:
            g = q.shape[1] // k.shape[1]
            k, v = (t.repeat_interleave(g, dim=1) for t in (k, v))
        if attn_mask is None:
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False,
                                                                      scale=scale)[0]
        bias = attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, dropout_p, is_causal,
                                                                      scale=scale)[0]

    F.dropout = dropout
    torch.nn.modules.dropout.F.dropout = dropout
    if meta:
        F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.dropout = orig_dropout
        torch.nn.modules.dropout.F.dropout = orig_dropout
        F.scaled_dot_product_attention = orig_sdpa


@contextlib.contextmanager
def zero_hook_counter(counts):
    """Count DeepSpeed ZeRO-3's fetch_sub_module / release_sub_module calls into counts['zero_hooks']."""
    patched = []
    try:
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as PPC

        for name in ("fetch_sub_module", "release_sub_module"):
            fn = PPC.__dict__.get(name)
            if fn is None:
                continue

            def wrapper(*a, _fn=fn, **kw):
                counts["zero_hooks"] += 1
                return _fn(*a, **kw)

            setattr(PPC, name, wrapper)
            patched.append((PPC, name, fn))
    except Exception:
        pass
    try:
        yield
    finally:
        for cls, name, fn in patched:
            setattr(cls, name, fn)


# ----------------------------------------------------------------------------------------------
# Counting (real tensors, tiny width) and costing (meta tensors, full size)
# ----------------------------------------------------------------------------------------------

def _aten():
    import torch

    a = torch.ops.aten
    no_kernel = {a.empty.memory_format, a.empty_strided.default, a.empty_like.default, a.new_empty.default,
                 a.new_empty_strided.default, a.resize_.default, a.set_.source_Storage_storage_offset,
                 a.set_.source_Tensor, a.set_.default, a.lift_fresh.default, a._local_scalar_dense.default,
                 a.detach.default, a.alias.default, a._unsafe_view.default}
    sync = {a._local_scalar_dense.default, a.nonzero.default, a.masked_select.default, a._unique2.default,
            a.unique_dim.default, a.unique_consecutive.default}
    return no_kernel, sync


class OpCensus:
    """TorchDispatchMode counting launches (per op name) and device->host syncs; see the module docstring."""

    def __new__(cls, *a, **kw):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves
        from torch.utils.weak import WeakTensorKeyDictionary

        no_kernel, sync_ops = _aten()
        lift = torch.ops.aten.lift_fresh.default

        class _Census(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.ops = collections.Counter()
                self.syncs = collections.Counter()
                self.count_syncs = False
                self.host = WeakTensorKeyDictionary()

            def is_host(self, t):
                return t in self.host

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                out = func(*args, **kwargs)
                outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
                if ins:
                    host = all(self.is_host(t) for t in ins) or func is lift
                else:  # factory op: seed draws are one-element CPU tensors
                    host = all(t.numel() <= 1 for t in outs)
                if host:
                    for t in outs:
                        self.host[t] = True
                    return out
                if func in sync_ops and self.count_syncs:
                    self.syncs[str(func.overloadpacket)] += 1
                if func.namespace == "aten" and not func.is_view and func not in no_kernel:
                    self.ops[str(func.overloadpacket)] += 1
                elif func.namespace not in ("aten", "prim"):
                    self.ops[str(func.overloadpacket)] += 1  # c10d collectives (ZeRO gathers / reductions)
                return out

        mode = _Census()
        orig = torch.Tensor.tolist

        def tolist(t):
            if mode.count_syncs and not mode.is_host(t):
                mode.syncs["tolist"] += 1
            return orig(t)

        mode._tolist = (orig, tolist)
        return mode


@contextlib.contextmanager
def patched_tolist(mode):
    import torch

    orig, new = mode._tolist
    torch.Tensor.tolist = new
    try:
        yield
    finally:
        torch.Tensor.tolist = orig


class CostMode:
    """TorchDispatchMode for meta runs. Every kernel op on meta tensors is costed: rows (name, category, flops,
    bytes). The batch enters as meta tensors that carry a real CPU "shadow"; an op whose tensor inputs all have
    shadows also runs on them, so data-dependent ops (nonzero, .item(), .tolist()) on the batch, its masks and
    index tensors see real values while every float tensor of the model stays shape-only."""

    def __new__(cls, dims, lens, phase):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves, tree_map
        from torch.utils.flop_counter import flop_registry
        from torch.utils.weak import WeakTensorKeyDictionary

        no_kernel, _ = _aten()
        a = torch.ops.aten
        gemm = {a.mm.default, a.addmm.default, a.addmm_.default, a.bmm.default, a.baddbmm.default}
        # in-place GEMMs (the fused LoRA's backward accumulates dX with addmm_): torch's registry has no entry for
        # them, so they are costed with the out-of-place formula (same FLOPs)
        inplace_flops = {a.addmm_.default: a.addmm, a.baddbmm_.default: a.baddbmm}
        attn = {"_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
                "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward"}
        sq = sum(n * n for n in lens)

        def nbytes(ts):
            return sum(t.numel() * t.element_size() for t in ts)

        class _Cost(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.rows = []
                self.phase = phase
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
                    if func is a._local_scalar_dense.default:
                        return real
                if func is a._local_scalar_dense.default:
                    return 1  # a value computed on the GPU from model data (Adam's step, a finiteness check)
                if func in (a.nonzero.default, a.masked_select.default) and not shadowed:
                    raise RuntimeError(f"{func} on a meta tensor without real values: its size depends on GPU data")
                args, kwargs = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) and not t.is_meta
                                        else t, (args, kwargs))
                if shadowed and func in (a.nonzero.default, a.masked_select.default):
                    out = real.to("meta")
                else:
                    out = func(*args, **kwargs)
                if shadowed:
                    for m, r in zip(tree_leaves(out), tree_leaves(real)):
                        if isinstance(m, torch.Tensor) and isinstance(r, torch.Tensor):
                            self.shadow[m] = r
                if func.is_view or func in no_kernel:
                    return out
                ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
                outs = [t for t in outs if not any(t is i for i in ins)]
                fc = flop_registry.get(inplace_flops.get(func, func.overloadpacket))
                flops = fc(*args, **kwargs, out_val=out) if fc is not None else 0
                name = func.overloadpacket.__name__
                dimset = {d for t in ins for d in t.shape}
                if name in attn:
                    cat = "attention"
                elif dims["V"] in dimset:
                    cat = "loss"
                elif func in gemm:
                    cat = "linear: LoRA" if dims["r"] in dimset else "gemm"
                else:
                    cat = "other"
                self.add(name, cat, flops, nbytes(ins) + nbytes(outs))
                return out

            def triton(self, module, name, args):
                ts = [t for t in args if isinstance(t, torch.Tensor)]
                q = ts[0] if ts else None
                flops = 0
                if "attention" in module and q is not None and q.dim() >= 2:
                    hq_d = q.shape[-2] * q.shape[-1]
                    per = {"_attn_fwd": 2, "_attn_bwd_dkdv": 4, "_attn_bwd_dq": 3}.get(name, 0)
                    flops = per * 2 * sq * hq_d
                cat = "attention" if "attention" in module else "loss" if "masked_ce" in module else "other"
                self.add("triton:" + name, cat, flops, nbytes([t for t in ts if t.is_meta]))

        return _Cost()


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


# ----------------------------------------------------------------------------------------------
# Building each path
# ----------------------------------------------------------------------------------------------

class Batch:
    """Token ids (B, S) with no padding, the engine's MNTP collate (shifted labels), HF labels unshifted."""

    def __init__(self, B, S, vocab, mask_prob, scheme, seed=0):
        import torch

        from benchmarks.bench_train_step import SyntheticTokenizer, make_train_config, unshift_labels
        from engine.stages.mntp import MNTPStage

        cfg = make_train_config(False, LORA)
        cfg.mntp.mask_prob, cfg.mntp.scheme = mask_prob, scheme
        stage = MNTPStage(cfg, SyntheticTokenizer(vocab))
        g = torch.Generator().manual_seed(seed)
        items = [[1] + torch.randint(3, vocab, (S - 1,), generator=g).tolist() for _ in range(B)]
        self.engine = stage.collate(items, torch.Generator().manual_seed(seed + 1))
        self.hf = {"input_ids": self.engine["input_ids"], "hf_labels": unshift_labels(self.engine["labels"])}
        self.masked = int((self.engine["labels"] != -100).sum())
        self.lens = self.engine["attention_mask"].sum(1).tolist()


def engine_config(sets, spec, micro, name="engine"):
    """The engine's TrainConfig: configs/mistral-7b/mntp.yaml, the benchmark's settings, then --set overrides."""
    from engine.config import load_config

    ri = json.dumps({k: v for k, v in spec.items()} | {"seed": 0})
    base = [f"model.random_init={ri}", "model.dtype=bf16", "model.attention=triton", "model.loss=triton",
            "mntp.mask_token=eos", f"batch_size={micro}", f"micro_batch_size={micro}", "lora.r=16", "lora.alpha=32",
            "lora.dropout=0.05", "progress_bar=false",
            # the engine's own choices: fused ops and LoRA as on CUDA; the memory plan sized for one H200 (139 GiB
            # usable), which the trainer would read from the device
            "model.fused_ops=triton", "memory_budget_gb=139"]
    if name != "engine":  # the older paths have no fused decoder ops (the H200 profile ran without them)
        base.append("model.fused_ops=torch")
    return load_config(CONFIG, base + list(sets))


class Path:
    """One path's model and step. device 'cpu' (real, tiny) or 'meta' (full size, costing only)."""

    def __init__(self, name, spec, device, sets, micro):
        import torch

        import kernels
        from benchmarks import bench_train_step as bts

        self.name, self.device, self.engine, self.ds = name, torch.device(device), None, False
        self.cfg = engine_config(sets, spec, micro, name)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "auto": torch.bfloat16}[
            self.cfg.model.dtype]
        self.vocab = spec["vocab_size"]
        self.plan, self.zero_stage, self.recompute = None, 3, "full"
        if name == "reference":
            self.model = bts.build_hf_reference(spec, self.dtype, self.device, LORA)
            self.model.train()
            self.params = [p for p in self.model.parameters() if p.requires_grad]
            self.opt = torch.optim.AdamW(self.params, lr=1e-5, foreach=True)  # CUDA's default; CPU's is per tensor
            return
        from engine.bidirectional import set_deterministic_attention
        from engine.modeling import add_lora, load_model
        from engine.stages.mntp import MNTPStage
        from engine.trainer import EngineModule

        cfg = self.cfg
        kernels.set_default_impl("attention", cfg.model.attention)
        kernels.set_default_impl("masked_ce", cfg.model.loss)
        set_deterministic_attention(cfg.model.deterministic_attention)
        tok = bts.SyntheticTokenizer(self.vocab)
        if name in ("engine", "engine-as-profiled"):
            stage = MNTPStage(cfg, tok)
        else:  # the older reference's loss on the engine's model: SDPA + dense 4-D mask, full logits
            stage = bts.make_stages(cfg, tok)[("mntp", "reference")]
        with torch.device(self.device):  # the same calls as engine.trainer.train
            model, _ = load_model(cfg.model, "cuda", tok)
        if name == "engine":  # the trainer's own setup: fused LoRA, memory plan -> ZeRO stage and recompute policy
            from engine.memory import choose_recompute
            from engine.trainer import setup_model

            notes = []
            model, self.plan, self.zero_stage = setup_model(cfg, stage, model, 1, 1, torch.device("cuda"),
                                                            log=notes.append)
            self.recompute = choose_recompute(cfg, self.plan, self.zero_stage)[0]
        else:  # today's reference, or the engine as the H200 profiled it: the model under ZeRO-3, PEFT's LoRA,
            # full recompute, no fused decoder ops (engine_config sets model.fused_ops=torch for these)
            model = stage.prepare_model(model)
            model.config.use_cache = False
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model = add_lora(model, cfg.lora)
            if name == "reference-zero3":
                bts.set_attention_path(model, "reference")
        self.model = model
        self.module = EngineModule(model, stage)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-5, foreach=True)
        self.module.train()

    def init_deepspeed(self):
        """ZeRO-3 in a world of one (gloo), configured by engine.config.deepspeed_config, as the trainer does."""
        import deepspeed

        from engine.config import deepspeed_config
        from engine.trainer import init_distributed

        init_distributed()
        extra = {} if self.plan is None else {"lora_max_numel": self.plan.lora_max_numel,
                                              "layer_numel": self.plan.layer_numel}
        ds_cfg = deepspeed_config(self.cfg, 1, use_bf16=self.dtype == __import__("torch").bfloat16,
                                  stage=self.zero_stage, **extra)
        self.engine, _, _, _ = deepspeed.initialize(model=self.module, optimizer=self.opt, config=ds_cfg)
        if self.name == "engine":  # the trainer's own adjustments
            from engine.trainer import tune_optimizer_step

            log(tune_optimizer_step(self.engine))
        self.engine.train()
        self.ds = True

    def forward_backward(self, batch):
        from benchmarks import bench_train_step as bts

        if self.name == "reference":
            loss = bts.hf_reference_forward(self.model, batch.hf)
            loss.backward()
            return loss
        if self.engine is not None:
            loss, _ = self.module.stage.train_micro_step(self.engine, batch.engine)
            return loss
        loss, _ = self.module(batch.engine)
        loss.backward()
        return loss

    def skipped_steps(self):
        """Optimizer steps DeepSpeed skipped for non-finite gradients (a skipped step is a smaller op stream)."""
        return 0 if self.engine is None else int(self.engine.skipped_steps)

    def optimizer_step(self):
        import torch

        if self.engine is not None:
            self.engine.step()
            return
        # clip_grad_norm_(max_norm=1.0) as it runs on CUDA (foreach), which it refuses to do on CPU / meta
        grads = [p.grad for p in self.params if p.grad is not None]
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        torch._foreach_mul_(grads, torch.clamp(1.0 / (total + 1e-6), max=1.0))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step(self, batch):
        loss = self.forward_backward(batch)
        self.optimizer_step()
        return loss


# ----------------------------------------------------------------------------------------------
# Worker: one path in its own process
# ----------------------------------------------------------------------------------------------

def _batch_for(shape, vocab, mask):
    B, S = shape
    return Batch(B, S, vocab, *mask)


def count_step(path, batch, launches):
    """Launch census, syncs and ZeRO hooks of one optimizer step."""
    import torch

    mode = OpCensus()
    counts = {"zero_hooks": 0}
    n0, skipped0 = len(launches.calls), path.skipped_steps()
    for state in path.opt.state.values():  # AdamW's step counters live on the host on a GPU too (not capturable)
        if isinstance(state.get("step"), torch.Tensor):
            mode.host[state["step"]] = True
    with zero_hook_counter(counts), patched_tolist(mode), mode:
        mode.count_syncs = True
        path.forward_backward(batch)
        fb_ops, fb_syncs, fb_triton = collections.Counter(mode.ops), collections.Counter(mode.syncs), \
            len(launches.calls)
        path.optimizer_step()
    census = mode.ops + collections.Counter(f"triton:{k}" for k in launches.calls[n0:])
    opt_census = mode.ops - fb_ops  # the optimizer step launches no Triton kernel
    return {"launches": sum(census.values()), "syncs": sum(fb_syncs.values()), "zero_hooks": counts["zero_hooks"],
            "census": dict(census.most_common()), "sync_ops": dict(fb_syncs),
            "optimizer_launches": sum(opt_census.values()) + len(launches.calls) - fb_triton,
            "optimizer_syncs": sum((mode.syncs - fb_syncs).values()),
            "optimizer_census": dict(opt_census.most_common()),
            "skipped_steps": path.skipped_steps() - skipped0}


def predict_path(name, sets, micro, shape, mask, layers, launches):
    """Meta run of the full-size step -> ({category: ms}, {category: op count})."""
    import torch

    spec = dict(FULL, num_hidden_layers=layers)
    path = Path(name, spec, "meta", sets, micro)
    if name != "reference":  # DeepSpeed bf16 keeps every parameter, LoRA included, in bf16 (PEFT made LoRA fp32)
        path.module.to(path.dtype)
    for p in path.params:  # the optimizer's state exists already: cost a steady-state step, not the first
        p.grad = torch.zeros_like(p)
    path.opt.step()
    path.opt.zero_grad(set_to_none=True)
    batch = _batch_for(shape, spec["vocab_size"], mask)
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


def worker(args):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    launches = TritonLaunches()
    sets = args.set or []
    mask = (args.mask_prob, args.scheme)
    layers = args.layers
    tiny = dict(TINY, num_hidden_layers=layers)
    shape = tuple(int(x) for x in args.tokens.split("x"))
    host_shape = tuple(int(x) for x in args.host_batch.split("x"))
    count_shape = tuple(int(x) for x in args.count_batch.split("x"))
    res = {"path": args.worker}
    t0 = time.perf_counter()
    with launches.active(), gpu_like_ops():
        path = Path(args.worker, tiny, "cpu", sets, shape[0])
        if args.worker != "reference":
            try:
                path.init_deepspeed()
            except Exception as exc:  # counted without ZeRO, and the row says so
                log(f"{args.worker}: DeepSpeed unavailable ({type(exc).__name__}: {exc}); no ZeRO-3")
        res["zero"] = str(path.zero_stage) if path.ds else "none"
        res["recompute"] = path.recompute
        res["dtype"] = str(path.dtype).replace("torch.", "")
        host_batch = _batch_for(host_shape, tiny["vocab_size"], mask)
        big = _batch_for(count_shape, tiny["vocab_size"], mask)
        res["build_s"] = round(time.perf_counter() - t0, 1)
        path.step(host_batch)  # warm-up: lazy initialisation and DeepSpeed's first-step tracing stay out
        t1 = time.perf_counter()
        res.update(count_step(path, big, launches))
        res["count_s"] = round(time.perf_counter() - t1, 1)
        small = count_step(path, host_batch, launches)
        res["launches_host_batch"], res["census_host_batch"] = small["launches"], small["census"]
        times, skipped0 = [], path.skipped_steps()
        for _ in range(args.host_steps):
            t = time.perf_counter()
            path.step(host_batch)
            times.append((time.perf_counter() - t) * 1e3)
        res["host_ms"] = {"min": round(min(times), 2), "median": round(statistics.median(times), 2)}
        res["host_steps"] = len(times)
        res["host_skipped_steps"] = path.skipped_steps() - skipped0
        res["host_s"] = round(time.perf_counter() - t1, 1)
        del path
    t2 = time.perf_counter()
    with launches.active(), gpu_like_ops(meta=True):
        pred, n, census, masked = predict_path(args.worker, sets, shape[0], shape, mask, layers, launches)
        res["roofline"] = {k: round(v, 3) for k, v in pred.items() if k != "total"}  # ms, no per-launch floor
        res["roofline_n"] = dict(n)
        res["masked_rows"] = masked
        # the same step at full size, 32 x 512, without DeepSpeed: its launch census (meta run)
        res["launches_full_nozero"] = sum(census.values())
        res["census_full_nozero"] = dict(census.most_common())
        if args.calibrate and args.worker in PROFILE_MS:
            cal_name = "engine-as-profiled" if args.worker == "engine" else args.worker
            cal, cal_n = predict_path(cal_name, sets + ["mntp.mask_prob=0.2", "mntp.scheme=bert"], shape[0],
                                      shape, (0.2, "bert"), layers, launches)[:2]
            res["cal_roofline"] = {k: round(v, 3) for k, v in cal.items() if k != "total"}
            res["cal_n"] = dict(cal_n)
    res["predict_s"] = round(time.perf_counter() - t2, 1)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    with open(args.result, "w") as f:
        json.dump(res, f)


# ----------------------------------------------------------------------------------------------
# Parent: one process per path, then the table and the JSON line
# ----------------------------------------------------------------------------------------------

def _ds_optimizer_ms(r, floor_us):
    """The optimizer launches DeepSpeed adds over the meta run's plain foreach AdamW, at the per-launch floor."""
    return max(0, r.get("optimizer_launches", 0) - r["roofline_n"].get("optimizer", 0)) * floor_us / 1e3


def table(results, args):
    lines = [f"bench_step_ops: MNTP step, one micro-batch, mask {args.mask_prob} ({args.scheme}), Mistral-7B "
             f"structure at {args.layers} layers; counted at tiny width on {args.count_batch} (and {args.host_batch}), "
             f"host time on {args.host_batch}, full size on {args.tokens} (meta, no DeepSpeed); sets: "
             f"{' '.join(args.set or []) or '-'}",
             f"{'path':16s} {'launches':>9s} {'@host':>6s} {'@full':>6s} {'syncs':>6s} {'zero_hooks':>10s} "
             f"{'host_ms min':>11s} {'median':>8s} {'predicted_ms':>12s} {'mm@full':>8s} {'dropout@full':>12s} "
             f"{'triton':>6s} {'zero':>4s} {'opt':>5s} {'opt_syncs':>9s}"]
    for p, r in results.items():
        if "error" in r:
            lines.append(f"{p:16s} ERROR {r['error']}")
            continue
        c, cf = r["census"], r["census_full_nozero"]
        tri = sum(v for k, v in c.items() if k.startswith("triton:"))
        lines.append(f"{p:16s} {r['launches']:9d} {r['launches_host_batch']:6d} {r['launches_full_nozero']:6d} "
                     f"{r['syncs']:6d} {r['zero_hooks']:10d} {r['host_ms']['min']:11.1f} {r['host_ms']['median']:8.1f} "
                     f"{r['predicted_ms']:12.1f} {cf.get('aten.mm', 0):8d} {cf.get('aten.native_dropout', 0):12d} "
                     f"{tri:6d} {r['zero']:>4s} {r.get('optimizer_launches', -1):5d} {r.get('optimizer_syncs', -1):9d}")
    lines.append("opt, opt_syncs: launches and host syncs of the optimizer step alone (counted with DeepSpeed, "
                 "inside 'launches'); predicted_ms costs the meta run's plain foreach AdamW instead, so at the floor "
                 "DeepSpeed's optimizer adds about: " + ", ".join(
                     f"{p} {_ds_optimizer_ms(r, args.floor_us):.0f} ms"
                     for p, r in results.items() if "error" not in r))
    lines.append("H200 profile census (2026-11-26, engine ZeRO-3 step): native_dropout 448, mm 2464 (288 MLP + 384 "
                 "projections + 1792 LoRA)")
    lines.append("predicted_ms by category (ms): " + "; ".join(
        f"{p}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["predicted"].items() if k != "total")
        for p, r in results.items() if "predicted" in r))
    for p, r in results.items():
        if "census" in r:
            top = ", ".join(f"{k} {v}" for k, v in list(r["census"].items())[:12])
            lines.append(f"census {p}: {top}; syncs {r['sync_ops'] or '-'}")
            top = ", ".join(f"{k} {v}" for k, v in list(r["census_full_nozero"].items())[:8])
            lines.append(f"census {p} at full size, no DeepSpeed: {top}")
    fit = fit_floor(results)
    if fit is not None:
        lines.append(f"per-launch floor: {args.floor_us:g} us in use; {fit:.2f} us makes the engine's 'other' match "
                     "the profile exactly")
    for p, r in results.items():
        cal = r.get("calibration")
        if not cal:
            continue
        prof = PROFILE_MS[p]
        eg, eo = cal.get("gemm", 0) / prof["gemm"] - 1, cal.get("other", 0) / prof["other"] - 1
        lines.append(f"calibration {p} (mask 0.2 BERT, as profiled): frozen GEMMs predicted {cal.get('gemm', 0):.0f} "
                     f"ms vs {prof['gemm']:.0f} measured ({100 * eg:+.1f}%), other {cal.get('other', 0):.0f} ms vs "
                     f"{prof['other']:.0f} ({100 * eo:+.1f}%)" + (" [floor fitted here]" if p == "engine" else ""))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="engine config override (engine and reference-zero3 paths), e.g. model.fused_ops=triton")
    ap.add_argument("--tokens", default="32x512", help="batch x sequence of the counted step")
    ap.add_argument("--host-batch", default="2x64", help="batch x sequence of the host-time steps")
    ap.add_argument("--count-batch", default="4x64", help="batch x sequence of the counted real step")
    ap.add_argument("--host-steps", type=int, default=10)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--mask-prob", type=float, default=None, help="default: llm2vec's Mistral setting (0.8)")
    ap.add_argument("--scheme", default=None, choices=("bert", "all"))
    ap.add_argument("--reduced", action="store_true", help="CI: 2 layers, 4x64 tokens, 3 host steps, no calibration")
    ap.add_argument("--no-calibrate", dest="calibrate", action="store_false")
    ap.add_argument("--floor-us", type=float, default=HOST_FLOOR_US, help="per-launch floor of the prediction")
    ap.add_argument("--from-json", default=None, help="print the table of a run saved with --json (no measuring)")
    ap.add_argument("--json", default=None, help="also write the results (with census) to this file")
    ap.add_argument("--timeout-s", type=int, default=280, help="per path")
    ap.add_argument("--jobs", type=int, default=1, help="paths run at once (1 for host_ms figures: they share cores)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mask_prob is None or args.scheme is None:
        from benchmarks.bench_train_step import llm2vec_masking

        p, s = llm2vec_masking("mistral")
        args.mask_prob = p if args.mask_prob is None else args.mask_prob
        args.scheme = s if args.scheme is None else args.scheme
    if args.reduced:
        args.layers, args.tokens, args.host_steps, args.calibrate = 2, "4x64", 3, False
        args.count_batch = "4x32"
    if args.worker:
        worker(args)
        return None
    paths = [p for p in args.paths.split(",") if p]
    bad = [p for p in paths if p not in PATHS]
    if bad:
        print(f"unknown path(s) {bad}; choose from {PATHS}", file=sys.stderr)
        sys.exit(2)
    if args.set:
        from engine.config import ConfigError

        try:
            engine_config(args.set, TINY, 32)
        except ConfigError as exc:
            print(f"bad --set: {exc}", file=sys.stderr)
            sys.exit(2)
    import tempfile

    if args.from_json:  # re-render a saved run (e.g. with another --floor-us); nothing is measured
        with open(args.from_json) as f:
            results = json.load(f)
        return _report(results, args)
    results = {}
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE"):
        env.pop(k, None)
    with tempfile.TemporaryDirectory() as tmp:
        pending, running = list(paths), {}
        while pending or running:
            while pending and len(running) < max(1, args.jobs):
                p = pending.pop(0)
                out = os.path.join(tmp, f"{p}.json")
                cmd = [sys.executable, "-m", "benchmarks.bench_step_ops", "--worker", p, "--result", out,
                       "--tokens", args.tokens, "--host-batch", args.host_batch, "--host-steps", str(args.host_steps),
                       "--count-batch", args.count_batch,
                       "--layers", str(args.layers), "--mask-prob", str(args.mask_prob), "--scheme", args.scheme]
                cmd += [f"--set={s}" for s in args.set] + ([] if args.calibrate else ["--no-calibrate"])
                errf = open(os.path.join(tmp, f"{p}.err"), "w+")
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=errf, stderr=subprocess.STDOUT, text=True)
                running[p] = (proc, out, errf, time.perf_counter())
            time.sleep(0.2)
            for p, (proc, out, errf, t0) in list(running.items()):
                if proc.poll() is None and time.perf_counter() - t0 < args.timeout_s:
                    continue
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                    results[p] = {"error": f"timeout after {args.timeout_s}s"}
                elif proc.returncode != 0 or not os.path.isfile(out):
                    errf.seek(0)
                    text = errf.read()
                    tail = text.strip().splitlines()[-1:] or ["no output"]
                    results[p] = {"error": f"rc {proc.returncode}: {tail[0][:200]}"}
                    log(f"{p} failed:\n{text[-3000:]}")
                else:
                    with open(out) as f:
                        results[p] = json.load(f)
                errf.close()
                del running[p]
                log(f"{p}: {time.perf_counter() - t0:.1f}s")
    results = {p: results[p] for p in paths}
    return _report(results, args)


def _report(results, args):
    finish(results, args.floor_us)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results, args))
    keys = ("launches", "syncs", "zero_hooks", "host_ms", "predicted_ms")
    print(json.dumps({p: ({k: r[k] for k in keys} if "error" not in r else {"error": r["error"]})
                      for p, r in results.items()}))
    if any("error" in r for r in results.values()):
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
