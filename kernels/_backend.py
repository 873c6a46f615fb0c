"""Backend selection shared by the ops in this package.

Every public op takes ``impl`` in {"auto", "triton", "torch"}:
  * "auto"   -> the Triton kernel on CUDA tensors, the pure-torch reference elsewhere;
  * "triton" -> always the Triton kernel (on CPU this needs ``TRITON_INTERPRET=1``);
  * "torch"  -> always the reference.
``set_default_impl`` changes what "auto" resolves to for one op family, so a config key
can force an implementation process-wide without threading arguments through models.
"""
import os

import torch

_VALID = ("auto", "triton", "torch")
_DEFAULTS = {"attention": "auto", "masked_ce": "auto", "contrastive": "auto", "fused_ops": "auto"}


def set_default_impl(op: str, impl: str) -> None:
    if op not in _DEFAULTS:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(_DEFAULTS)}")
    if impl not in _VALID:
        raise ValueError(f"unknown impl {impl!r} for {op}; expected one of {_VALID}")
    _DEFAULTS[op] = impl


def get_default_impl(op: str) -> str:
    return _DEFAULTS[op]


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_impl(op: str, impl, tensor: torch.Tensor) -> str:
    """Return "triton" or "torch" for this call."""
    impl = impl or "auto"
    if impl not in _VALID:
        raise ValueError(f"unknown impl {impl!r} for {op}; expected one of {_VALID}")
    if impl == "auto":
        impl = _DEFAULTS[op]
    if impl == "auto":
        return "triton" if tensor.is_cuda else "torch"
    if impl == "triton" and not tensor.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            f"{op}: impl='triton' on a CPU tensor needs TRITON_INTERPRET=1 (set before importing triton)"
        )
    return impl
