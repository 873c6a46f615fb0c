"""GPU accuracy checks, one module per op, and their registry.

Each ``llm2vec_kernels/gpu_check/<op>.py`` has ``gpu_check(...) -> list[dict]``: the op's Triton path in bf16 / fp16 on
CUDA at model-sized shapes, forward and backward, against its ``*_reference`` (fp32 or fp64 on the same rounded
inputs). One row per (case, tensor) with at least {"op", "case", "max_err", "torch_bf16_err", "ok"}:
``torch_bf16_err`` is what plain torch loses in the same low precision, the yardstick of ``ok``. Without CUDA a
check raises :class:`NeedsCuda` before doing any work (``device="cpu"`` where a check offers it rehearses the
harness under the Triton interpreter, for the CPU tests).

:data:`CHECKS` lists the op names; :func:`registry` maps each to its check function (imported on demand);
``python -m llm2vec_kernels.gpu_check [--list | NAME ...]`` runs them (benchmarks/gpu_run.sh does, on the GPU machine).
"""
import importlib

import torch

CHECKS = ("attention", "masked_ce", "contrastive", "lora", "rms_norm", "rope", "glu")


class NeedsCuda(RuntimeError):
    """A GPU check was asked to run where there is no CUDA device."""


def require_cuda(op, device="cuda"):
    """``torch.device(device)``, after making sure a CUDA device is there when it is a CUDA one."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NeedsCuda(f"gpu_check {op} needs CUDA (no CUDA device here)")
    return dev


def check_function(name):
    """The ``gpu_check`` function of op ``name`` (one of :data:`CHECKS`)."""
    if name not in CHECKS:
        raise KeyError(f"unknown gpu check {name!r}; expected one of {', '.join(CHECKS)}")
    return importlib.import_module(f"{__name__}.{name}").gpu_check


def registry():
    """{op name: its gpu_check function}, in :data:`CHECKS` order."""
    return {name: check_function(name) for name in CHECKS}


def _fwd_bwd(fn, inputs, needs_grad, seed, dy_dtype):
    """Outputs and input gradients (fp64) of ``fn(*inputs)`` under random output gradients drawn from ``seed``
    and rounded to ``dy_dtype`` (so every precision sees the same ones)."""
    leaves = [t.detach().clone().requires_grad_(g) for t, g in zip(inputs, needs_grad)]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator(device=outs[0].device).manual_seed(seed)
    dys = [torch.randn(o.shape, device=o.device, generator=gen).to(dy_dtype).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, dys)
    return [o.detach().double() for o in outs] + [t.grad.double() for t in leaves if t.requires_grad]


def _rms(t):
    return t.double().square().mean().sqrt().item()


def accuracy_rows(op, case, names, triton_fn, torch_fn, inputs, needs_grad, factor=2.0):
    """Rows for one case of an op with a pure-torch reference: ``triton_fn`` and ``torch_fn`` on the same
    low-precision ``inputs``, and ``torch_fn`` on their fp64 copies (the truth), forward and backward.

    One row per output / gradient in ``names`` order; ok: finite and max_err <= factor x torch_bf16_err + one
    ulp of the dtype at max |truth| (an op that rounds once may match torch's error, never exceed it much), and the
    same of the root-mean-square errors with the ulp at the truth's RMS: the max rule alone is scaled by the largest
    value, which on wide outputs let a kernel off on every small value pass."""
    dtype = inputs[0].dtype
    got = _fwd_bwd(triton_fn, inputs, needs_grad, 0, dtype)
    base = _fwd_bwd(torch_fn, inputs, needs_grad, 0, dtype)
    truth = _fwd_bwd(torch_fn, [t.double() for t in inputs], needs_grad, 0, dtype)
    rows = []
    eps = torch.finfo(dtype).eps
    for name, g, b, r in zip(names, got, base, truth):
        err, terr, ref_max = ((g - r).abs().max().item(), (b - r).abs().max().item(), r.abs().max().item()) \
            if r.numel() else (0.0, 0.0, 0.0)
        rms, trms, ref_rms = (_rms(g - r), _rms(b - r), _rms(r)) if r.numel() else (0.0, 0.0, 0.0)
        tol, rms_tol = factor * terr + eps * ref_max, factor * trms + eps * ref_rms
        rows.append({"op": op, "case": case, "dtype": str(dtype).replace("torch.", ""), "tensor": name,
                     "max_err": err, "torch_bf16_err": terr, "tol": tol, "ref_max": ref_max,
                     "rms_err": rms, "torch_rms_err": trms, "rms_tol": rms_tol,
                     "ok": bool(torch.isfinite(g).all()) and err <= tol and rms <= rms_tol})
    return rows
