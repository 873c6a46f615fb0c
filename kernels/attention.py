"""Non-causal flash attention: dense (B, S, H, D) or packed varlen (T, H, D) with cu_seqlens.

The Triton path is a FlashAttention-2 style kernel set, forward and backward, behind
:func:`flash_attention`:

* ``_attn_fwd``       one program per (query block, query head, sequence): online softmax over all key
                      blocks, writes O and the row log-sum-exp (base 2, scale folded in) for the backward.
* ``_attn_bwd_pre``   delta_i = dO_i . O_i per query row.
* ``_attn_bwd_dkdv``  one program per (key block, KV head, sequence): loops over the query heads of its
                      GQA group and every query block, so dK/dV need no atomics (deterministic).
* ``_attn_bwd_dq``    one program per (query block, query head, sequence): loops over key blocks.
* ``_dropout_mask_kernel`` writes the keep-mask the other kernels use, so tests can replay it.

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
import functools
import json
import math
import os
import tempfile
import warnings

import torch
import triton
import triton.language as tl

from ._backend import interpreter_enabled, resolve_impl

_LOG2E = 1.4426950408889634
_DROPOUT_BITS = 24


# ----------------------------------------------------------------------------------------------
# Torch reference
# ----------------------------------------------------------------------------------------------

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
    dropout_mask=None, causal=False, window=None, softcap=None, seqlens=None,
):
    """Pure-torch attention with the same contract as :func:`flash_attention`.

    Dense: q (B, S, Hq, D), k/v (B, S, Hkv, D). Varlen: q (T, Hq, D), k/v (T, Hkv, D), cu_seqlens (B+1,).
    ``dropout_mask``: optional keep-mask (bool) -- dense (B, Hq, S, S), or for varlen a list with one
    (Hq, L_b, L_b) mask per sequence -- so tests can replay the kernel's own mask exactly
    (:func:`flash_attention_dropout_mask` returns it in this format).
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
    return torch.cat(outs, 0) if outs else q.new_zeros(q.shape)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _keep(seed, q_idx, k_idx, head, batch, drop_thresh):
    """Dropout keep-mask for query positions q_idx and key positions k_idx (broadcast to one tile shape)."""
    # Counter-based RNG: Philox-4x32 keyed by the seed, counter = (key pos, query pos, head, sequence), so
    # the mask is a pure function of the element's position -- the backward regenerates it, any tiling
    # agrees, and no mask is stored. 7 rounds (passes BigCrush per Salmon et al. 2011); keep the top 24 bits.
    zero = (q_idx + k_idx) * 0
    r, _, _, _ = tl.philox(seed, k_idx + zero, q_idx + zero, zero + head, zero + batch, 7)
    return (r >> (32 - 24)).to(tl.int32) >= drop_thresh


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
def _fwd_inner(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_d, lo, hi, seqlen, qk_scale,
    seed, head, batch, drop_thresh,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, PAD_D: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
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
        if MASK:
            valid = cols[None, :] < seqlen
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None])
            qk = tl.where(valid, qk, float("-inf"))
        # The scale goes onto the row max (M values) rather than onto every score: max(c * s) = c * max(s) for
        # c > 0 (flash_attention rejects any other scale), and exp2(qk * c - m) is then one FMA per score.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # Dropout acts on the normalised probabilities: l_i sums the undropped p, the kept p feed acc, and
        # the 1/(1-p) rescale is applied once at the end with 1/l_i.
        if DROPOUT:
            p = tl.where(_keep(seed, offs_m[:, None], cols[None, :], head, batch, drop_thresh), p, 0.0)
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
    seqlen_dense, qk_scale, seed, drop_thresh, drop_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, PADDED: tl.constexpr,
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
            tl.minimum(seqlen, m0 + BLOCK_M), seqlen, qk_scale, seed, head, batch, drop_thresh,
            HEAD_DIM, BLOCK_N, True, PAD_D, CAUSAL, DROPOUT, PRECISION, UPCAST)
    else:
        n_full = (seqlen // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_d, 0, n_full, seqlen,
            qk_scale, seed, head, batch, drop_thresh,
            HEAD_DIM, BLOCK_N, False, PAD_D, CAUSAL, DROPOUT, PRECISION, UPCAST)
        if n_full < seqlen:
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_d, n_full, seqlen,
                seqlen, qk_scale, seed, head, batch, drop_thresh,
                HEAD_DIM, BLOCK_N, True, PAD_D, CAUSAL, DROPOUT, PRECISION, UPCAST)

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
    lo, hi, seqlen, qk_scale, sm_scale, seed, head, batch, drop_thresh, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr, PAD_D: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
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
            keepT = _keep(seed, rows[None, :], offs_n[:, None], head, batch, drop_thresh)
            dv += _dot(tl.where(keepT, pT * drop_scale, 0.0).to(do.dtype), do, PRECISION, UPCAST)
            dpT = tl.where(keepT, dpT * drop_scale, 0.0)
        else:
            dv += _dot(pT.to(do.dtype), do, PRECISION, UPCAST)
        dsT = pT * (dpT - delta[None, :])
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
    seqlen_dense, qk_scale, sm_scale, seed, drop_thresh, drop_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, ATOMIC_DQ: tl.constexpr, PADDED: tl.constexpr,
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
                offs_n, offs_d, (n0 // BLOCK_M) * BLOCK_M, seqlen, seqlen, qk_scale, sm_scale, seed, head, batch,
                drop_thresh, drop_scale, HEAD_DIM, BLOCK_M, True, PAD_D, CAUSAL, DROPOUT, PRECISION, UPCAST,
                ATOMIC_DQ)
        else:
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, dqa_base, stride_qs, stride_dos, stride_dqas,
                offs_n, offs_d, 0, m_full, seqlen, qk_scale, sm_scale, seed, head, batch, drop_thresh, drop_scale,
                HEAD_DIM, BLOCK_M, False, PAD_D, CAUSAL, DROPOUT, PRECISION, UPCAST, ATOMIC_DQ)
            if m_full < seqlen:
                dk, dv = _bwd_dkdv_inner(
                    dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, dqa_base, stride_qs, stride_dos,
                    stride_dqas, offs_n, offs_d, m_full, seqlen, seqlen, qk_scale, sm_scale, seed, head, batch,
                    drop_thresh, drop_scale, HEAD_DIM, BLOCK_M, True, PAD_D, CAUSAL, DROPOUT, PRECISION, UPCAST,
                    ATOMIC_DQ)

    # key rows past the end loaded K = V = 0 but still gathered P = exp2(-lse) terms: never stored as such
    _store_rows(dk_base + offs_n[:, None] * stride_dks + offs_d[None, :], (dk * sm_scale).to(dk_ptr.dtype.element_ty),
                offs_n, seqlen, seqlen_dense, offs_d, HEAD_DIM, PADDED)
    _store_rows(dv_base + offs_n[:, None] * stride_dvs + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), offs_n,
                seqlen, seqlen_dense, offs_d, HEAD_DIM, PADDED)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_d,
    lo, hi, seqlen, qk_scale, seed, head, batch, drop_thresh, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, PAD_D: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # dQ = scale * dS K with dS = P * (dP - delta) as in _bwd_dkdv_inner; padded key columns are masked to
    # P = 0 (their K rows load as 0, which alone would give P = exp2(-lse) != 0).
    offs_nb = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_nb
        kT = _load(k_ptrs + start_n * stride_ks, cols[None, :], seqlen, offs_d[:, None], HEAD_DIM, MASK, PAD_D)
        vT = _load(v_ptrs + start_n * stride_vs, cols[None, :], seqlen, offs_d[:, None], HEAD_DIM, MASK, PAD_D)  # (D, N)
        qk = _dot(q, kT, PRECISION, UPCAST)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASK:
            valid = cols[None, :] < seqlen
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None])
            p = tl.where(valid, p, 0.0)
        dp = _dot(do, vT, PRECISION, UPCAST)
        if DROPOUT:
            keep = _keep(seed, offs_m[:, None], cols[None, :], head, batch, drop_thresh)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
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
    seqlen_dense, qk_scale, sm_scale, seed, drop_thresh, drop_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, PADDED: tl.constexpr,
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
            0, tl.minimum(seqlen, m0 + BLOCK_M), seqlen, qk_scale, seed, head, batch, drop_thresh, drop_scale,
            HEAD_DIM, BLOCK_N, True, PAD_D, CAUSAL, DROPOUT, PRECISION, UPCAST)
    else:
        n_full = (seqlen // BLOCK_N) * BLOCK_N
        dq = _bwd_dq_inner(
            dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_d,
            0, n_full, seqlen, qk_scale, seed, head, batch, drop_thresh, drop_scale,
            HEAD_DIM, BLOCK_N, False, PAD_D, CAUSAL, DROPOUT, PRECISION, UPCAST)
        if n_full < seqlen:
            dq = _bwd_dq_inner(
                dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_ks, stride_vs, offs_m, offs_d,
                n_full, seqlen, seqlen, qk_scale, seed, head, batch, drop_thresh, drop_scale,
                HEAD_DIM, BLOCK_N, True, PAD_D, CAUSAL, DROPOUT, PRECISION, UPCAST)
    _store_rows(dq_base + offs_m[:, None] * stride_dqs + offs_d[None, :], (dq * sm_scale).to(dq_ptr.dtype.element_ty),
                offs_m, seqlen, seqlen_dense, offs_d, HEAD_DIM, PADDED)


@triton.jit
def _dropout_mask_kernel(
    out_ptr, cu_ptr, stride_ob, stride_oh, stride_om, seqlen_dense, n_blocks_n, seed, drop_thresh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr, PADDED: tl.constexpr,
):
    # program 0-axis walks the (m, n) blocks of the longest sequence; blocks past this one's end store nothing.
    pid = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    _, seqlen = _seq_bounds(cu_ptr, batch, seqlen_dense, VARLEN, PADDED)
    offs_m = (pid // n_blocks_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % n_blocks_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(seed, offs_m[:, None], offs_n[None, :], head, batch, drop_thresh)
    mask = (offs_m[:, None] < seqlen) & (offs_n[None, :] < seqlen)
    ptrs = out_ptr + batch.to(tl.int64) * stride_ob + head * stride_oh + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

_PRE_BLOCK_M = 64


def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def fwd_config(block_d, dtype, dropout=False, arch=90, interpret=False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward kernel.

    Every choice compiles without register spills and fits shared memory on its arch, with the newest Triton
    and with Triton 3.6 (what torch 2.11 pins; `.ci/run` checks both; tests/test_attention.py::
    test_kernels_compile_without_spills); ``python -m benchmarks.bench_attention
    --sweep`` times the sm_90 candidates. sm_80 (mma.sync, 163 KB shared) gets narrower tiles at D=128.
    """
    if interpret:
        return 32, 32, 4, 1
    if dtype == torch.float32:  # TF32 operands take twice the registers and shared memory of bf16
        return (64, 32, 4, 2) if arch >= 90 else (32, 32, 4, 2)
    if block_d <= 64:
        return 128, 64, 8, 3
    if block_d <= 128:
        return (128, 64, 8, 3) if arch >= 90 else (128, 32, 8, 3)
    return 64, 32, 8, 2


def atomic_dq_supported(block_d, dtype, interpret=False):
    """deterministic=False takes the atomic-dQ path only where its dK/dV kernel compiles without spills: fp16 /
    bf16 with head dims <= 128 (and anything in the CPU interpreter). Elsewhere it quietly stays deterministic."""
    return interpret or (dtype in (torch.float16, torch.bfloat16) and block_d <= 128)


def atomic_dq_form(arch, dropout):
    """ATOMIC_DQ for the dK/dV kernel in atomic-dQ mode: 2 forms the per-step dQ tile transposed, (D, M), so on
    sm_90 its MMA has >= 64 rows and runs as wgmma (as (M, D) with the 16-32 row query tile it fell back to
    mma.sync); 1 keeps (M, D) where the transposed form buys nothing (sm_80: mma.sync either way) or spills
    (under dropout, the Philox registers leave no room for it at D = 96/128)."""
    return 2 if arch >= 90 and not dropout else 1


def bwd_config(block_d, dtype, dropout=False, arch=90, interpret=False, atomic_dq=False):
    """((BLOCK_M, BLOCK_N, num_warps, num_stages) for dK/dV, the same for dQ).

    dK/dV programs hold two fp32 (BLOCK_N, D) accumulators plus K and V, so BLOCK_N shrinks with D. With
    ``atomic_dq`` the dK/dV kernel also forms a (BLOCK_M, D) dQ tile per step, so its query tile is smaller
    (the dQ config is then unused).
    """
    if interpret:
        return (16, 32, 4, 1), (32, 16, 4, 1)
    if atomic_dq:
        if arch >= 90:
            dkdv = (32, 128, 8, 3) if block_d <= 64 else (16, 64 if dropout else 128, 8, 3)
        else:
            dkdv = (16, 128, 8, 3) if block_d <= 64 else (16, 64, 8, 3)
        return dkdv, None
    if dtype == torch.float32:
        return (16, 32, 8, 2), (32, 32, 4, 2)
    if arch >= 90:
        if block_d <= 64:
            return (32, 128, 8, 3), (128, 32, 8, 3)
        if block_d <= 128:  # the Philox mask needs registers: a narrower query tile under dropout
            return ((16, 128, 8, 3) if dropout else (32, 64, 8, 2)), (128, 32, 8, 3)
        return (16 if dropout else 32, 32, 8, 2), (32, 32, 4, 2)
    if block_d <= 64:
        return (16, 64, 8, 3), (128, 32, 8, 3)
    if block_d <= 128:
        return (32, 32, 8, 2), (64, 32, 8, 3)
    return (16, 32, 8, 2), (32, 32, 4, 2)


# Opt-in autotuning (``set_autotune(True)`` or LLM2VEC_ATTN_AUTOTUNE=1). The fixed configs above were chosen
# from compile reports, not timings; on a new GPU the first call per bucket (kernel, arch, dtype, head-dim
# block, dropout, causal, varlen, GQA group, sequence-length bucket) times each candidate on the real inputs
# and keeps the fastest for the process. The lists are pruned offline: every entry compiles for its arch
# without register spills under both Triton versions CI checks (tests/test_attention.py::
# test_autotune_candidates_compile_without_spills), with dropout too unless marked nodrop. bf16/fp16 with head
# dims <= 128 only; everything else keeps its fixed config. Tuning synchronises the device, so do not enable it
# under CUDA-graph capture. Choices persist per GPU name in a JSON file (tune_cache_path()), so later runs skip
# the timing.
_ND = "nodrop"
_TUNE_CANDIDATES = {
    # (hopper, block_d) -> {kernel: [(BLOCK_M, BLOCK_N, num_warps, num_stages[, "nodrop"]), ...]}
    (True, 64): {
        "dkdv-atomicdq": [(32, 128, 8, 3), (16, 128, 8, 3), (16, 64, 8, 3), (32, 64, 8, 2)],
        "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3, _ND)],
        "dkdv": [(32, 128, 8, 3), (32, 64, 4, 3)],
        "dq": [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
    },
    (True, 128): {
        "dkdv-atomicdq": [(16, 128, 8, 3, _ND), (16, 128, 8, 2, _ND), (16, 64, 8, 3), (16, 64, 8, 2, _ND)],
        "fwd": [(128, 64, 8, 3), (128, 128, 8, 2, _ND), (128, 128, 8, 3, _ND), (64, 64, 4, 3, _ND), (128, 32, 8, 3)],
        "dkdv": [(32, 64, 8, 2, _ND), (32, 128, 8, 2, _ND), (16, 128, 8, 3), (16, 64, 8, 3),
                 (16, 64, 4, 3, _ND)],
        "dq": [(128, 32, 8, 3), (64, 32, 4, 3), (128, 64, 8, 3), (64, 64, 8, 3, _ND), (128, 64, 8, 2)],
    },
    (False, 64): {
        "dkdv-atomicdq": [(16, 128, 8, 3), (16, 64, 8, 3), (32, 32, 8, 3)],
        "fwd": [(128, 64, 8, 3), (128, 128, 8, 3, _ND), (64, 64, 4, 3), (128, 64, 4, 3, _ND)],
        "dkdv": [(16, 64, 8, 3)],
        "dq": [(128, 32, 8, 3), (64, 32, 4, 3)],
    },
    (False, 128): {
        "dkdv-atomicdq": [(16, 64, 8, 3), (32, 32, 8, 3)],
        "fwd": [(128, 32, 8, 3)],
        "dkdv": [(32, 32, 8, 2), (16, 128, 8, 3, _ND), (16, 64, 4, 3, _ND), (32, 64, 8, 3, _ND)],
        "dq": [(64, 32, 8, 3), (64, 32, 4, 3), (64, 64, 8, 3)],
    },
}
_AUTOTUNE = {"on": os.environ.get("LLM2VEC_ATTN_AUTOTUNE", "0") not in ("", "0")}
_TUNED = {}  # bucket key -> (chosen config, {config: ms})
_DISK = {"loaded": None}  # path -> {bucket string: config} once read


def tune_cache_path():
    """Where tuned choices persist across runs: LLM2VEC_ATTN_TUNE_CACHE, else attention_tuned.json under
    LLM2VEC_ENGINE_CACHE (default ~/.cache/llm2vec-engine). Set LLM2VEC_ATTN_TUNE_CACHE="" to keep them in memory."""
    path = os.environ.get("LLM2VEC_ATTN_TUNE_CACHE")
    if path is not None:
        return path or None
    root = os.environ.get("LLM2VEC_ENGINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llm2vec-engine")
    return os.path.join(root, "attention_tuned.json")


def _bucket_id(key, device_name):
    return "|".join([device_name] + [str(x) for x in key])


def _read_tune_cache(path):
    try:
        with open(path) as f:
            data = json.load(f)
        return {k: tuple(v) for k, v in data.items() if isinstance(v, list) and len(v) == 4}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # unreadable or corrupt: tune again, and say so once
        warnings.warn(f"ignoring the attention tune cache {path}: {exc}")
        return {}


def _write_tune_cache(path, bucket, cfg):
    # Merge with what other processes (ranks) wrote meanwhile, then replace the file atomically.
    data = {k: list(v) for k, v in _read_tune_cache(path).items()}
    data[bucket] = list(cfg)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"could not write the attention tune cache {path}: {exc}")


def set_autotune(enabled: bool) -> None:
    """Turn opt-in autotuning on or off for this process (already tuned buckets are kept)."""
    _AUTOTUNE["on"] = bool(enabled)


def tuned_configs():
    """{bucket: {"best": config, "ms": {config: median ms}}} for every bucket tuned so far (for benchmark logs)."""
    return {"/".join(map(str, k)): {"best": list(v[0]), "ms": {"x".join(map(str, c)): round(ms, 4)
                                                               for c, ms in v[1].items()}}
            for k, v in _TUNED.items()}


def tune_candidates(kernel, block_d, dtype, dropout, arch):
    """Candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) configs for ``kernel`` in "fwd" / "dkdv" / "dq" /
    "dkdv-atomicdq"."""
    if dtype not in (torch.float16, torch.bfloat16) or block_d > 128:
        return []
    table = _TUNE_CANDIDATES[(arch >= 90, 64 if block_d <= 64 else 128)][kernel]
    return [tuple(c[:4]) for c in table if not (dropout and _ND in c[4:])]


def _tuned(kind, make_key, default, q, launch, enabled=None):
    """The config to launch ``kind`` with: ``default`` unless autotuning is on (``enabled``, else the process
    setting) for a CUDA tensor; then the fastest candidate for this bucket, timed once by calling
    ``launch(config)`` (which must be idempotent: it overwrites its outputs). ``make_key()`` builds the bucket
    key, only when tuning, so the untuned hot path never does."""
    if not ((_AUTOTUNE["on"] if enabled is None else enabled) and q.is_cuda):
        return default
    key = make_key()
    if key in _TUNED:
        return _TUNED[key][0]
    path = tune_cache_path()
    bucket = _bucket_id(key, torch.cuda.get_device_name(q.device))
    if path:
        if _DISK["loaded"] is None or _DISK["loaded"][0] != path:
            _DISK["loaded"] = (path, _read_tune_cache(path))
        if bucket in _DISK["loaded"][1]:
            _TUNED[key] = (_DISK["loaded"][1][bucket], {})
            return _TUNED[key][0]
    arch, dtype, block_d, dropout = key[1], key[2], key[3], key[4]
    cands = tune_candidates(kind, block_d, dtype, dropout, arch)
    if default not in cands:
        cands = [default] + cands
    timings = {}
    for cfg in cands:
        try:
            launch(cfg)  # compiles
            times = []
            for _ in range(3):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                launch(cfg)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            timings[cfg] = sorted(times)[1]
        except Exception:  # out of shared memory / registers on this device: not a candidate here
            continue
    best = min(timings, key=timings.get) if timings else default
    _TUNED[key] = (best, timings)
    if path and timings:
        _write_tune_cache(path, bucket, best)
        _DISK["loaded"][1][bucket] = best
    return best


def _tune_key(kind, q, lay, dropout_p, causal):
    """A callable that builds ``kind``'s bucket key; _tuned calls it only when autotuning."""
    def key():
        bucket = min(max(triton.next_power_of_2(max(lay.max_seqlen, 1)), 64), 16384)
        return (kind, _arch(q), q.dtype, lay.block_d, dropout_p > 0, bool(causal), lay.varlen, lay.group, bucket)
    return key


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def _check_inputs(q, k, v, cu_seqlens):
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
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
        self.block_d = _block_d(self.head_dim)
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
    return int(round(dropout_p * (1 << _DROPOUT_BITS))), 1.0 / (1.0 - dropout_p)


@functools.lru_cache(maxsize=None)
def _device_arch(index):
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def _arch(t):
    return _device_arch(t.device.index if t.device.index is not None else torch.cuda.current_device()) \
        if t.is_cuda else 90


def _upcast(dtype):
    return interpreter_enabled() and dtype == torch.bfloat16


def _precision(dtype):
    # fp32 dots run on TF32 tensor cores (~1e-3 relative error): the IEEE fp32 FMA path spills registers
    # at any useful tile size. impl="torch" is the exact fp32 path.
    return "tf32"


def _attn_forward(q, k, v, cu, lay, scale, dropout_p, seed, causal):
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(lay.lse_shape, device=q.device, dtype=torch.float32)
    thresh, drop_scale = _dropout_args(dropout_p)

    def launch(cfg):
        BM, BN, warps, stages = cfg
        _attn_fwd[(triton.cdiv(lay.max_seqlen, BM), lay.n_heads, lay.batch)](
            q, k, v, o, lse, cu,
            *_strides3(q, lay.varlen), *_strides3(k, lay.varlen), *_strides3(v, lay.varlen),
            *_strides3(o, lay.varlen), *lay.lse_strides,
            lay.seqlen_dense, scale * _LOG2E, seed, thresh, drop_scale,
            GROUP=lay.group, HEAD_DIM=lay.head_dim, BLOCK_D=lay.block_d, BLOCK_M=BM, BLOCK_N=BN,
            VARLEN=lay.varlen, CAUSAL=causal, DROPOUT=dropout_p > 0,
            PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype), PADDED=lay.padded,
            num_warps=warps, num_stages=stages,
        )

    default = fwd_config(lay.block_d, q.dtype, dropout_p > 0, _arch(q), interpreter_enabled())
    launch(_tuned("fwd", _tune_key("fwd", q, lay, dropout_p, causal), default, q, launch))
    return o, lse


def _attn_backward(do, q, k, v, o, lse, cu, lay, scale, dropout_p, seed, causal, autotune=None, atomic_dq=False):
    do = _last_dim_contiguous(do)
    thresh, drop_scale = _dropout_args(dropout_p)
    interp = interpreter_enabled()
    delta = torch.empty_like(lse)
    pre_bm = _PRE_BLOCK_M if not interp else 32
    _attn_bwd_pre[(triton.cdiv(lay.max_seqlen, pre_bm), lay.n_heads, lay.batch)](
        o, do, delta, cu, *_strides3(o, lay.varlen), *_strides3(do, lay.varlen), *lay.lse_strides,
        lay.seqlen_dense, HEAD_DIM=lay.head_dim, BLOCK_D=lay.block_d, BLOCK_M=pre_bm, VARLEN=lay.varlen,
        PADDED=lay.padded,
    )
    atomic_dq = atomic_dq and atomic_dq_supported(lay.block_d, q.dtype, interp)
    if atomic_dq:  # fp32 accumulator in q's layout; the dQ kernel does not run
        dqa = torch.empty(q.shape, device=q.device, dtype=torch.float32)
        dqa_strides = _strides3(dqa, lay.varlen)
    else:
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dqa, dqa_strides = lse, (0, 0, 0)  # placeholder pointer, never touched
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    dkdv_default, dq_default = bwd_config(lay.block_d, q.dtype, dropout_p > 0, _arch(q), interp, atomic_dq)
    dq_form = atomic_dq_form(_arch(q), dropout_p > 0) if atomic_dq else 0
    common = dict(
        GROUP=lay.group, HEAD_DIM=lay.head_dim, BLOCK_D=lay.block_d, VARLEN=lay.varlen, CAUSAL=causal,
        DROPOUT=dropout_p > 0, PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype), PADDED=lay.padded,
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
            lay.seqlen_dense, scale * _LOG2E, scale, seed, thresh, drop_scale,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, ATOMIC_DQ=dq_form, **common,
        )

    def launch_dq(cfg):
        bm, bn, warps, stages = cfg
        _attn_bwd_dq[(triton.cdiv(lay.max_seqlen, bm), lay.n_heads, lay.batch)](
            q, k, v, do, lse, delta, dq, cu,
            *_strides3(q, lay.varlen), *_strides3(k, lay.varlen), *_strides3(v, lay.varlen),
            *_strides3(do, lay.varlen), *_strides3(dq, lay.varlen), *lay.lse_strides,
            lay.seqlen_dense, scale * _LOG2E, scale, seed, thresh, drop_scale,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common,
        )

    dkdv_kind = "dkdv-atomicdq" if atomic_dq else "dkdv"
    launch_dkdv(_tuned(dkdv_kind, _tune_key(dkdv_kind, q, lay, dropout_p, causal), dkdv_default, q, launch_dkdv,
                       autotune))
    if atomic_dq:
        return dqa.to(q.dtype), dk, dv
    launch_dq(_tuned("dq", _tune_key("dq", q, lay, dropout_p, causal), dq_default, q, launch_dq, autotune))
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, varlen, max_seqlen, scale, dropout_p, seed, causal, deterministic, padded):
        lay = _Layout(q, k, cu if varlen else None, max_seqlen, padded)
        o, lse = _attn_forward(q, k, v, cu, lay, scale, dropout_p, seed, causal)
        ctx.save_for_backward(q, k, v, o, lse, cu)
        ctx.lay, ctx.scale, ctx.dropout_p, ctx.seed, ctx.causal = lay, scale, dropout_p, seed, causal
        ctx.autotune = _AUTOTUNE["on"]  # the backward follows the forward's setting, wherever it runs
        ctx.deterministic = deterministic
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu = ctx.saved_tensors
        dq, dk, dv = _attn_backward(do, q, k, v, o, lse, cu, ctx.lay, ctx.scale, ctx.dropout_p, ctx.seed,
                                    ctx.causal, ctx.autotune, atomic_dq=not ctx.deterministic)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


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


def _flash_attention_triton(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed, causal, deterministic=True,
                            seqlens=None):
    q, k, v, cu = _prepare(q, k, v, cu_seqlens, seqlens)
    seed = _resolve_seed(seed, dropout_p)
    if q.numel() == 0:
        return q.new_zeros(q.shape) + 0 * (q.sum() + k.sum() + v.sum())
    return _FlashAttention.apply(q, k, v, cu, cu_seqlens is not None, max_seqlen, scale, float(dropout_p), seed,
                                 bool(causal), bool(deterministic), seqlens is not None)


def flash_attention_dropout_mask(q, *, cu_seqlens=None, max_seqlen=None, dropout_p, seed):
    """The keep-mask the Triton kernel applies for these shapes, ``dropout_p`` and ``seed``.

    Returns what :func:`flash_attention_reference` takes as ``dropout_mask``: dense (B, Hq, S, S) bool, or
    for varlen a list with one (Hq, L_b, L_b) bool mask per sequence. Runs the same Triton helper as the
    attention kernels (on CPU this needs ``TRITON_INTERPRET=1``). A right-padded batch (``seqlens=``) uses the
    dense mask's top-left (L_b, L_b) corner of each sequence: the mask depends only on positions.
    """
    varlen = cu_seqlens is not None
    n_heads = q.shape[-2]
    thresh, _ = _dropout_args(dropout_p)
    seed = int(seed) & 0x7FFFFFFF
    if varlen:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
        lens = (cu[1:] - cu[:-1]).tolist()
        batch, S = len(lens), int(max_seqlen if max_seqlen is not None else max(lens, default=0))
        seqlen_dense = 0
    else:
        cu = torch.zeros(1, dtype=torch.int32, device=q.device)
        batch, S = q.shape[0], q.shape[1]
        seqlen_dense = S
    out = torch.zeros((batch, n_heads, S, S), dtype=torch.int8, device=q.device)
    if out.numel():
        BM, BN = 32, 32
        grid = (triton.cdiv(S, BM) * triton.cdiv(S, BN), n_heads, batch)
        _dropout_mask_kernel[grid](out, cu, out.stride(0), out.stride(1), out.stride(2), seqlen_dense,
                                   triton.cdiv(S, BN), seed, thresh, BLOCK_M=BM, BLOCK_N=BN, VARLEN=varlen,
                                   PADDED=False)
    keep = out.bool()
    if varlen:
        return [keep[b, :, :L, :L] for b, L in enumerate(lens)]
    return keep


def flash_attention(
    q, k, v, *, cu_seqlens=None, max_seqlen=None, scale=None, dropout_p=0.0, seed=None,
    causal=False, deterministic=True, seqlens=None, impl=None,
):
    """Non-causal attention. Dense (B, S, Hq, D) or varlen (T, Hq, D) + cu_seqlens; GQA via fewer K/V heads.

    ``max_seqlen`` (varlen) is the longest sequence; it is read from ``cu_seqlens`` (one host sync) when
    omitted and must not be smaller than the truth. ``scale`` defaults to 1/sqrt(D). ``dropout_p`` drops
    attention probabilities; ``seed`` fixes the mask (drawn from torch's default generator when None), and
    :func:`flash_attention_dropout_mask` rebuilds the Triton kernel's mask for the same seed.
    Differentiable in q, k and v on both backends. ``deterministic=False`` (Triton) accumulates dQ with fp32
    atomics inside the dK/dV kernel instead of running a separate dQ kernel: two fewer matmuls per tile in
    the backward, bitwise results that vary run to run.

    ``seqlens`` (B,): a right-padded dense batch whose sequence b is its first seqlens[b] positions. The
    kernels skip the padding and write zeros to its output rows (and to the gradients of padded q/k/v rows),
    with no unpad / repad copies and no host sync.
    """
    if seqlens is not None and cu_seqlens is not None:
        raise ValueError("pass either cu_seqlens (packed varlen) or seqlens (right-padded dense), not both")
    backend = resolve_impl("attention", impl, q)
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not (scale > 0.0 and math.isfinite(scale)):
        raise ValueError(f"flash_attention: scale must be a finite number > 0, got {scale}")
    if backend == "triton":
        return _flash_attention_triton(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed, causal,
                                       deterministic, seqlens)
    return flash_attention_reference(
        q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale, dropout_p=dropout_p,
        seed=seed, causal=causal, seqlens=seqlens)


# ----------------------------------------------------------------------------------------------
# Accuracy checks (shared by tests/test_attention.py and the GPU run)
# ----------------------------------------------------------------------------------------------

def _eager_attention(q, k, v, *, cu_seqlens=None, scale=None, dropout_p=0.0, dropout_mask=None, causal=False,
                     seqlens=None):
    """Attention as eager torch code runs it in the input dtype (HF "eager"): matmuls in the dtype, softmax in
    fp32 and cast back. The yardstick for "torch's own error in this dtype"."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale

    def one(q, k, v, keep):  # (S, Hq, D), (S, Hkv, D) -> (S, Hq, D)
        g = q.shape[1] // k.shape[1]
        qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(g, 0), v.transpose(0, 1).repeat_interleave(g, 0)
        s = torch.matmul(qh, kh.transpose(-1, -2)) * scale
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
                  deterministic=True, seqlens=None):
    """Forward and all three gradients of :func:`flash_attention` against the fp64 reference.

    Returns {tensor name: (kernel error, eager-torch error)}, each the max abs difference from the fp64 result
    divided by max(1, max abs of that result). Dropout uses the kernel's own mask for all three computations.
    """
    g = torch.Generator(device="cpu").manual_seed(1234)
    do = torch.randn(q.shape, generator=g).to(q.device, q.dtype)
    mask = None
    if dropout_p > 0:
        mask = flash_attention_dropout_mask(q, cu_seqlens=cu_seqlens, dropout_p=dropout_p, seed=seed)

    def run(fn, tensors, **kw):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*leaves, cu_seqlens=cu_seqlens, scale=scale, causal=causal, seqlens=seqlens, **kw)
        return [out.detach()] + list(torch.autograd.grad(out, leaves, do.to(out.dtype)))

    got = run(flash_attention, (q, k, v), dropout_p=dropout_p, seed=seed, impl=impl, deterministic=deterministic)
    want = run(flash_attention_reference, [t.double() for t in (q, k, v)], dropout_p=dropout_p, dropout_mask=mask)
    eager = run(_eager_attention, (q, k, v), dropout_p=dropout_p, dropout_mask=mask)
    res = {}
    for name, a, ref, e in zip(("out", "dq", "dk", "dv"), got, want, eager):
        if a.shape != ref.shape or a.dtype != q.dtype:
            raise AssertionError(f"{name}: got {a.dtype} {tuple(a.shape)}, want {q.dtype} {tuple(ref.shape)}")
        denom = ref.abs().max().clamp_min(1.0)  # absolute error where the exact result is ~0 (e.g. L=1 grads)
        err = ((a.double() - ref).abs().max() / denom).item() if torch.isfinite(a).all() else float("inf")
        res[name] = (err, ((e.double() - ref).abs().max() / denom).item())
    return res


# Error allowed: ERR_FACTOR x eager torch's error in the same dtype, plus this floor (relative to max |ref|).
ERR_FACTOR = 2.0
ERR_FLOOR = {torch.float32: 2e-6, torch.float16: 5e-4, torch.bfloat16: 5e-3}


def gpu_check(budget_s=30.0):
    """bf16/fp16 forward+backward vs the fp64 reference on model-sized shapes (CUDA). One row per case and
    tensor: {"op", "case", "tensor", "max_err", "torch_bf16_err" (eager torch in the same dtype), "ok"}.

    Cases run most important first; each new (dtype, head dim, layout, dropout) combination costs a Triton
    compile of four kernels (a few seconds), so once ``budget_s`` has elapsed the remaining cases are skipped
    (named on stdout, no rows). ``budget_s=None`` runs them all.
    """
    import time

    if not torch.cuda.is_available():
        raise RuntimeError("gpu_check needs a CUDA device")
    t0 = time.time()
    dev = "cuda"
    g = torch.Generator(device="cpu").manual_seed(0)
    lens = torch.randint(32, 513, (12,), generator=g).tolist() + [1, 129]
    bf16, fp16 = torch.bfloat16, torch.float16
    cases = [  # name, dtype, prefix shape, Hq, Hkv, D, kwargs
        ("mistral-dense-512", bf16, (2, 512), 32, 8, 128, {}),
        ("mistral-dense-2048", bf16, (1, 2048), 32, 8, 128, {}),  # same kernels as above: no compile
        ("mistral-dense-2048-atomicdq", bf16, (1, 2048), 32, 8, 128, {"deterministic": False}),
        ("mistral-padded-mix", bf16, (14, max(lens)), 32, 8, 128, {"seqlens": lens}),
        ("mistral-varlen-mix", bf16, (sum(lens),), 32, 8, 128, {"cu_seqlens": lens}),
        ("mistral-varlen-mix-atomicdq", bf16, (sum(lens),), 32, 8, 128, {"cu_seqlens": lens, "deterministic": False}),
        ("mistral-varlen-dropout0.1", bf16, (sum(lens),), 32, 8, 128, {"cu_seqlens": lens, "dropout_p": 0.1,
                                                                       "seed": 7}),
        ("smollm2-dense-257", bf16, (2, 257), 9, 3, 64, {}),
        ("mistral-dense-512", fp16, (2, 512), 32, 8, 128, {}),
        ("d96-dense-200", bf16, (2, 200), 8, 2, 96, {}),
        ("gemma-d256-varlen", bf16, (sum(lens[:4]),), 8, 4, 256, {"cu_seqlens": lens[:4]}),
    ]
    rows = []
    for name, dtype, prefix, hq, hkv, d, kw in cases:
        label = f"{name}-{str(dtype)[6:]}"
        if budget_s is not None and time.time() - t0 > budget_s:
            print(f"gpu_check attention: skipped {label} (budget {budget_s:.0f}s spent)", flush=True)
            continue
        kw = dict(kw)
        if "cu_seqlens" in kw:
            kw["cu_seqlens"] = torch.tensor([0] + torch.tensor(kw["cu_seqlens"]).cumsum(0).tolist(),
                                            dtype=torch.int32, device=dev)
        if "seqlens" in kw:
            kw["seqlens"] = torch.tensor(kw["seqlens"], dtype=torch.int32, device=dev)
        q, k, v = (torch.randn(*prefix, h, d, generator=g).to(dev, dtype) for h in (hq, hkv, hkv))
        for tensor, (err, torch_err) in accuracy_case(q, k, v, **kw).items():
            rows.append({"op": "attention", "case": label, "tensor": tensor, "max_err": err,
                         "torch_bf16_err": torch_err, "ok": err <= ERR_FACTOR * torch_err + ERR_FLOOR[dtype]})
        del q, k, v
        torch.cuda.empty_cache()
    return rows
