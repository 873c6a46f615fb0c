"""bf16 / fp16 check of :func:`llm2vec_kernels.masked_cross_entropy` (the Triton path) on CUDA at LLM vocab sizes, forward
and backward, against the fp32 reference; the HF-style torch loss in the same dtype is the yardstick."""
import time

import torch

from ..masked_ce import _masked_ce_triton, launch_config, masked_cross_entropy_reference
from . import require_cuda


def _hf_style_loss(hidden, weight, labels, ignore_index, reduction, softcap, z_loss):
    # What an HF model does in the input dtype: logits in that dtype, fp32 upcast, then the loss.
    keep = labels != ignore_index
    logits = torch.nn.functional.linear(hidden[keep], weight).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    lse = torch.logsumexp(logits, dim=-1)
    rows = lse - logits.gather(1, labels[keep][:, None]).squeeze(1) + z_loss * lse.square()
    return rows.sum() / (max(int(keep.sum()), 1) if reduction == "mean" else 1)


# (case, dtype, tokens N, H, V, labelled fraction, softcap, z_loss, reduction, weight requires grad
#  [, strategy [, config overrides]]). Frozen W with "mean" / "sum" runs the eager strategy under "auto"
#  (the LoRA default): at 128256 x bf16 the 128 MiB scratch holds 512 rows, so ~3277 labelled rows take 7 chunks.
GPU_CHECK_CASES = [
    ("llama3-8b frozen W", torch.bfloat16, 4096, 4096, 128256, 0.8, None, 0.0, "mean", False),
    ("llama3-8b frozen W eager ragged chunks", torch.bfloat16, 2500, 4096, 128256, 0.8, None, 0.0, "mean", False,
     "eager", {"row_chunk": 333}),
    ("mistral-7b fp16 frozen W eager", torch.float16, 2048, 4096, 32000, 0.8, None, 0.0, "mean", False),
    ("gemma2 softcap30 sum frozen W eager, 30% labelled", torch.bfloat16, 700, 2304, 256000, 0.3, 30.0, 0.0, "sum",
     False, "eager"),
    ("llama3-8b frozen W recompute", torch.bfloat16, 4096, 4096, 128256, 0.8, None, 0.0, "mean", False,
     "recompute"),
    ("gemma2 softcap30 z1e-4 sum frozen W", torch.bfloat16, 1024, 2304, 256000, 0.5, 30.0, 1e-4, "sum", False),
    ("mistral-7b fp16 train W", torch.float16, 2048, 4096, 32000, 0.8, None, 0.0, "mean", True),
    ("gemma2 softcap30 z1e-4 sum train W", torch.bfloat16, 1024, 2304, 256000, 0.5, 30.0, 1e-4, "sum", True),
    ("V=262144 H=8192 int64 offsets", torch.bfloat16, 48, 8192, 262144, 1.0, None, 0.0, "mean", False),
    ("N=1 train W", torch.bfloat16, 1, 4096, 128256, 1.0, None, 0.0, "mean", True),
    ("all ignored", torch.bfloat16, 64, 4096, 32000, 0.0, None, 0.0, "mean", True),
]


def gpu_check(cases=None, device="cuda"):
    """Run the Triton path in bf16 / fp16 on real shapes, forward and backward -> list[dict].

    Ground truth: the reference in fp32 on the same (rounded) inputs. One row per case and
    quantity (loss / dhidden / dweight): {"op", "case", "dtype", "quantity", "max_err",
    "torch_bf16_err", "ok", "s"}; torch_bf16_err is the error of the HF-style torch path in the same
    dtype (logits in that dtype, fp32 upcast). ok: finite and max_err <= tol = 2 x torch_bf16_err + a
    floor of 2^-12 x max |reference|, with tol itself at most 5% of max |reference| (ref_max), so the check
    cannot pass vacuously; for "all ignored" ok means exactly zero loss and gradients.
    ``cases`` / ``device`` exist so the CPU tests can exercise this harness at tiny shapes.
    """
    dev = require_cuda("masked_ce", device)
    rows = []
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be true fp32
    try:
        for case in cases or GPU_CHECK_CASES:
            rows += _gpu_check_case(case, dev)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return rows


def _gpu_check_case(case, dev):
    rows = []
    name, dtype, n, hdim, vocab, frac, softcap, z_loss, reduction, train_w = case[:10]
    strategy = case[10] if len(case) > 10 else "auto"
    overrides = case[11] if len(case) > 11 else {}
    t0 = time.perf_counter()
    gen = torch.Generator(device=dev).manual_seed(1234 + n + vocab)
    hidden = torch.randn(n, hdim, device=dev, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hdim, device=dev, generator=gen) * hdim ** -0.5 * 2.0).to(dtype)
    weight.requires_grad_(train_w)
    labels = torch.randint(0, vocab, (n,), device=dev, generator=gen)
    labels[torch.rand(n, device=dev, generator=gen) >= frac] = -100
    kw = dict(softcap=softcap, z_loss=z_loss, reduction=reduction)

    def loss_and_grads(fn, h, w):
        leaves = [h] + ([w] if w.requires_grad else [])
        loss = fn(h, w)
        return [loss.detach().float()] + [g.float() for g in torch.autograd.grad(loss, leaves)]

    cfg = dict(launch_config(dtype, dev), strategy=strategy, **overrides)
    out = loss_and_grads(lambda h, w: _masked_ce_triton(h, w, labels, cfg=cfg, **kw), hidden, weight)
    ref = loss_and_grads(lambda h, w: masked_cross_entropy_reference(h, w, labels, **kw),
                         hidden.detach().float().requires_grad_(),
                         weight.detach().float().requires_grad_(train_w))
    if frac > 0:
        hf = loss_and_grads(lambda h, w: _hf_style_loss(h, w, labels, -100, reduction, softcap, z_loss),
                            hidden, weight)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    for q, a, r, i in zip(("loss", "dhidden", "dweight"), out, ref, range(3)):
        finite = bool(torch.isfinite(a).all())
        err = (a - r).abs().max().item() if a.numel() else 0.0
        ref_max = r.abs().max().item() if r.numel() else 0.0
        if frac > 0:
            terr = (hf[i] - r).abs().max().item()
            tol = 2.0 * terr + 2.0 ** -12 * max(ref_max, 1e-30)
            # the yardstick (torch's own low-precision error) must itself be small next to the values
            ok = finite and err <= tol and tol <= 0.05 * ref_max
        else:
            terr, tol, ok = float("nan"), 0.0, finite and not bool(a.any())
        rows.append({"op": "masked_ce", "case": name, "dtype": str(dtype).replace("torch.", ""), "quantity": q,
                     "strategy": strategy, "max_err": err, "torch_bf16_err": terr, "tol": tol, "ref_max": ref_max,
                     "ok": ok, "s": round(time.perf_counter() - t0, 2)})
    del hidden, weight, out, ref
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows
