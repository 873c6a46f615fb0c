"""bf16 check of :func:`llm2vec_kernels.lora_group` (the Triton path) on CUDA at 7B-model projection shapes, forward and
backward, against the fp32 per-projection reference on the same keep mask; plain torch in bf16 is the yardstick.
``device="cpu"`` rehearses it under the interpreter (tests)."""
import torch

from ..lora import draw_seed, lora_dropout_mask, lora_group, lora_group_reference
from . import require_cuda

# (case, M tokens, K in, outputs, rank, dropout, with biases)
GPU_CHECK_CASES = [
    ("mistral-7b q/k/v", 4096, 4096, (4096, 1024, 1024), 16, 0.05, False),
    ("mistral-7b gate/up", 4096, 4096, (14336, 14336), 16, 0.05, False),
    ("mistral-7b down", 4096, 14336, (4096,), 16, 0.05, False),
    ("qwen2 q/k/v bias, odd M", 1000, 3584, (3584, 512, 512), 16, 0.1, True),
    ("no dropout, r=32 (summed 96: the wide rank tile)", 2048, 4096, (4096, 1024, 1024), 32, 0.0, False),
]


def gpu_check(factor=2.0, device="cuda", cases=None, dtype=torch.bfloat16):
    """bf16 fused (Triton) vs the fp32 reference on the same keep mask, next to plain torch in bf16.

    A row is ok when every output / gradient error is within ``factor`` x the error of the per-projection torch
    computation in bf16 (plus a floor of 2**-10 of the largest value), forward and backward. ``device``, ``cases``
    and ``dtype`` let the tests rehearse it on CPU under the interpreter (fp16 there)."""
    dev = require_cuda("lora", device)
    rows = []
    for case, M, K, outs, r, p, bias in cases or GPU_CHECK_CASES:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(M, K, device=dev, generator=g)
        ws = [torch.randn(n, K, device=dev, generator=g) / K ** 0.5 for n in outs]
        bs = [torch.randn(n, device=dev, generator=g) for n in outs] if bias else None
        As = [torch.randn(r, K, device=dev, generator=g) / K ** 0.5 for _ in outs]
        Bs = [torch.randn(n, r, device=dev, generator=g) / r ** 0.5 for n in outs]
        gys = [torch.randn(M, n, device=dev, generator=g) for n in outs]
        # every input rounded to the checked dtype first: the fp32 reference then computes on exactly the values
        # the kernel and the torch yardstick get (unrounded, the inputs' own rounding inflated torch's error)
        x = x.to(dtype).float()
        ws, As, Bs, gys = ([t.to(dtype).float() for t in ts] for ts in (ws, As, Bs, gys))
        bs = None if bs is None else [t.to(dtype).float() for t in bs]
        torch.manual_seed(1)
        keep = lora_dropout_mask(draw_seed(dev), (M, K), p) if p > 0 else None

        def run(fn, dt):
            xx = x.to(dt, copy=True).requires_grad_(True)
            aa = [a.to(dt, copy=True).requires_grad_(True) for a in As]
            bb = [b.to(dt, copy=True).requires_grad_(True) for b in Bs]
            ys = fn(xx, [w.to(dt) for w in ws], aa, bb, None if bs is None else [b.to(dt) for b in bs])
            torch.autograd.backward(ys, [gy.to(dt) for gy in gys])
            return [y.detach().float() for y in ys] + [xx.grad.float()] + [t.grad.float() for t in aa + bb]

        def fused(xx, ww, aa, bb, bias_):
            torch.manual_seed(1)
            return lora_group(xx, ww, aa, bb, 2.0, p, biases=bias_, impl="triton")

        def plain(xx, ww, aa, bb, bias_):
            return lora_group_reference(xx, ww, aa, bb, 2.0, p, keep, biases=bias_)

        ref = run(plain, torch.float32)
        got = run(fused, dtype)
        base = run(plain, dtype)
        errs = [(a - r_).abs().max().item() for a, r_ in zip(got, ref)]
        terrs = [(b - r_).abs().max().item() for b, r_ in zip(base, ref)]
        floors = [2.0 ** -10 * r_.abs().max().item() for r_ in ref]
        ok = all(e <= factor * t + f for e, t, f in zip(errs, terrs, floors))
        worst = max(range(len(errs)), key=lambda i: errs[i] / (factor * terrs[i] + floors[i]))
        rows.append({"op": "lora", "case": case, "max_err": errs[worst], "torch_bf16_err": terrs[worst], "ok": ok})
    return rows
