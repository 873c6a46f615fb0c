"""Non-causal flash attention: dense (B, S, H, D) or packed varlen (T, H, D) with cu_seqlens.

STATUS: reference only; the Triton kernel lands with issue 4 behind the same public function.
"""
import math

import torch

from ._backend import resolve_impl


def _dropout_keep_mask_torch(shape, dropout_p, seed, device):
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return (torch.rand(shape, generator=g) >= dropout_p).to(device)


def _attend_one(q, k, v, scale, keep=None, dropout_p=0.0, causal=False, window=None, softcap=None):
    # q: (S, Hq, D), k/v: (S, Hkv, D) -> (S, Hq, D). Math in fp32 for half inputs.
    S, Hq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    cdt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qf = q.to(cdt).transpose(0, 1)  # (Hq, S, D)
    kf = k.to(cdt).transpose(0, 1).repeat_interleave(group, dim=0)
    vf = v.to(cdt).transpose(0, 1).repeat_interleave(group, dim=0)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (Hq, S, S)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if causal or window is not None:
        i = torch.arange(S, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        allowed = torch.ones(S, S, dtype=torch.bool, device=q.device)
        if causal:
            allowed &= j <= i
        if window is not None:
            allowed &= (i - j).abs() < window
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if keep is not None:
        p = p * keep.to(cdt) / (1.0 - dropout_p)
    o = torch.matmul(p, vf)  # (Hq, S, D)
    return o.transpose(0, 1).to(q.dtype)


def flash_attention_reference(
    q, k, v, *, cu_seqlens=None, max_seqlen=None, scale=None, dropout_p=0.0, seed=None,
    dropout_mask=None, causal=False, window=None, softcap=None,
):
    """Pure-torch attention with the same contract as :func:`flash_attention`.

    Dense: q (B, S, Hq, D), k/v (B, S, Hkv, D). Varlen: q (T, Hq, D), k/v (T, Hkv, D), cu_seqlens (B+1,).
    ``dropout_mask``: optional keep-mask (bool) -- dense (B, Hq, S, S), or for varlen a list with one
    (Hq, L_b, L_b) mask per sequence -- so tests can replay the kernel's own mask exactly.
    ``window`` (|i - j| < window) and ``softcap`` exist for the engine's fallback path (Mistral
    sliding windows, Gemma2 logit soft-capping); the Triton kernel does not take them.
    """
    if q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(f"query heads {q.shape[-2]} not divisible by kv heads {k.shape[-2]}")
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if cu_seqlens is None:
        if q.dim() != 4:
            raise ValueError(f"dense attention expects q of shape (B, S, H, D), got {tuple(q.shape)}")
        B, S, Hq, _ = q.shape
        if dropout_p > 0 and dropout_mask is None:
            dropout_mask = _dropout_keep_mask_torch((B, Hq, S, S), dropout_p, seed, q.device)
        outs = [
            _attend_one(q[b], k[b], v[b], scale, None if dropout_mask is None else dropout_mask[b],
                        dropout_p, causal, window, softcap)
            for b in range(B)
        ]
        return torch.stack(outs, 0)
    if q.dim() != 3:
        raise ValueError(f"varlen attention expects q of shape (T, H, D), got {tuple(q.shape)}")
    bounds = cu_seqlens.tolist()
    outs = []
    for b in range(len(bounds) - 1):
        s0, s1 = bounds[b], bounds[b + 1]
        keep = None
        if dropout_p > 0:
            if dropout_mask is not None:
                keep = dropout_mask[b]
            else:
                keep = _dropout_keep_mask_torch(
                    (q.shape[1], s1 - s0, s1 - s0), dropout_p, None if seed is None else seed + b, q.device)
        outs.append(_attend_one(q[s0:s1], k[s0:s1], v[s0:s1], scale, keep, dropout_p, causal, window, softcap))
    return torch.cat(outs, 0) if outs else q.new_zeros(q.shape)


def flash_attention(
    q, k, v, *, cu_seqlens=None, max_seqlen=None, scale=None, dropout_p=0.0, seed=None,
    causal=False, impl=None,
):
    """Non-causal attention. Dense (B, S, Hq, D) or varlen (T, Hq, D) + cu_seqlens; GQA via fewer K/V heads."""
    backend = resolve_impl("attention", impl, q)
    if backend == "triton":
        raise NotImplementedError("Triton attention kernel not built yet (issue 4)")
    return flash_attention_reference(
        q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale, dropout_p=dropout_p,
        seed=seed, causal=causal)
