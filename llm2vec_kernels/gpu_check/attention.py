"""Accuracy checks of the attention kernels against the fp64 reference, shared by tests/test_attention.py
and the GPU run (``python -m llm2vec_kernels.gpu_check attention``)."""
import math
import time

import torch

from ..attention.dispatch import sdpa_attention
from ..attention.flash import flash_attention, flash_attention_dropout_mask, flash_attention_reference
from . import require_cuda


def _eager_attention(q, k, v, *, cu_seqlens=None, scale=None, dropout_p=0.0, dropout_mask=None, causal=False,
                     seqlens=None, softcap=None):
    """Attention as eager torch code runs it in the input dtype (HF "eager"): matmuls in the dtype, softmax in
    fp32 and cast back. The yardstick for "torch's own error in this dtype"."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale

    def one(q, k, v, keep):  # (S, Hq, D), (S, Hkv, D) -> (S, Hq, D)
        g = q.shape[1] // k.shape[1]
        qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(g, 0), v.transpose(0, 1).repeat_interleave(g, 0)
        s = torch.matmul(qh, kh.transpose(-1, -2)) * scale
        if softcap is not None:  # Gemma2 eager: in the dtype
            s = softcap * torch.tanh(s / softcap)
        if causal:
            S = q.shape[0]
            s = s.masked_fill(torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        if keep is not None:
            p = p * keep.to(p.dtype) / (1.0 - dropout_p)
        return torch.matmul(p, vh).transpose(0, 1)

    if cu_seqlens is None and seqlens is not None:
        out = q.new_zeros(q.shape)
        for b, L in enumerate(seqlens.tolist()):
            if L:
                keep = None if dropout_mask is None else dropout_mask[b][:, :L, :L]
                out[b, :L] = one(q[b, :L], k[b, :L], v[b, :L], keep)
        return out
    if cu_seqlens is None:
        return torch.stack([one(q[b], k[b], v[b], None if dropout_mask is None else dropout_mask[b])
                            for b in range(q.shape[0])])
    b = cu_seqlens.tolist()
    outs = [one(q[b[i]:b[i + 1]], k[b[i]:b[i + 1]], v[b[i]:b[i + 1]], None if dropout_mask is None else dropout_mask[i])
            for i in range(len(b) - 1)]
    return torch.cat(outs, 0) if outs else q.new_zeros(q.shape)


def accuracy_case(q, k, v, *, cu_seqlens=None, scale=None, dropout_p=0.0, seed=0, causal=False, impl="triton",
                  deterministic=True, seqlens=None, fn=None, softcap=None, return_outputs=False):
    """Forward and all three gradients of :func:`flash_attention` (or ``fn``, same signature) against the fp64
    reference.

    Returns {tensor name: (kernel error, eager-torch error)}, each the max abs difference from the fp64 result
    divided by max(1, max abs of that result). Dropout uses the kernel's own mask for all three computations.
    ``return_outputs``: (that dict, [out, dq, dk, dv] of the kernel, the output gradient ``do`` it was given), for
    checks of the same kernel run beyond its accuracy.
    """
    g = torch.Generator(device="cpu").manual_seed(1234)
    do = torch.randn(q.shape, generator=g).to(q.device, q.dtype)
    mask = None
    if dropout_p > 0:
        mask = flash_attention_dropout_mask(q, cu_seqlens=cu_seqlens, dropout_p=dropout_p, seed=seed)

    def run(fn, tensors, **kw):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*leaves, cu_seqlens=cu_seqlens, scale=scale, causal=causal, seqlens=seqlens, softcap=softcap, **kw)
        return [out.detach()] + list(torch.autograd.grad(out, leaves, do.to(out.dtype)))

    got = run(fn or flash_attention, (q, k, v), dropout_p=dropout_p, seed=seed, impl=impl, deterministic=deterministic)
    want = run(flash_attention_reference, [t.double() for t in (q, k, v)], dropout_p=dropout_p, dropout_mask=mask)
    eager = run(_eager_attention, (q, k, v), dropout_p=dropout_p, dropout_mask=mask)
    res = {}
    for name, a, ref, e in zip(("out", "dq", "dk", "dv"), got, want, eager):
        if a.shape != ref.shape or a.dtype != q.dtype:
            raise AssertionError(f"{name}: got {a.dtype} {tuple(a.shape)}, want {q.dtype} {tuple(ref.shape)}")
        denom = ref.abs().max().clamp_min(1.0)  # absolute error where the exact result is ~0 (e.g. L=1 grads)
        err = ((a.double() - ref).abs().max() / denom).item() if torch.isfinite(a).all() else float("inf")
        res[name] = (err, ((e.double() - ref).abs().max() / denom).item())
    return (res, got, do) if return_outputs else res


# Error allowed: ERR_FACTOR x eager torch's error in the same dtype, plus this floor (relative to max |ref|).
ERR_FACTOR = 2.0
ERR_FLOOR = {torch.float32: 2e-6, torch.float16: 5e-4, torch.bfloat16: 5e-3}


def _sdpa_case(q, k, v, *, cu_seqlens=None, scale=None, causal=False, seqlens=None, dropout_p=0.0, softcap=None,
               **_):
    """The dispatch's SDPA path (llm2vec_kernels/attention/dispatch.py) behind accuracy_case's call signature."""
    if cu_seqlens is not None or seqlens is not None or causal or dropout_p or softcap is not None:
        raise ValueError("the SDPA path takes dense, unpadded, non-causal, dropout-free, uncapped batches")
    return sdpa_attention(q, k, v, scale)


def _lens(n, lo, hi, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(lo, hi + 1, (n,), generator=g).tolist()


_MIX = _lens(12, 32, 512) + [1, 129]  # a ragged length mix with a single token and one past a block boundary
BF16, FP16 = torch.bfloat16, torch.float16
# (name, dtype, prefix shape, Hq, Hkv, D, kwargs). Most important first (gpu_check stops at its budget): the
# engine's packed path, the folded softmax scale at a non-default scale, the in-place padded mode, D=256 (Gemma),
# the atomic-dQ backward on both layouts, the dispatch's SDPA path; then the rest. A new (dtype, D, layout,
# dropout, atomic) combination compiles four kernels (a few seconds); the others reuse them.
GPU_CHECK_CASES = [
    ("mistral-varlen-mix", BF16, (sum(_MIX),), 32, 8, 128, {"cu_seqlens": _MIX}),
    ("mistral-varlen-mix-scale0.3", BF16, (sum(_MIX),), 32, 8, 128, {"cu_seqlens": _MIX, "scale": 0.3}),
    ("mistral-padded-mix", BF16, (len(_MIX), max(_MIX)), 32, 8, 128, {"seqlens": _MIX}),
    ("gemma-2b-d256-varlen", BF16, (sum(_MIX[:4]),), 8, 1, 256, {"cu_seqlens": _MIX[:4]}),
    ("mistral-padded-mix-atomicdq", BF16, (len(_MIX), max(_MIX)), 32, 8, 128, {"seqlens": _MIX,
                                                                             "deterministic": False}),
    ("mistral-varlen-mix-atomicdq", BF16, (sum(_MIX),), 32, 8, 128, {"cu_seqlens": _MIX, "deterministic": False}),
    ("mistral-dense-512-sdpa", BF16, (2, 512), 32, 8, 128, {"backend": "sdpa"}),
    ("mistral-dense-512", BF16, (2, 512), 32, 8, 128, {}),
    ("mistral-dense-2048-atomicdq", BF16, (1, 2048), 32, 8, 128, {"deterministic": False}),
    ("mistral-varlen-dropout0.1", BF16, (sum(_MIX),), 32, 8, 128, {"cu_seqlens": _MIX, "dropout_p": 0.1, "seed": 7}),
    ("gemma2-d256-padded-scale", BF16, (4, max(_MIX[:4])), 16, 8, 256, {"seqlens": _MIX[:4], "scale": 256 ** -0.5}),
    ("gemma2-d256-varlen-softcap50", BF16, (sum(_MIX[:4]),), 16, 8, 256, {"cu_seqlens": _MIX[:4], "softcap": 50.0,
                                                                           "scale": 256 ** -0.5}),
    ("smollm2-dense-257", BF16, (2, 257), 9, 3, 64, {}),
    ("mistral-dense-2048", BF16, (1, 2048), 32, 8, 128, {}),
    ("mistral-dense-512", FP16, (2, 512), 32, 8, 128, {}),
    ("d96-dense-200", BF16, (2, 200), 8, 2, 96, {}),
]


def gpu_check(budget_s=30.0, cases=None, device="cuda"):
    """bf16/fp16 forward+backward vs the fp64 reference on model-sized shapes (CUDA). One row per case and
    tensor: {"op", "case", "tensor", "max_err", "torch_bf16_err" (eager torch in the same dtype), "ok"}.

    ``ok``: max_err <= ERR_FACTOR x torch_bf16_err + ERR_FLOOR[dtype], errors relative to max |fp64 result|.
    Cases (GPU_CHECK_CASES by default) run in order; once ``budget_s`` has elapsed each remaining one is a row
    {"op", "case", "skipped": why, "ok": None}: not checked, never counted as passed (the CLI and the GPU run's
    summary name them). ``budget_s=None`` runs them all. ``cases`` / ``device`` let the CPU tests
    run this harness at tiny shapes (the Triton kernels then run in the interpreter).
    """
    dev = require_cuda("attention", device)
    t0 = time.time()
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for name, dtype, prefix, hq, hkv, d, kw in (GPU_CHECK_CASES if cases is None else cases):
        label = f"{name}-{str(dtype)[6:]}"
        if budget_s is not None and time.time() - t0 > budget_s:
            print(f"gpu_check attention: skipped {label} (budget {budget_s:.0f}s spent)", flush=True)
            rows.append({"op": "attention", "case": label, "skipped": f"budget {budget_s:g}s spent", "ok": None})
            continue
        kw = dict(kw)
        if "cu_seqlens" in kw:
            kw["cu_seqlens"] = torch.tensor([0] + torch.tensor(kw["cu_seqlens"]).cumsum(0).tolist(),
                                            dtype=torch.int32, device=dev)
        if "seqlens" in kw:
            kw["seqlens"] = torch.tensor(kw["seqlens"], dtype=torch.int32, device=dev)
        if kw.pop("backend", "triton") == "sdpa":
            kw["fn"] = _sdpa_case
        q, k, v = (torch.randn(*prefix, h, d, generator=g).to(dev, dtype) for h in (hq, hkv, hkv))
        for tensor, (err, torch_err) in accuracy_case(q, k, v, **kw).items():
            rows.append({"op": "attention", "case": label, "tensor": tensor, "max_err": err,
                         "torch_bf16_err": torch_err, "ok": err <= ERR_FACTOR * torch_err + ERR_FLOOR[dtype]})
        del q, k, v
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows
