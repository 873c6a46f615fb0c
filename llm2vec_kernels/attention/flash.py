"""Non-causal flash attention: dense (B, S, H, D) or packed varlen (T, H, D) with cu_seqlens.

The Triton path is a FlashAttention-2 style kernel set, forward and backward, behind
:func:`flash_attention`:

* ``_attn_fwd``       one program per (query block, query head, sequence): online softmax over all key
                      blocks, writes O and the row log-sum-exp (base 2, scale folded in) for the backward.
* ``_attn_bwd_pre``   delta_i = dO_i . O_i per query row.
* ``_attn_bwd_dkdv``  one program per (key block, KV head, sequence): loops over the query heads of its
                      GQA group and every query block, so dK/dV need no atomics (deterministic).
* ``_attn_bwd_dq``    one program per (query block, query head, sequence): loops over key blocks.
* the keep-mask the kernels apply is ``llm2vec_kernels._backend.philox_keep``; ``_backend.keep_mask_kernel`` writes
  it out (:func:`flash_attention_dropout_mask`), so tests can replay it.

Dense inputs are addressed through their strides (a q/k/v view of a fused qkv projection works without
copies, as long as the head dim is contiguous); varlen inputs are the same kernels with the sequence
start read from ``cu_seqlens``. GQA/MQA: Hq must be a multiple of Hkv; query head h reads KV head
h // (Hq // Hkv). Any head dim up to 256 (non powers of two are padded inside the kernel).

Dropout keeps element (b, h, i, j) iff the top 24 bits of Philox-4x32-7(key=seed, counter=(j, i, h, b))
are >= round(p * 2**24), and scales kept probabilities by 1 / (1 - p). The mask depends only on the
seed and the element's position, never on the tiling, so :func:`flash_attention_dropout_mask`
rebuilds it exactly. Seeds are taken modulo 2**31.

``causal=True`` is supported (top-left aligned, j <= i) but the kernels are tuned for the non-causal case.
fp16/bf16 accumulate in fp32; fp32 inputs go through TF32 tensor-core dots (about 1e-3 relative error;
impl="torch" is the exact path).
"""
import math

import torch
import triton
import triton.language as tl

from .._backend import (KERNEL_DTYPES, dot_precision, dropout_threshold, interpreter_enabled, keep_mask,
                        on_input_device, philox_keep, resolve_impl)
from . import configs, tuning
from .configs import _arch


_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Torch reference
# ----------------------------------------------------------------------------------------------

def _dropout_keep_mask_torch(shape, dropout_p, seed, device):
    # Drawn where the tensors are: the engine's torch path (a sliding window under the sequence) draws a
    # (B, H, S, S) mask per layer, and a host-side draw plus copy each layer would cost more than the layer on a GPU.
    device = torch.device(device)
    if device.type == "meta":
        return torch.empty(shape, dtype=torch.bool, device=device)
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return torch.rand(shape, generator=g, device=device) >= dropout_p


def _attend_one(q, k, v, scale, keep=None, dropout_p=0.0, causal=False, window=None, softcap=None):
    # q: (S, Hq, D), k/v: (S, Hkv, D) -> (S, Hq, D). Math in fp32 for half inputs.
    # GQA without repeating K and V: the group's query heads are stacked as rows, (Hkv, group * S, D) against
    # (Hkv, S, D), so backward keeps fp32 K and V once per KV head.
    S, Hq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    cdt = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qf = q.to(cdt).transpose(0, 1).reshape(Hkv, group * S, D)  # query head h = kv head h // group
    kf = k.to(cdt).transpose(0, 1)  # (Hkv, S, D)
    vf = v.to(cdt).transpose(0, 1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (Hkv, group * S, S)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if causal or window is not None:
        i = torch.arange(S, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        allowed = torch.ones(S, S, dtype=torch.bool, device=q.device)
        if causal:
            allowed &= j <= i
        if window is not None:
            allowed &= (i - j).abs() <= window  # flash-attn's window_size=(window, window)
        s = s.view(Hkv, group, S, S).masked_fill(~allowed, float("-inf")).view(Hkv, group * S, S)
    p = torch.softmax(s, dim=-1)
    if keep is not None:
        p = p * keep.to(cdt).reshape(Hkv, group * S, S) / (1.0 - dropout_p)
    o = torch.matmul(p, vf)  # (Hkv, group * S, D)
    return o.view(Hq, S, D).transpose(0, 1).to(q.dtype)


def flash_attention_reference(
    q, k, v, *, cu_seqlens=None, max_seqlen=None, scale=None, dropout_p=0.0, seed=None,
    dropout_mask=None, causal=False, window=None, softcap=None, seqlens=None,
):
    """Pure-torch attention with the same contract as :func:`flash_attention`.

    Dense: q (B, S, Hq, D), k/v (B, S, Hkv, D). Varlen: q (T, Hq, D), k/v (T, Hkv, D), cu_seqlens (B+1,).
    ``dropout_mask``: optional keep-mask (bool) -- dense (B, Hq, S, S), or for varlen a list with one
    (Hq, L_b, L_b) mask per sequence -- so tests can replay the kernel's own mask exactly
    (:func:`flash_attention_dropout_mask` returns it in this format).
    ``window`` (|i - j| <= window: flash-attn's ``window_size=(window, window)``, transformers' bidirectional
    sliding-window mask) exists for the engine's fallback path (sliding windows shorter than the
    sequence), which the Triton kernel does not take; ``softcap`` (Gemma2) both take.
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
        if seqlens is not None:  # right-padded: the first L_b rows of sequence b are real, the rest give 0
            out = q.new_zeros(q.shape)
            for b, L in enumerate(seqlens.tolist()):
                L = max(0, min(int(L), S))
                if L:
                    keep = None if dropout_mask is None else dropout_mask[b][:, :L, :L]
                    out[b, :L] = _attend_one(q[b, :L], k[b, :L], v[b, :L], scale, keep, dropout_p, causal, window,
                                             softcap)
            return out
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
    if not outs:
        return q.new_zeros(q.shape)
    # rows outside [cu_seqlens[0], cu_seqlens[-1]) belong to no sequence: zeros, so the output has q's rows
    head = [q.new_zeros((bounds[0],) + tuple(q.shape[1:]))] if bounds[0] > 0 else []
    tail = [q.new_zeros((q.shape[0] - bounds[-1],) + tuple(q.shape[1:]))] if bounds[-1] < q.shape[0] else []
    return torch.cat(head + outs + tail, 0)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: the CPU interpreter mis-multiplies bf16 operands, so there they go through fp32.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load(ptrs, seq_idx, seqlen, d_idx, HEAD_DIM: tl.constexpr, MASK_SEQ: tl.constexpr, PAD_D: tl.constexpr):
    """Load a tile whose sequence positions are seq_idx and feature positions d_idx (either orientation)."""
    if MASK_SEQ:
        if PAD_D:
            x = tl.load(ptrs, mask=(seq_idx < seqlen) & (d_idx < HEAD_DIM), other=0.0)
        else:
            x = tl.load(ptrs, mask=seq_idx < seqlen, other=0.0)
    else:
        if PAD_D:
            x = tl.load(ptrs, mask=d_idx < HEAD_DIM, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _seq_bounds(cu_ptr, b, seqlen_dense, VARLEN: tl.constexpr, PADDED: tl.constexpr):
    # VARLEN: sequence b is rows cu[b]:cu[b+1] of a packed tensor. PADDED: the dense row b of a right-padded
    # batch, of which the first lens[b] positions are real (cu_ptr holds lens; clamped to S, never read past it).
    if VARLEN:
        start = tl.load(cu_ptr + b)
        seqlen = tl.load(cu_ptr + b + 1) - start
    else:
        start = b * 0
        if PADDED:
            seqlen = tl.maximum(tl.minimum(tl.load(cu_ptr + b), seqlen_dense), 0)
        else:
            seqlen = seqlen_dense + b * 0
    return start, seqlen


@triton.jit
def _zero_rows(base, rows, stride_s, seqlen_dense, offs_d, HEAD_DIM: tl.constexpr):
    """Zeros to the rows (< S) of the (rows, D) tile at base: a PADDED block that lies wholly in the padding."""
    zero = (rows[:, None] * 0 + offs_d[None, :] * 0).to(base.dtype.element_ty)
    tl.store(base + rows[:, None] * stride_s + offs_d[None, :], zero,
             mask=(rows[:, None] < seqlen_dense) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _store_rows(ptrs, x, rows, seqlen, seqlen_dense, offs_d, HEAD_DIM: tl.constexpr, PADDED: tl.constexpr):
    """Store rows < seqlen of tile x; PADDED also writes 0 to rows in [seqlen, S), the batch's padding."""
    d_ok = offs_d[None, :] < HEAD_DIM
    if PADDED:
        tl.store(ptrs, tl.where(rows[:, None] < seqlen, x, 0.0), mask=(rows[:, None] < seqlen_dense) & d_ok)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < seqlen) & d_ok)


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): one MUFU exp2; saturates to +-1 (exp2 -> inf or 0), no NaN.
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_d, lo, hi, seqlen, qk_scale, cap,
    seed, head, batch, drop_thresh,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, PAD_D: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    # Online softmax in base 2: qk_scale = scale * log2(e), so exp(scale * q.k - m) = exp2(s - m') with s and
    # m' in log2 units; exp2 is one MUFU op. Per row: m_i = running max, l_i = running sum of exp2(s - m_i),
    # acc = running sum of p @ V, all rescaled by alpha = exp2(m_old - m_new) when the max grows.
    # MASK=False is the steady state (full key blocks); MASK=True handles the ragged tail (and causal).
    offs_n = tl.arange(0, BLOCK_N)
    # Pointers stay loop-invariant (offset by a scalar per step): loop-carried pointer tensors cost two
    # registers per element and made these kernels spill.
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load(k_ptrs + start_n * stride_ks, cols[None, :], seqlen, offs_d[:, None], HEAD_DIM, MASK, PAD_D)  # (D, N)
        qk = _dot(q, k, PRECISION, UPCAST)  # (M, N), unscaled
        if SOFTCAP:
            # soft-capped scores in log2 units, cap * tanh(qk * scale / softcap) with cap = softcap * log2(e)
            # (qk_scale = scale / softcap here): the tanh comes before the row max, so no scale is left to fold
            qk = cap * _tanh(qk * qk_scale)
            unit = 1.0
        else:
            unit = qk_scale
        if MASK:
            valid = cols[None, :] < seqlen
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None])
            qk = tl.where(valid, qk, float("-inf"))
        # The scale goes onto the row max (M values) rather than onto every score: max(c * s) = c * max(s) for
        # c > 0 (flash_attention rejects any other scale), and exp2(qk * c - m) is then one FMA per score.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * unit)
        p = tl.math.exp2(qk * unit - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # Dropout acts on the normalised probabilities: l_i sums the undropped p, the kept p feed acc, and
        # the 1/(1-p) rescale is applied once at the end with 1/l_i.
        if DROPOUT:
            p = tl.where(philox_keep(seed, cols[None, :], offs_m[:, None], head, batch, drop_thresh), p, 0.0)
        v = _load(v_ptrs + start_n * stride_vs, cols[:, None], seqlen, offs_d[None, :], HEAD_DIM, MASK, PAD_D)  # (N, D)
        acc += _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_ptr,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    seqlen_dense, qk_scale, cap, seed, drop_thresh, drop_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, PADDED: tl.constexpr, SOFTCAP: tl.constexpr,
):
    # q/o: (B, S, Hq, D) or (T, Hq, D); k/v: (B, S, Hkv, D) or (T, Hkv, D); lse: (B, Hq, S) or (Hq, T) fp32.
    # Grid: (query blocks of the longest sequence, Hq, B); blocks past a sequence's end exit at once (PADDED:
    # after writing zeros to their output rows).
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    start, seqlen = _seq_bounds(cu_ptr, batch, seqlen_dense, VARLEN, PADDED)
    m0 = pid_m * BLOCK_M
    b64 = batch.to(tl.int64)  # base offsets in int64: B*S*H*D or T*H*D can pass 2**31
    s64 = start.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # output tiles are addressed from a scalar base at each store: a pointer tile kept live across the
    # main loop would cost registers
    o_base = o_ptr + b64 * stride_ob + s64 * stride_os + head * stride_oh
    if m0 >= seqlen:
        if PADDED:
            _zero_rows(o_base, offs_m, stride_os, seqlen_dense, offs_d, HEAD_DIM)
        return
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    kv_head = head // GROUP

    offs_n = tl.arange(0, BLOCK_N)
    q_base = q_ptr + b64 * stride_qb + s64 * stride_qs + head * stride_qh
    k_base = k_ptr + b64 * stride_kb + s64 * stride_ks + kv_head * stride_kh
    v_base = v_ptr + b64 * stride_vb + s64 * stride_vs + kv_head * stride_vh
    q = _load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], offs_m[:, None], seqlen, offs_d[None, :],
              HEAD_DIM, True, PAD_D)
    k_ptrs = k_base + offs_n[None, :] * stride_ks + offs_d[:, None]
    v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :]

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_d, 0,
            tl.minimum(seqlen, m0 + BLOCK_M), seqlen, qk_scale, cap, seed, head, batch, drop_thresh,
            HEAD_DIM, BLOCK_N, True, PAD_D, CAUSAL, DROPOUT, PRECISION, UPCAST, SOFTCAP)
    else:
        n_full = (seqlen // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_d, 0, n_full, seqlen,
            qk_scale, cap, seed, head, batch, drop_thresh,
            HEAD_DIM, BLOCK_N, False, PAD_D, CAUSAL, DROPOUT, PRECISION, UPCAST, SOFTCAP)
        if n_full < seqlen:
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_d, n_full, seqlen,
                seqlen, qk_scale, cap, seed, head, batch, drop_thresh,
                HEAD_DIM, BLOCK_N, True, PAD_D, CAUSAL, DROPOUT, PRECISION, UPCAST, SOFTCAP)

    inv_l = 1.0 / l_i
    if DROPOUT:
        inv_l = inv_l * drop_scale
    o = acc * inv_l[:, None]
    row_ok = offs_m < seqlen
    _store_rows(o_base + offs_m[:, None] * stride_os + offs_d[None, :], o.to(o_ptr.dtype.element_ty), offs_m, seqlen,
                seqlen_dense, offs_d, HEAD_DIM, PADDED)
    # LSE in log2 units with the scale folded in: the backward recomputes P = exp2(s * qk_scale - lse).
    lse_ptrs = lse_ptr + b64 * stride_lb + head * stride_lh + start + offs_m
    tl.store(lse_ptrs, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit
def _attn_bwd_pre(
    o_ptr, do_ptr, delta_ptr, cu_ptr,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh, seqlen_dense,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr,
    PADDED: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    start, seqlen = _seq_bounds(cu_ptr, batch, seqlen_dense, VARLEN, PADDED)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen:
        return
    b64 = batch.to(tl.int64)
    s64 = start.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(o_ptr + b64 * stride_ob + s64 * stride_os + head * stride_oh
                + offs_m[:, None] * stride_os + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptr + b64 * stride_dob + s64 * stride_dos + head * stride_doh
                 + offs_m[:, None] * stride_dos + offs_d[None, :], mask=mask, other=0.0)
    # delta_i = sum_j P_ij dP_ij = dO_i . O_i (dropout included: dP is taken w.r.t. the dropped, rescaled P).
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + b64 * stride_lb + head * stride_lh + start + offs_m, delta, mask=offs_m < seqlen)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, dqa_base, stride_qs, stride_dos, stride_dqas, offs_n, offs_d,
    lo, hi, seqlen, qk_scale, cap, sm_scale, seed, head, batch, drop_thresh, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr, PAD_D: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, SOFTCAP: tl.constexpr,
):
    # Works on transposed tiles (keys x queries) so dK, dV accumulate as (N, D) without transposing them.
    # With Z the keep-mask and r = 1/(1-p), O = (P * Z * r) V, so
    #   dV  = (P * Z * r)^T dO
    #   dP  = (dO V^T) * Z * r            (gradient w.r.t. the undropped P)
    #   dS  = P * (dP - delta),  delta_i = sum_j P_ij dP_ij = dO_i . O_i
    #   dK  = scale * dS^T Q    (the scale is applied once, at the store)
    # Rows past the sequence end load q = dO = 0, so they add nothing to dK/dV.
    # ATOMIC_DQ > 0 (the non-deterministic mode): dQ_i += scale * sum_j dS_ij K_j is added here too, with fp32
    # atomics into a zeroed (rows, Hq, D) buffer, so the dQ kernel -- which recomputes S and dP, two of
    # the backward's seven matmuls -- does not run. The order of the atomic adds varies run to run.
    # ATOMIC_DQ picks how that product is formed (atomic_dq_form): 1 as (M, D), 2 transposed as (D, M).
    offs_mb = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_mb
        qT = _load(q_ptrs + start_m * stride_qs, rows[None, :], seqlen, offs_d[:, None], HEAD_DIM, MASK, PAD_D)  # (D, M)
        if MASK:
            lse = tl.load(lse_ptrs + start_m, mask=rows < seqlen, other=0.0)
        else:
            lse = tl.load(lse_ptrs + start_m)
        qkT = _dot(k, qT, PRECISION, UPCAST)  # (N, M)
        if SOFTCAP:  # s = softcap tanh(x / softcap) with x = scale q.k: dS/dx = 1 - tanh^2, applied to dS below
            tT = _tanh(qkT * qk_scale)
            pT = tl.math.exp2(cap * tT - lse[None, :])
        else:
            pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        if CAUSAL:
            pT = tl.where(offs_n[:, None] <= rows[None, :], pT, 0.0)
        do = _load(do_ptrs + start_m * stride_dos, rows[:, None], seqlen, offs_d[None, :], HEAD_DIM, MASK, PAD_D)  # (M, D)
        if MASK:
            delta = tl.load(delta_ptrs + start_m, mask=rows < seqlen, other=0.0)
        else:
            delta = tl.load(delta_ptrs + start_m)
        dpT = _dot(v, tl.trans(do), PRECISION, UPCAST)  # (N, M)
        if DROPOUT:
            keepT = philox_keep(seed, offs_n[:, None], rows[None, :], head, batch, drop_thresh)
            dv += _dot(tl.where(keepT, pT * drop_scale, 0.0).to(do.dtype), do, PRECISION, UPCAST)
            dpT = tl.where(keepT, dpT * drop_scale, 0.0)
        else:
            dv += _dot(pT.to(do.dtype), do, PRECISION, UPCAST)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk += _dot(dsT.to(qT.dtype), tl.trans(qT), PRECISION, UPCAST)
        if ATOMIC_DQ > 0:
            if ATOMIC_DQ == 2:
                # dQ^T = K^T dS^T (D, M), read back as (M, D): the MMA's row count is then the head dim (>= 64),
                # not the small query tile, so Hopper runs it as a warpgroup MMA (wgmma) like the other four
                # products; the compiler re-lays the tile out for coalesced v4 atomics either way.
                dq = tl.trans(_dot(tl.trans(k), dsT.to(qT.dtype), PRECISION, UPCAST))
            else:
                dq = _dot(tl.trans(dsT.to(qT.dtype)), k, PRECISION, UPCAST)  # (M, D)
            if MASK:
                ok = (rows[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
            else:
                ok = (rows[:, None] >= 0) & (offs_d[None, :] < HEAD_DIM)
            tl.atomic_add(dqa_base + rows[:, None] * stride_dqas + offs_d[None, :], dq * sm_scale, mask=ok,
                          sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dqa_ptr, cu_ptr,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_dqab, stride_dqas, stride_dqah,
    stride_lb, stride_lh,
    seqlen_dense, qk_scale, cap, sm_scale, seed, drop_thresh, drop_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, ATOMIC_DQ: tl.constexpr, PADDED: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    # dqa: the fp32 dQ accumulator (layout of q) when ATOMIC_DQ > 0, else an unused placeholder.
    pid_n = tl.program_id(0)
    kv_head = tl.program_id(1)
    batch = tl.program_id(2)
    start, seqlen = _seq_bounds(cu_ptr, batch, seqlen_dense, VARLEN, PADDED)
    n0 = pid_n * BLOCK_N
    b64 = batch.to(tl.int64)
    s64 = start.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dk_base = dk_ptr + b64 * stride_dkb + s64 * stride_dks + kv_head * stride_dkh
    dv_base = dv_ptr + b64 * stride_dvb + s64 * stride_dvs + kv_head * stride_dvh
    if n0 >= seqlen:
        if PADDED:
            _zero_rows(dk_base, offs_n, stride_dks, seqlen_dense, offs_d, HEAD_DIM)
            _zero_rows(dv_base, offs_n, stride_dvs, seqlen_dense, offs_d, HEAD_DIM)
        return
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM

    k = _load(k_ptr + b64 * stride_kb + s64 * stride_ks + kv_head * stride_kh
              + offs_n[:, None] * stride_ks + offs_d[None, :], offs_n[:, None], seqlen, offs_d[None, :],
              HEAD_DIM, True, PAD_D)
    v = _load(v_ptr + b64 * stride_vb + s64 * stride_vs + kv_head * stride_vh
              + offs_n[:, None] * stride_vs + offs_d[None, :], offs_n[:, None], seqlen, offs_d[None, :],
              HEAD_DIM, True, PAD_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    m_full = (seqlen // BLOCK_M) * BLOCK_M
    for g in range(GROUP):
        head = kv_head * GROUP + g
        q_ptrs = q_ptr + b64 * stride_qb + s64 * stride_qs + head * stride_qh \
            + offs_m[None, :] * stride_qs + offs_d[:, None]
        do_ptrs = do_ptr + b64 * stride_dob + s64 * stride_dos + head * stride_doh \
            + offs_m[:, None] * stride_dos + offs_d[None, :]
        lse_ptrs = lse_ptr + b64 * stride_lb + head * stride_lh + start + offs_m
        delta_ptrs = delta_ptr + b64 * stride_lb + head * stride_lh + start + offs_m
        dqa_base = dqa_ptr + b64 * stride_dqab + s64 * stride_dqas + head * stride_dqah
        if CAUSAL:
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, dqa_base, stride_qs, stride_dos, stride_dqas,
                offs_n, offs_d, (n0 // BLOCK_M) * BLOCK_M, seqlen, seqlen, qk_scale, cap, sm_scale, seed, head,
                batch, drop_thresh, drop_scale, HEAD_DIM, BLOCK_M, True, PAD_D, CAUSAL, DROPOUT, PRECISION, UPCAST,
                ATOMIC_DQ, SOFTCAP)
        else:
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, dqa_base, stride_qs, stride_dos, stride_dqas,
                offs_n, offs_d, 0, m_full, seqlen, qk_scale, cap, sm_scale, seed, head, batch, drop_thresh,
                drop_scale, HEAD_DIM, BLOCK_M, False, PAD_D, CAUSAL, DROPOUT, PRECISION, UPCAST, ATOMIC_DQ, SOFTCAP)
            if m_full < seqlen:
                dk, dv = _bwd_dkdv_inner(
                    dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, dqa_base, stride_qs, stride_dos,
                    stride_dqas, offs_n, offs_d, m_full, seqlen, seqlen, qk_scale, cap, sm_scale, seed, head, batch,
                    drop_thresh, drop_scale, HEAD_DIM, BLOCK_M, True, PAD_D, CAUSAL, DROPOUT, PRECISION, UPCAST,
                    ATOMIC_DQ, SOFTCAP)

    # key rows past the end loaded K = V = 0 but still gathered P = exp2(-lse) terms: never stored as such
    _store_rows(dk_base + offs_n[:, None] * stride_dks + offs_d[None, :], (dk * sm_scale).to(dk_ptr.dtype.element_ty),
                offs_n, seqlen, seqlen_dense, offs_d, HEAD_DIM, PADDED)
    _store_rows(dv_base + offs_n[:, None] * stride_dvs + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), offs_n,
                seqlen, seqlen_dense, offs_d, HEAD_DIM, PADDED)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_d,
    lo, hi, seqlen, qk_scale, cap, seed, head, batch, drop_thresh, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, PAD_D: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    # dQ = scale * dS K with dS = P * (dP - delta) as in _bwd_dkdv_inner; padded key columns are masked to
    # P = 0 (their K rows load as 0, which alone would give P = exp2(-lse) != 0).
    offs_nb = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_nb
        kT = _load(k_ptrs + start_n * stride_ks, cols[None, :], seqlen, offs_d[:, None], HEAD_DIM, MASK, PAD_D)
        vT = _load(v_ptrs + start_n * stride_vs, cols[None, :], seqlen, offs_d[:, None], HEAD_DIM, MASK, PAD_D)  # (D, N)
        qk = _dot(q, kT, PRECISION, UPCAST)
        if SOFTCAP:
            t = _tanh(qk * qk_scale)
            p = tl.math.exp2(cap * t - lse[:, None])
        else:
            p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASK:
            valid = cols[None, :] < seqlen
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None])
            p = tl.where(valid, p, 0.0)
        dp = _dot(do, vT, PRECISION, UPCAST)
        if DROPOUT:
            keep = philox_keep(seed, cols[None, :], offs_m[:, None], head, batch, drop_thresh)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += _dot(ds.to(kT.dtype), tl.trans(kT), PRECISION, UPCAST)
    return dq


@triton.jit
def _attn_bwd_dq(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_ptr,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    seqlen_dense, qk_scale, cap, sm_scale, seed, drop_thresh, drop_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, PADDED: tl.constexpr, SOFTCAP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    start, seqlen = _seq_bounds(cu_ptr, batch, seqlen_dense, VARLEN, PADDED)
    m0 = pid_m * BLOCK_M
    b64 = batch.to(tl.int64)
    s64 = start.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dq_base = dq_ptr + b64 * stride_dqb + s64 * stride_dqs + head * stride_dqh
    if m0 >= seqlen:
        if PADDED:
            _zero_rows(dq_base, offs_m, stride_dqs, seqlen_dense, offs_d, HEAD_DIM)
        return
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    kv_head = head // GROUP
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < seqlen

    q = _load(q_ptr + b64 * stride_qb + s64 * stride_qs + head * stride_qh
              + offs_m[:, None] * stride_qs + offs_d[None, :], offs_m[:, None], seqlen, offs_d[None, :],
              HEAD_DIM, True, PAD_D)
    do = _load(do_ptr + b64 * stride_dob + s64 * stride_dos + head * stride_doh
               + offs_m[:, None] * stride_dos + offs_d[None, :], offs_m[:, None], seqlen, offs_d[None, :],
               HEAD_DIM, True, PAD_D)
    lse = tl.load(lse_ptr + b64 * stride_lb + head * stride_lh + start + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + b64 * stride_lb + head * stride_lh + start + offs_m, mask=row_ok, other=0.0)
    k_ptrs = k_ptr + b64 * stride_kb + s64 * stride_ks + kv_head * stride_kh \
        + offs_n[None, :] * stride_ks + offs_d[:, None]
    v_ptrs = v_ptr + b64 * stride_vb + s64 * stride_vs + kv_head * stride_vh \
        + offs_n[None, :] * stride_vs + offs_d[:, None]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        dq = _bwd_dq_inner(
            dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_d,
            0, tl.minimum(seqlen, m0 + BLOCK_M), seqlen, qk_scale, cap, seed, head, batch, drop_thresh, drop_scale,
            HEAD_DIM, BLOCK_N, True, PAD_D, CAUSAL, DROPOUT, PRECISION, UPCAST, SOFTCAP)
    else:
        n_full = (seqlen // BLOCK_N) * BLOCK_N
        dq = _bwd_dq_inner(
            dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_d,
            0, n_full, seqlen, qk_scale, cap, seed, head, batch, drop_thresh, drop_scale,
            HEAD_DIM, BLOCK_N, False, PAD_D, CAUSAL, DROPOUT, PRECISION, UPCAST, SOFTCAP)
        if n_full < seqlen:
            dq = _bwd_dq_inner(
                dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_d,
                n_full, seqlen, seqlen, qk_scale, cap, seed, head, batch, drop_thresh, drop_scale,
                HEAD_DIM, BLOCK_N, True, PAD_D, CAUSAL, DROPOUT, PRECISION, UPCAST, SOFTCAP)
    _store_rows(dq_base + offs_m[:, None] * stride_dqs + offs_d[None, :], (dq * sm_scale).to(dq_ptr.dtype.element_ty),
                offs_m, seqlen, seqlen_dense, offs_d, HEAD_DIM, PADDED)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def _check_inputs(q, k, v, cu_seqlens):
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    want = 3 if cu_seqlens is not None else 4
    kind = "varlen attention expects (T, H, D)" if want == 3 else "dense attention expects (B, S, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            raise ValueError(f"{kind}; {name} has shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ outside the head count")
    if q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(f"query heads {q.shape[-2]} not divisible by kv heads {k.shape[-2]}")
    if q.shape[-1] > 256:
        raise ValueError(f"head dim {q.shape[-1]} > 256 is not supported by the Triton kernel")


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides3(t, varlen):
    """(batch, seq, head) strides; varlen tensors have no batch stride (sequences start at cu_seqlens)."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


class _Layout:
    """Shapes shared by the forward and backward launches."""

    def __init__(self, q, k, cu_seqlens, max_seqlen, padded=False):
        self.varlen = cu_seqlens is not None
        self.padded = bool(padded)  # dense right-padded batch; the lengths travel in the cu pointer
        self.head_dim = q.shape[-1]
        self.block_d = configs._block_d(self.head_dim)
        self.n_heads, self.n_kv_heads = q.shape[-2], k.shape[-2]
        self.group = self.n_heads // self.n_kv_heads
        if self.varlen:
            self.batch = cu_seqlens.numel() - 1
            self.total = q.shape[0]
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item()) if self.batch > 0 else 0
            self.max_seqlen = int(max_seqlen)
            self.seqlen_dense = 0
            self.lse_shape = (self.n_heads, self.total)
            self.lse_strides = (0, self.total)
        else:
            self.batch, self.max_seqlen = q.shape[0], q.shape[1]
            self.seqlen_dense = self.max_seqlen
            self.lse_shape = (self.batch, self.n_heads, self.max_seqlen)
            self.lse_strides = (self.n_heads * self.max_seqlen, self.max_seqlen)


def _dropout_args(dropout_p):
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def _upcast(dtype):
    return interpreter_enabled() and dtype == torch.bfloat16


def _score_args(scale, softcap):
    """(qk_scale, cap) the kernels take: scale * log2(e) and 0 without soft-capping; with it, the tanh's argument
    factor scale / softcap and cap = softcap * log2(e) (scores in log2 units: cap * tanh(q.k * qk_scale))."""
    if softcap is None:
        return scale * _LOG2E, 0.0
    return scale / softcap, softcap * _LOG2E


@on_input_device
def _attn_forward(q, k, v, cu, lay, scale, dropout_p, seed, causal, softcap=None):
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(lay.lse_shape, device=q.device, dtype=torch.float32)
    thresh, drop_scale = _dropout_args(dropout_p)

    def launch(cfg):
        BM, BN, warps, stages = cfg
        _attn_fwd[(triton.cdiv(lay.max_seqlen, BM), lay.n_heads, lay.batch)](
            q, k, v, o, lse, cu,
            *_strides3(q, lay.varlen), *_strides3(k, lay.varlen), *_strides3(v, lay.varlen),
            *_strides3(o, lay.varlen), *lay.lse_strides,
            lay.seqlen_dense, *_score_args(scale, softcap), seed, thresh, drop_scale,
            GROUP=lay.group, HEAD_DIM=lay.head_dim, BLOCK_D=lay.block_d, BLOCK_M=BM, BLOCK_N=BN,
            VARLEN=lay.varlen, CAUSAL=causal, DROPOUT=dropout_p > 0,
            PRECISION=dot_precision(q.dtype), UPCAST=_upcast(q.dtype), PADDED=lay.padded, SOFTCAP=softcap is not None,
            num_warps=warps, num_stages=stages,
        )

    default = configs.launch_config("fwd", lay.block_d, q.dtype, dropout_p > 0, _arch(q), interpreter_enabled())
    key = tuning._tune_key("fwd", q, lay, dropout_p, causal, softcap is not None)
    launch(tuning._tuned("fwd", key, default, q, launch))
    return o, lse


@on_input_device
def _attn_backward(do, q, k, v, o, lse, cu, lay, scale, dropout_p, seed, causal, autotune=None, atomic_dq=False,
                   softcap=None):
    do = _last_dim_contiguous(do)
    thresh, drop_scale = _dropout_args(dropout_p)
    interp = interpreter_enabled()
    delta = torch.empty_like(lse)
    pre_bm = configs._PRE_BLOCK_M if not interp else 32
    _attn_bwd_pre[(triton.cdiv(lay.max_seqlen, pre_bm), lay.n_heads, lay.batch)](
        o, do, delta, cu, *_strides3(o, lay.varlen), *_strides3(do, lay.varlen), *lay.lse_strides,
        lay.seqlen_dense, HEAD_DIM=lay.head_dim, BLOCK_D=lay.block_d, BLOCK_M=pre_bm, VARLEN=lay.varlen,
        PADDED=lay.padded,
    )
    atomic_dq = atomic_dq and configs.atomic_dq_supported(lay.block_d, q.dtype, interp)
    # varlen rows past cu_seqlens[-1] belong to no sequence and no kernel writes their gradients: zeros there
    # (uninitialised memory would reach the projections' weight gradients through dq / dk / dv)
    new, new_like = (torch.zeros, torch.zeros_like) if lay.varlen else (torch.empty, torch.empty_like)
    if atomic_dq:  # fp32 accumulator in q's layout; the dQ kernel does not run
        dqa = new(q.shape, device=q.device, dtype=torch.float32)
        dqa_strides = _strides3(dqa, lay.varlen)
    else:
        dq = new_like(q, memory_format=torch.contiguous_format)
        dqa, dqa_strides = lse, (0, 0, 0)  # placeholder pointer, never touched
    dk = new_like(k, memory_format=torch.contiguous_format)
    dv = new_like(v, memory_format=torch.contiguous_format)
    dkdv_default, dq_default = (configs.launch_config(kind, lay.block_d, q.dtype, dropout_p > 0, _arch(q), interp,
                                                      atomic_dq) for kind in ("dkdv", "dq"))
    dq_form = configs.atomic_dq_form(_arch(q), dropout_p > 0) if atomic_dq else 0
    common = dict(
        GROUP=lay.group, HEAD_DIM=lay.head_dim, BLOCK_D=lay.block_d, VARLEN=lay.varlen, CAUSAL=causal,
        DROPOUT=dropout_p > 0, PRECISION=dot_precision(q.dtype), UPCAST=_upcast(q.dtype), PADDED=lay.padded,
        SOFTCAP=softcap is not None,
    )

    def launch_dkdv(cfg):
        bm, bn, warps, stages = cfg
        if atomic_dq:
            dqa.zero_()  # also makes the launch idempotent for the autotuner
        _attn_bwd_dkdv[(triton.cdiv(lay.max_seqlen, bn), lay.n_kv_heads, lay.batch)](
            q, k, v, do, lse, delta, dk, dv, dqa, cu,
            *_strides3(q, lay.varlen), *_strides3(k, lay.varlen), *_strides3(v, lay.varlen),
            *_strides3(do, lay.varlen), *_strides3(dk, lay.varlen), *_strides3(dv, lay.varlen), *dqa_strides,
            *lay.lse_strides,
            lay.seqlen_dense, *_score_args(scale, softcap), scale, seed, thresh, drop_scale,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, ATOMIC_DQ=dq_form, **common,
        )

    def launch_dq(cfg):
        bm, bn, warps, stages = cfg
        _attn_bwd_dq[(triton.cdiv(lay.max_seqlen, bm), lay.n_heads, lay.batch)](
            q, k, v, do, lse, delta, dq, cu,
            *_strides3(q, lay.varlen), *_strides3(k, lay.varlen), *_strides3(v, lay.varlen),
            *_strides3(do, lay.varlen), *_strides3(dq, lay.varlen), *lay.lse_strides,
            lay.seqlen_dense, *_score_args(scale, softcap), scale, seed, thresh, drop_scale,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common,
        )

    dkdv_kind = "dkdv-atomicdq" if atomic_dq else "dkdv"
    capped = softcap is not None
    launch_dkdv(tuning._tuned(dkdv_kind, tuning._tune_key(dkdv_kind, q, lay, dropout_p, causal, capped), dkdv_default,
                              q, launch_dkdv, autotune))
    if atomic_dq:
        return dqa.to(q.dtype), dk, dv
    launch_dq(tuning._tuned("dq", tuning._tune_key("dq", q, lay, dropout_p, causal, capped), dq_default, q, launch_dq,
                            autotune))
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, varlen, max_seqlen, scale, dropout_p, seed, causal, deterministic, padded,
                softcap):
        lay = _Layout(q, k, cu if varlen else None, max_seqlen, padded)
        o, lse = _attn_forward(q, k, v, cu, lay, scale, dropout_p, seed, causal, softcap)
        ctx.save_for_backward(q, k, v, o, lse, cu)
        ctx.lay, ctx.scale, ctx.dropout_p, ctx.seed, ctx.causal = lay, scale, dropout_p, seed, causal
        ctx.softcap = softcap
        ctx.autotune = tuning._AUTOTUNE["on"]  # the backward follows the forward's setting, wherever it runs
        ctx.deterministic = deterministic
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu = ctx.saved_tensors
        dq, dk, dv = _attn_backward(do, q, k, v, o, lse, cu, ctx.lay, ctx.scale, ctx.dropout_p, ctx.seed,
                                    ctx.causal, ctx.autotune, atomic_dq=not ctx.deterministic, softcap=ctx.softcap)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


def _resolve_seed(seed, dropout_p):
    if dropout_p <= 0:
        return 0
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # follows torch.manual_seed
    return int(seed) & 0x7FFFFFFF


def _prepare(q, k, v, cu_seqlens, seqlens=None):
    _check_inputs(q, k, v, cu_seqlens)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if seqlens is not None:
        if seqlens.shape != q.shape[:1]:
            raise ValueError(f"seqlens must be (B,) = {tuple(q.shape[:1])} for a padded batch, "
                             f"got {tuple(seqlens.shape)}")
        cu = seqlens.to(device=q.device, dtype=torch.int32).contiguous()  # the kernels clamp to [0, S]
    elif cu_seqlens is None:
        cu = torch.zeros(1, dtype=torch.int32, device=q.device)  # unused placeholder pointer
    else:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"cu_seqlens must be 1-D (B+1,), got shape {tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    return q, k, v, cu


MAX_GRID_BATCH = 65535  # CUDA's limit on grid axis 2, which the kernels give to the sequence index


def _in_batch_chunks(q, k, v, cu_seqlens, max_seqlen, seqlens, run):
    """``run`` over slices of at most MAX_GRID_BATCH sequences, outputs concatenated: the kernels' grid puts the
    sequence on axis 2, which CUDA caps at 65535 blocks (an encode batch of that many short texts). Each slice
    is a plain call, so autograd splits the backward the same way. Varlen slices rebase their ``cu_seqlens``."""
    n = cu_seqlens.numel() - 1 if cu_seqlens is not None else q.shape[0]
    outs = []
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()  # one host sync, only on this path
        if bounds[0] > 0:  # tokens before the first sequence: zeros, as the reference (the slices start there)
            outs.append(q.new_zeros((bounds[0],) + tuple(q.shape[1:])))
    for a in range(0, n, MAX_GRID_BATCH):
        b = min(a + MAX_GRID_BATCH, n)
        if cu_seqlens is None:
            outs.append(run(q[a:b], k[a:b], v[a:b], None, max_seqlen, None if seqlens is None else seqlens[a:b]))
        else:
            t0, t1 = bounds[a], bounds[b]
            outs.append(run(q[t0:t1], k[t0:t1], v[t0:t1], cu_seqlens[a:b + 1] - t0, max_seqlen, None))
    if cu_seqlens is not None and bounds[n] < q.shape[0]:  # tokens past the last sequence: zeros, as the reference
        outs.append(q.new_zeros((q.shape[0] - bounds[n],) + tuple(q.shape[1:])))
    return torch.cat(outs, dim=0)


def _flash_attention_triton(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed, causal, deterministic=True,
                            seqlens=None, softcap=None):
    n_seqs = cu_seqlens.numel() - 1 if cu_seqlens is not None else (q.shape[0] if q.dim() == 4 else 0)
    if n_seqs > MAX_GRID_BATCH:
        if dropout_p > 0:  # the keep-mask hashes the sequence index: a slice would renumber its sequences
            raise ValueError(f"flash_attention: {n_seqs} sequences with dropout in one call; the kernels take at "
                             f"most {MAX_GRID_BATCH} (CUDA's grid limit): split the batch")
        return _in_batch_chunks(q, k, v, cu_seqlens, max_seqlen, seqlens, lambda q_, k_, v_, cu_, ms_, sl_: (
            _flash_attention_triton(q_, k_, v_, cu_, ms_, scale, 0.0, seed, causal, deterministic, sl_, softcap)))
    q, k, v, cu = _prepare(q, k, v, cu_seqlens, seqlens)
    seed = _resolve_seed(seed, dropout_p)
    if q.numel() == 0:
        return q.new_zeros(q.shape) + 0 * (q.sum() + k.sum() + v.sum())
    return _FlashAttention.apply(q, k, v, cu, cu_seqlens is not None, max_seqlen, scale, float(dropout_p), seed,
                                 bool(causal), bool(deterministic), seqlens is not None, softcap)


def flash_attention_dropout_mask(q, *, cu_seqlens=None, max_seqlen=None, dropout_p, seed):
    """The keep-mask the Triton kernel applies for these shapes, ``dropout_p`` and ``seed``.

    Returns what :func:`flash_attention_reference` takes as ``dropout_mask``: dense (B, Hq, S, S) bool, or
    for varlen a list with one (Hq, L_b, L_b) bool mask per sequence. Runs the same Triton helper as the
    attention kernels (on CPU this needs ``TRITON_INTERPRET=1``). A right-padded batch (``seqlens=``) uses the
    dense mask's top-left (L_b, L_b) corner of each sequence: the mask depends only on positions.
    """
    varlen = cu_seqlens is not None
    _dropout_args(dropout_p)  # validates p
    seed_t = torch.tensor([int(seed) & 0x7FFFFFFF], dtype=torch.int32, device=q.device)
    if varlen:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
        lens_t = cu[1:] - cu[:-1]
        lens = lens_t.tolist()
        batch, S = len(lens), int(max_seqlen if max_seqlen is not None else max(lens, default=0))
    else:
        lens_t = None
        batch, S = q.shape[0], q.shape[1]
    keep = keep_mask(seed_t, (batch, q.shape[-2], S, S), dropout_p, lens_t)
    if varlen:
        return [keep[b, :, :L, :L] for b, L in enumerate(lens)]
    return keep


def flash_attention(
    q, k, v, *, cu_seqlens=None, max_seqlen=None, scale=None, dropout_p=0.0, seed=None,
    causal=False, deterministic=True, seqlens=None, softcap=None, impl=None,
):
    """Non-causal attention. Dense (B, S, Hq, D) or varlen (T, Hq, D) + cu_seqlens; GQA via fewer K/V heads.

    ``max_seqlen`` (varlen) is the longest sequence; it is read from ``cu_seqlens`` (one host sync) when
    omitted and must not be smaller than the truth. ``scale`` defaults to 1/sqrt(D). ``dropout_p`` drops
    attention probabilities; ``seed`` fixes the mask (drawn from torch's default generator when None), and
    :func:`flash_attention_dropout_mask` rebuilds the Triton kernel's mask for the same seed.
    Differentiable in q, k and v on both backends. ``deterministic=False`` (Triton) accumulates dQ with fp32
    atomics inside the dK/dV kernel instead of running a separate dQ kernel: two fewer matmuls per tile in
    the backward, bitwise results that vary run to run.

    Varlen rows before ``cu_seqlens[0]`` or past ``cu_seqlens[-1]`` belong to no sequence; the Triton path leaves
    their output rows unspecified (as flash-attn's varlen does; zeros when the call is split at MAX_GRID_BATCH
    sequences), the reference writes zeros; the output has q's rows on both. Their q / k / v gradients are zero
    on both paths.

    ``seqlens`` (B,): a right-padded dense batch whose sequence b is its first seqlens[b] positions. The
    kernels skip the padding and write zeros to its output rows (and to the gradients of padded q/k/v rows),
    with no unpad / repad copies and no host sync.

    ``softcap`` (Gemma2's ``attn_logit_softcapping``): the scores are softcap * tanh(scale * q.k / softcap)
    before the softmax, on both backends.
    """
    if seqlens is not None and cu_seqlens is not None:
        raise ValueError("pass either cu_seqlens (packed varlen) or seqlens (right-padded dense), not both")
    # auto: fp64 (which the kernels do not take) runs the reference, as for the other ops
    # and a head dim past the kernels' 256 runs it too, where an explicit "triton" is refused in one line
    backend = resolve_impl("attention", impl, q, auto_dtypes=KERNEL_DTYPES, fits=q.shape[-1] <= 256)
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not (scale > 0.0 and math.isfinite(scale)):
        raise ValueError(f"flash_attention: scale must be a finite number > 0, got {scale}")
    if softcap is not None:
        softcap = float(softcap)
        if not (softcap > 0.0 and math.isfinite(softcap)):
            raise ValueError(f"flash_attention: softcap must be a finite number > 0 or None, got {softcap}")
    if backend == "triton":
        return _flash_attention_triton(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed, causal,
                                       deterministic, seqlens, softcap)
    return flash_attention_reference(
        q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale, dropout_p=dropout_p,
        seed=seed, causal=causal, seqlens=seqlens, softcap=softcap)
