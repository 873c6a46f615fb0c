"""bf16 / fp16 check of :func:`llm2vec_kernels.contrastive_loss` (the Triton path) on CUDA against the fp64 reference,
loss and both gradients, with a tolerance derived from the dtype (:func:`contrastive_tolerance`)."""
import math

import torch

from ..contrastive import _contrastive_loss_triton, _torch_same_dtype_loss, contrastive_loss_reference
from . import require_cuda


def _loss_and_grads(fn, q, d):
    q = q.detach().clone().requires_grad_(True)
    d = d.detach().clone().requires_grad_(True)
    loss = fn(q, d)
    loss.backward()
    return loss.detach().double(), q.grad.double(), d.grad.double()


def _max_err(x, ref):
    return float((x.double() - ref).abs().max())


def contrastive_tolerance(what, ref, torch_fp32_err, dtype, temperature, n_candidates, factor=4.0):
    """The error Triton may have on `what` ("loss", "dq" or "dd") against the fp64 reference on the same inputs.

    Both see the same dtype-rounded inputs, so the error is the kernel's own arithmetic plus the rounding of its
    outputs. The loss is computed and returned in fp32: a few fp32 ulps of the log-sum-exp it is a difference of
    (at most 1/T + log N), plus what the same maths costs torch in fp32. The gradients are returned in the input
    dtype: a few of its ulps at the largest entry, plus torch's fp32 error on the same maths. For bf16 inputs at
    T = 0.05 that is ~1e-5 on a loss of ~1 and 3% of the largest gradient entry (bf16 has 8 bits).
    """
    fp32 = torch.finfo(torch.float32).eps
    if what == "loss":
        return factor * (torch_fp32_err + fp32 * (1.0 / temperature + math.log(n_candidates)))
    return factor * (torch_fp32_err + torch.finfo(dtype).eps * float(ref.abs().max()))


def _accuracy_rows(cases, device, factor=4.0):
    """One row per (case, loss/dq/dd): Triton vs the fp64 reference, with torch's own errors on the same inputs
    (``torch_bf16_err``: everything in the input dtype; ``torch_fp32_err``: the same maths upcast to fp32).

    ok = finite and max_err <= :func:`contrastive_tolerance` (derived from the dtype, not from torch's
    low-precision error, which at bf16 is larger than the values it would excuse).
    cases: (name, B, n_neg, E, dtype, temperature, kwargs for the Triton path).
    """
    rows = []
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    for name, B, n, E, dt, T, kw in cases:
        M = B * (1 + n)
        q = torch.randn(B, E, device=device, generator=gen)
        d = q[torch.arange(M, device=device) % B] + 0.6 * torch.randn(M, E, device=device, generator=gen)
        if "dupes" in name:  # identical texts -> identical embeddings
            q[1::2] = q[0::2]
            d[1::2] = d[0::2]
        q, d = (q * 3.0).to(dt), (d * 0.5).to(dt)
        ref = _loss_and_grads(lambda a, b: contrastive_loss_reference(a.double(), b.double(), temperature=T), q, d)
        tor = _loss_and_grads(lambda a, b: _torch_same_dtype_loss(a, b, T), q, d)
        t32 = _loss_and_grads(lambda a, b: _torch_same_dtype_loss(a.float(), b.float(), T), q, d)
        ker = _loss_and_grads(lambda a, b: _contrastive_loss_triton(a, b, temperature=T, **kw), q, d)
        for what, k, t, u, r in zip(("loss", "dq", "dd"), ker, tor, t32, ref):
            err, terr, terr32 = _max_err(k, r), _max_err(t, r), _max_err(u, r)
            tol = contrastive_tolerance(what, r, terr32, dt, T, M, factor)
            ok = bool(math.isfinite(err) and err <= tol)
            rows.append({"op": "contrastive", "case": f"{name}:{what}", "dtype": str(dt).replace("torch.", ""),
                         "max_err": err, "torch_bf16_err": terr, "torch_fp32_err": terr32, "tol": tol,
                         "ref_max": float(r.abs().max()), "ok": ok})
        if "determinism" in name:  # no atomics anywhere: a second run is bit-identical
            again = _loss_and_grads(lambda a, b: _contrastive_loss_triton(a, b, temperature=T, **kw), q, d)
            same = all(torch.equal(x, y) for x, y in zip(ker, again))
            rows.append({"op": "contrastive", "case": f"{name}:bitwise_rerun", "dtype": str(dt).replace("torch.", ""),
                         "max_err": max(_max_err(x, y) for x, y in zip(again, ker)), "torch_bf16_err": float("nan"),
                         "tol": 0.0, "ok": same})
    return rows


def gpu_check(factor=4.0):
    """Triton vs fp64 reference on CUDA, forward and backward, bf16 and fp16, on a few real shapes.

    Covers E = 4096 / 1024 / 768 / 512 / 3, odd B and M, multi-split forwards, the single-buffer and the
    chunked backward, duplicate rows, and a bitwise rerun. Returns the rows of :func:`_accuracy_rows`.
    """
    dev = require_cuda("contrastive")
    cases = [
        ("B256_n1_E4096_determinism", 256, 1, 4096, torch.bfloat16, 0.05, {}),
        ("B1000_n3_E768", 1000, 3, 768, torch.bfloat16, 0.05, {}),
        ("B37_n2_E3", 37, 2, 3, torch.bfloat16, 0.05, {}),
        ("B300_n1_E4096_fp16", 300, 1, 4096, torch.float16, 0.05, {}),
        ("B640_n1_E1024_chunked", 640, 1, 1024, torch.bfloat16, 0.02, dict(buffer_bytes=1 << 20)),
        ("B2048_n1_E512_dupes_T1", 2048, 1, 512, torch.float16, 1.0, {}),
    ]
    return _accuracy_rows(cases, dev, factor)
