"""Fused LM head + cross-entropy over labelled rows.

STATUS: reference only; the Triton kernel lands with issue 5 behind the same public function.
"""
import torch

from ._backend import resolve_impl


def masked_cross_entropy_reference(
    hidden, weight, labels, *, ignore_index=-100, reduction="mean", softcap=None, z_loss=0.0
):
    """hidden (N, H), weight (V, H), labels (N,). Mean CE over rows whose label != ignore_index.

    All rows ignored -> loss 0 (connected to the graph, so gradients are zeros, not NaN).
    reduction: "mean" | "sum" | "none" (per-row (N,), zeros on ignored rows).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden (N, H) and weight (V, H), got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be (N,) = {tuple(hidden.shape[:1])}, got {tuple(labels.shape)}")
    keep = labels != ignore_index
    idx = keep.nonzero().squeeze(1)
    h = hidden.index_select(0, idx)
    y = labels.index_select(0, idx)
    cdt = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
    logits = h.to(cdt) @ weight.to(cdt).t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    lse = torch.logsumexp(logits, dim=-1)
    per_row = lse - logits.gather(1, y[:, None]).squeeze(1)
    if z_loss:
        per_row = per_row + z_loss * lse.square()
    if reduction == "none":
        return torch.zeros(hidden.shape[0], dtype=cdt, device=hidden.device).index_put((idx,), per_row)
    total = per_row.sum() + 0.0 * hidden.sum()  # keeps the graph alive when no row is labelled
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(int(idx.numel()), 1)
    raise ValueError(f"unknown reduction {reduction!r}")


def masked_cross_entropy(
    hidden, weight, labels, *, ignore_index=-100, reduction="mean", softcap=None, z_loss=0.0, impl=None
):
    backend = resolve_impl("masked_ce", impl, hidden)
    if backend == "triton":
        raise NotImplementedError("Triton masked cross-entropy not built yet (issue 5)")
    return masked_cross_entropy_reference(
        hidden, weight, labels, ignore_index=ignore_index, reduction=reduction, softcap=softcap, z_loss=z_loss)
