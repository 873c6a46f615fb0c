"""FlashAttention's kernel contract in torch maths, for CPU tests of transformers' ``flash_attention_2`` path:
(total, H, D) varlen and (B, L, H, D) dense inputs, grouped K/V heads, ``causal``, ``window_size=(left, right)``
(query i sees keys i - left .. i + right; -1 is unbounded) and ``softcap``. Every call's flags are kept in
``CALLS``. Only the kernel is stood in: transformers' own unpadding, kwarg handling and masks run as on a GPU."""
import torch

CALLS = []


def _attend(q, k, v, softmax_scale, causal, window_size, softcap):
    """One sequence: q (L, H, D), k and v (S, Hkv, D)."""
    k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    s = torch.einsum("lhd,shd->hls", q.float(), k.float()) * (softmax_scale or q.shape[-1] ** -0.5)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i, j = torch.arange(q.shape[0])[:, None], torch.arange(k.shape[0])[None, :]
    keep = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool)
    if causal:
        keep &= j <= i
    left, right = window_size
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return torch.einsum("hls,shd->lhd", s.masked_fill(~keep, float("-inf")).softmax(-1), v.float()).to(q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    deterministic=False):
    CALLS.append({"causal": causal, "window_size": tuple(window_size), "softcap": softcap})
    return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal, window_size, softcap)
                        for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False):
    CALLS.append({"causal": causal, "window_size": tuple(window_size), "softcap": softcap})
    out = torch.empty_like(q)
    for b in range(len(cu_seqlens_q) - 1):
        a, e, ka, ke = (int(x) for x in (cu_seqlens_q[b], cu_seqlens_q[b + 1], cu_seqlens_k[b], cu_seqlens_k[b + 1]))
        out[a:e] = _attend(q[a:e], k[ka:ke], v[ka:ke], softmax_scale, causal, window_size, softcap)
    return out


def install(monkeypatch):
    """Route transformers' ``flash_attention_2`` to these kernels (it would import flash-attn, which needs CUDA)."""
    import transformers.modeling_flash_attention_utils as fau

    monkeypatch.setattr(fau, "_lazy_imports", lambda *a, **k: (flash_attn_func, flash_attn_varlen_func, None,
                                                                fau._pad_input, fau._unpad_input))
    monkeypatch.setattr(fau, "_loaded_implementation", None)
    CALLS.clear()
