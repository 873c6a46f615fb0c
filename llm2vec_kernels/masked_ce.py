"""Fused LM head + cross-entropy over labelled rows, without materialising the full logits.

Shapes: hidden (N, H), weight (V, H), labels (N,). Only the M rows with label != ignore_index do any
work: they are gathered once (index_select) and everything below runs on h = hidden[idx] (M, H).

Maths (per labelled row, z = h @ W^T, optionally soft-capped z <- c * tanh(z / c)):

    lse  = log sum_v exp(z_v)                       loss = lse - z_y + z_loss * lse^2
    dloss/dz_v = p_v * (1 + 2 * z_loss * lse) - [v == y],      p = softmax(z)
    soft-cap chain rule: d(c * tanh(x / c))/dx = 1 - tanh^2(x / c)

Forward (``_ce_fwd_kernel``): a GEMM-shaped grid of (row block, vocab group) programs. Each program
streams the vocab blocks of its group; for each it computes one (BLOCK_M x BLOCK_V) logit tile with
tl.dot over H in fp32, then folds it into an online log-sum-exp. The online LSE works in base 2
(s = z * log2(e), so exp becomes the cheaper exp2):  m' = max(m, max_v s_v),
l' = l * 2^(m - m') + sum_v 2^(s_v - m'),  and finally lse = (m + log2 l) * ln 2.
Each program writes only (m, l) for its group plus the target logit when y falls in its range;
``_ce_combine_kernel`` merges the groups of a row the same way and writes lse and the loss.
Extra memory: (M x groups) fp32 partials, a few MB.

Backward. dHidden = dZ @ W contracts over the whole vocab while its output row is H wide, so a
(rows x H) fp32 accumulator (BLOCK_M=128, H=4096: 2 MB) cannot stay on chip; accumulating it
with atomics would cost M * H * V / BLOCK_V fp32 atomics (~13e9 at the Llama-3 shape), and
splitting H instead would recompute the logits H / BLOCK_H times. So the backward walks the vocab
in chunks of VC columns (VC from a fixed scratch budget, default 128 MiB):
  1. ``_ce_bwd_dlogits_kernel`` recomputes each (BLOCK_M x BLOCK_V) logit tile of the chunk with
     tl.dot (fp32), turns it into dZ using the saved lse, and stores dZ for that chunk only,
     in the input dtype (M x VC scratch, reused for every chunk). No logits are ever stored.
  2. ``_ce_bwd_dh_kernel``: dH (+)= dZ_chunk @ W_chunk with an fp32 accumulator that carries over
     chunks in an (M, H) fp32 buffer; the last chunk applies the per-row upstream gradient in fp32
     and scatters rows straight into dHidden (N, H) (unlabelled rows stay zero).
  3. ``_ce_bwd_dw_kernel`` (only when weight.requires_grad): dW_chunk = (r * dZ_chunk)^T @ h. Each
     vocab row of dW belongs to one chunk and one program, so dW is written once, no atomics.
Everything is deterministic (no atomics, fixed reduction orders).

FLOPs: forward 2*M*V*H, backward 4*M*V*H (recompute + dH), plus 2*M*V*H for dW when needed.
The "gather then torch" path does one GEMM fewer but streams M x V fp32 logits through memory
several times; which wins depends on the GPU (see benchmarks/bench_masked_ce.py).

Two strategies for the training step (``cfg["strategy"]``, "auto" picks):

* "recompute" (above): forward streams the vocab with an online LSE, backward recomputes the logits.
  Three GEMMs (four with dW), no logits stored beyond one tile, any reduction, dW when needed.
* "eager" (frozen weight, reduction "mean" / "sum", the LoRA case): the gradient is computed in the
  forward, two GEMMs in all. Labelled rows go in chunks of RC rows (RC * V from the same 128 MiB
  scratch budget): cuBLAS writes the chunk's logits z (RC, V) in the input dtype, as torch's own
  path does; ``_ce_grad_rows_kernel`` makes two passes over each row -- an online LSE in fp32 (base
  2), then dZ = grad_scale * dloss/dz written over z in place -- and cuBLAS computes
  dH_rows = dZ @ W. grad_scale is 1/M for "mean", so dZ is rounded exactly where torch rounds its
  logits' gradient. Backward only scales the saved dH_rows (M, H) by the upstream scalar and
  scatters them into dHidden. Logits exist for one row chunk at a time, never for all rows. The
  recompute path costs one more M x V x H GEMM; the row chunk costs ~3 passes over RC x V in the
  input dtype, where torch's gather path makes ~10 over M x V with fp32 copies.
  Under torch.no_grad(), or when hidden needs no gradient, "auto" runs the forward-only kernels. In fp16
  "auto" takes "recompute": eager's dZ is rounded before the loss scaler's scale reaches it, and fp16's
  range loses most of it (bf16 keeps fp32's exponent).

Caveats: labels outside [0, V) give a NaN loss for that row (the reference raises instead); the
kernel path needs hidden and weight in the same dtype (fp16, bf16 or fp32) and weight contiguous
along H. ZeRO-3: "recompute" reads the weight only through ctx.saved_tensors in backward, never
cached; "eager" does not need the weight in backward at all.
"""

import torch
import triton
import triton.language as tl

from ._backend import KERNEL_DTYPES, on_device, resolve_impl

# Scratch budget for one backward vocab chunk of dZ (M x VC in the input dtype).
BWD_SCRATCH_BYTES = 128 * 2**20

# Fixed launch configs (no autotune). Keys: kernel -> (block sizes..., num_warps, num_stages).
#   fwd / dlogits: (BLOCK_M, BLOCK_V, BLOCK_K)    dh: (BLOCK_M, BLOCK_N over H, BLOCK_K over vocab)
#   dw: (BLOCK_V, BLOCK_N over H, BLOCK_K over rows)
_GPU_CONFIGS = {
    # bf16 / fp16 on sm_90 / sm_80: wgmma / mma tiles, shared memory well under 163 KB.
    "half": {
        "fwd": dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=4),
        "dlogits": dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=4),
        "dh": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
        "dw": dict(BLOCK_V=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
        "vblocks_per_prog": 8,
        # eager strategy: one program per row, BLOCK_V columns per step (8 per thread: 16-byte loads)
        "grad_rows": dict(BLOCK_V=2048, num_warps=8),
        "strategy": "auto",
    },
    # fp32 uses IEEE dots (no TF32) to match torch's fp32 matmul; smaller tiles.
    "fp32": {
        "fwd": dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=3),
        "dlogits": dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=3),
        "dh": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=4),
        "dw": dict(BLOCK_V=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
        "vblocks_per_prog": 8,
        "grad_rows": dict(BLOCK_V=2048, num_warps=8),
        "strategy": "auto",
    },
}
# CPU interpreter (tests): tiny tiles so small shapes still cover many blocks, groups and tails.
_INTERP_CONFIG = {
    "fwd": dict(BLOCK_M=16, BLOCK_V=32, BLOCK_K=32, num_warps=4, num_stages=1),
    "dlogits": dict(BLOCK_M=16, BLOCK_V=32, BLOCK_K=32, num_warps=4, num_stages=1),
    "dh": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1),
    "dw": dict(BLOCK_V=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1),
    "vblocks_per_prog": 2,
    "grad_rows": dict(BLOCK_V=32, num_warps=4),
    "strategy": "auto",
}
STRATEGIES = ("auto", "recompute", "eager")
_COMBINE = dict(BLOCK_R=32, BLOCK_G=32, num_warps=4)
# Rows of hidden that a group of programs shares should stay resident in L2 (H100: 50 MB).
_L2_HIDDEN_BYTES = 24 * 2**20

_DOT_PREC = {torch.float32: "ieee", torch.float16: "tf32", torch.bfloat16: "tf32"}  # ignored for half


def launch_config(dtype, device):
    """Launch config used for (dtype, device). A dict; copy it and pass ``cfg=`` to override."""
    if device.type != "cuda":
        cfg = _INTERP_CONFIG
    else:
        cfg = _GPU_CONFIGS["fp32" if dtype == torch.float32 else "half"]
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _swizzle(pid, num_a, num_b, group_a):
    # Map a 1-D program id onto (a, b) tiles in groups of `group_a` consecutive a-tiles, so that
    # programs running at the same time share their b-tile (L2 reuse), as in the Triton matmul
    # tutorial. a = row blocks, b = vocab / H blocks.
    per_group = group_a * num_b
    group = pid // per_group
    first_a = group * group_a
    size = tl.minimum(num_a - first_a, group_a)
    a = first_a + (pid % per_group) % size
    b = (pid % per_group) // size
    return a, b


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, H, stride_hm, stride_hk, stride_wv, stride_wk,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    # One (BLOCK_M x BLOCK_V) tile of z = h @ W^T in fp32. rows / cols are int64 and already
    # clamped in range; only the H tail is masked.
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None] * stride_hm + offs_k[None, :] * stride_hk  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + cols[None, :] * stride_wv + offs_k[:, None] * stride_wk  # (BLOCK_K, BLOCK_V) = W^T
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        k_ok = offs_k < H - k * BLOCK_K
        a = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        h_ptrs += BLOCK_K * stride_hk
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): saturates cleanly to +-1 (exp2 -> inf or 0), abs error ~1e-7.
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit(do_not_specialize=["M", "V", "num_vgroups", "vblocks_per_prog", "group_m", "stride_pm",
                               "stride_pg"])
def _ce_fwd_kernel(
    h_ptr, w_ptr, y_ptr, m_part_ptr, l_part_ptr, tgt_ptr,
    M, V, H, num_vgroups, vblocks_per_prog, group_m,
    stride_hm, stride_hk, stride_wv, stride_wk, stride_pm, stride_pg,
    softcap,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # h (M, H), w (V, H), y (M,) int64 -> m_part / l_part (M, num_vgroups) fp32 in base 2, tgt (M,).
    LOG2E: tl.constexpr = 1.4426950408889634
    pid = tl.program_id(0)
    rb, vg = _swizzle(pid, tl.cdiv(M, BLOCK_M), num_vgroups, group_m)
    offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    rows = (offs_m % M).to(tl.int64)  # tail rows recompute row 0..; their stores are masked
    y = tl.load(y_ptr + rows)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    vb_start = vg * vblocks_per_prog
    vb_end = tl.minimum(vb_start + vblocks_per_prog, tl.cdiv(V, BLOCK_V))
    for vb in range(vb_start, vb_end):
        offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = offs_v < V
        cols = (offs_v % V).to(tl.int64)
        z = _logits_tile(h_ptr, w_ptr, rows, cols, H, stride_hm, stride_hk, stride_wv, stride_wk,
                         BLOCK_M, BLOCK_V, BLOCK_K, DOT_PREC)
        if softcap > 0:
            z = softcap * _tanh(z / softcap)
        # target logit: exactly one vocab block of one program holds column y
        t_i += tl.sum(tl.where(offs_v[None, :].to(tl.int64) == y[:, None], z, 0.0), axis=1)
        s = tl.where(col_ok[None, :], z * LOG2E, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block has a valid column
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new

    p_off = rows * stride_pm + vg * stride_pg
    tl.store(m_part_ptr + p_off, m_i, mask=row_ok)
    tl.store(l_part_ptr + p_off, l_i, mask=row_ok)
    # y < V: a label in the last block's padded tail matched a clamped column's logit (the row stays NaN)
    has_y = row_ok & (y >= vb_start * BLOCK_V) & (y < vb_end * BLOCK_V) & (y < V)
    tl.store(tgt_ptr + rows, t_i, mask=has_y)


@triton.jit(do_not_specialize=["M", "G", "stride_pm", "stride_pg"])
def _ce_combine_kernel(
    m_part_ptr, l_part_ptr, tgt_ptr, lse_ptr, loss_ptr,
    M, G, stride_pm, stride_pg, z_loss,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
):
    # (M, G) base-2 partials -> lse (M,) natural log, loss = lse - z_y + z_loss * lse^2 (M,).
    LN2: tl.constexpr = 0.6931471805599453
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_r < M
    rows = (offs_r % M).to(tl.int64)
    m_acc = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l_acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        g_ok = offs_g < G
        off = rows[:, None] * stride_pm + offs_g[None, :] * stride_pg
        m = tl.load(m_part_ptr + off, mask=g_ok[None, :], other=float("-inf"))
        l = tl.load(l_part_ptr + off, mask=g_ok[None, :], other=0.0)
        m_new = tl.maximum(m_acc, tl.max(m, axis=1))  # finite: column g0 is always valid
        l_acc = l_acc * tl.exp2(m_acc - m_new) + tl.sum(l * tl.exp2(m - m_new[:, None]), axis=1)
        m_acc = m_new
    lse = (m_acc + tl.log2(l_acc)) * LN2
    loss = lse - tl.load(tgt_ptr + rows) + z_loss * lse * lse
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(loss_ptr + rows, loss, mask=row_ok)


@triton.jit(do_not_specialize=["M", "V", "v0", "group_m"])
def _ce_bwd_dlogits_kernel(
    h_ptr, w_ptr, y_ptr, lse_ptr, dz_ptr,
    M, V, H, v0, kc, group_m,
    stride_hm, stride_hk, stride_wv, stride_wk, stride_dzm, stride_dzv,
    softcap, z_loss,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Recompute z for vocab columns [v0, v0 + kc) and store dZ = dloss/dz (unscaled by the
    # upstream gradient) into dz (M, >= kc) in the input dtype.
    LOG2E: tl.constexpr = 1.4426950408889634
    pid = tl.program_id(0)
    rb, cb = _swizzle(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(kc, BLOCK_V), group_m)
    offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    rows = (offs_m % M).to(tl.int64)
    offs_c = cb * BLOCK_V + tl.arange(0, BLOCK_V)  # column inside the chunk
    col_ok = offs_c < kc
    cols = v0 + (offs_c % kc).to(tl.int64)  # vocab id, clamped inside the chunk

    z = _logits_tile(h_ptr, w_ptr, rows, cols, H, stride_hm, stride_hk, stride_wv, stride_wk,
                     BLOCK_M, BLOCK_V, BLOCK_K, DOT_PREC)
    if softcap > 0:
        t = _tanh(z / softcap)
        z = softcap * t
        dcap = 1.0 - t * t  # d(c tanh(x / c))/dx
    else:
        dcap = tl.full((BLOCK_M, BLOCK_V), 1.0, dtype=tl.float32)
    lse = tl.load(lse_ptr + rows)
    y = tl.load(y_ptr + rows)
    p = tl.exp2((z - lse[:, None]) * LOG2E)
    dz = p * (1.0 + 2.0 * z_loss * lse)[:, None] - tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
    dz = dz * dcap
    dz_off = rows[:, None] * stride_dzm + offs_c[None, :].to(tl.int64) * stride_dzv
    tl.store(dz_ptr + dz_off, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["M", "v0", "group_m", "acc_in", "final"])
def _ce_bwd_dh_kernel(
    dz_ptr, w_ptr, acc_ptr, r_ptr, idx_ptr, dh_ptr,
    M, H, v0, kc, group_m, acc_in, final,
    stride_dzm, stride_dzv, stride_wv, stride_wk, stride_am, stride_ah, stride_r,
    stride_dhn, stride_dhk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # acc (M, H) fp32 (+)= dz[:, :kc] @ W[v0:v0 + kc]. On the last chunk (`final`), instead of
    # storing acc: dh[idx[m], :] = r[m] * acc[m, :] in dh's dtype (r = upstream grad per row).
    pid = tl.program_id(0)
    rb, nb = _swizzle(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(H, BLOCK_N), group_m)
    offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    n_ok = offs_n < H
    rows = (offs_m % M).to(tl.int64)
    # The H offsets stay unclamped and masked: a modulo would hide their contiguity from the
    # compiler and turn the vectorised 16-byte (cp.async) loads into scalar ones.
    hcols = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = dz_ptr + rows[:, None] * stride_dzm + offs_k[None, :] * stride_dzv  # (BLOCK_M, BLOCK_K)
    b_ptrs = w_ptr + (v0 + offs_k.to(tl.int64))[:, None] * stride_wv + hcols[None, :] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(kc, BLOCK_K)):
        k_ok = offs_k < kc - k * BLOCK_K
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K * stride_dzv
        b_ptrs += BLOCK_K * stride_wv
    acc_off = rows[:, None] * stride_am + hcols[None, :] * stride_ah
    mask = row_ok[:, None] & n_ok[None, :]
    if acc_in:
        acc += tl.load(acc_ptr + acc_off, mask=mask, other=0.0)
    if final:
        r = tl.load(r_ptr + rows * stride_r)
        dst = tl.load(idx_ptr + rows)
        out = acc * r[:, None]
        dh_off = dst[:, None] * stride_dhn + hcols[None, :] * stride_dhk
        tl.store(dh_ptr + dh_off, out.to(dh_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(acc_ptr + acc_off, acc, mask=mask)


@triton.jit(do_not_specialize=["M", "v0", "group_m"])
def _ce_bwd_dw_kernel(
    dz_ptr, h_ptr, r_ptr, dw_ptr,
    M, H, v0, kc, group_m,
    stride_dzm, stride_dzv, stride_hm, stride_hk, stride_r, stride_dwv, stride_dwk,
    BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # dw[v0:v0 + kc] = (r * dz[:, :kc])^T @ h, contraction over the M labelled rows.
    pid = tl.program_id(0)
    cb, nb = _swizzle(pid, tl.cdiv(kc, BLOCK_V), tl.cdiv(H, BLOCK_N), group_m)
    offs_c = cb * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = offs_c < kc
    n_ok = offs_n < H
    ccols = offs_c.to(tl.int64)  # unclamped + masked along the contiguous dims (see dh kernel)
    hcols = offs_n.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = dz_ptr + offs_k[:, None].to(tl.int64) * stride_dzm + ccols[None, :] * stride_dzv  # (BK, BV)
    b_ptrs = h_ptr + offs_k[:, None].to(tl.int64) * stride_hm + hcols[None, :] * stride_hk  # (BK, BN)
    r_ptrs = r_ptr + offs_k.to(tl.int64) * stride_r
    acc = tl.zeros((BLOCK_V, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(M, BLOCK_K)):
        k_ok = offs_k < M - k * BLOCK_K
        a = tl.load(a_ptrs, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        r = tl.load(r_ptrs, mask=k_ok, other=0.0)
        # the per-row upstream gradient must be applied inside the contraction over rows
        a = (a.to(tl.float32) * r[:, None]).to(dz_ptr.dtype.element_ty)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PREC)
        a_ptrs += BLOCK_K * stride_dzm
        b_ptrs += BLOCK_K * stride_hm
        r_ptrs += BLOCK_K * stride_r
    dw_off = (v0 + ccols)[:, None] * stride_dwv + hcols[None, :] * stride_dwk
    tl.store(dw_ptr + dw_off, acc.to(dw_ptr.dtype.element_ty), mask=c_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["V", "stride_zm", "grad_scale"])
def _ce_grad_rows_kernel(
    z_ptr, y_ptr, loss_ptr,
    V, stride_zm, softcap, z_loss, grad_scale,
    BLOCK_V: tl.constexpr,
):
    # Eager strategy, one program per row: z (rows, V) raw logits in the input dtype (unit stride
    # along V) -> loss[row] (fp32), and z[row] overwritten with grad_scale * dloss/dz.
    # Pass 1 keeps a running max / sum per lane (BLOCK_V of them, base 2) and reduces across lanes
    # once at the end, so the loop has no cross-warp reduction.
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_zm
    offs = tl.arange(0, BLOCK_V)
    m_vec = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    l_vec = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        if softcap > 0:
            z = softcap * _tanh(z / softcap)  # -inf -> -softcap: the padded lanes are masked below
        s = tl.where(cols < V, z * LOG2E, float("-inf"))
        m_new = tl.maximum(m_vec, s)
        # a lane that has seen no column yet (V < BLOCK_V) keeps m = -inf: shift by 0 there, since
        # exp2(-inf - -inf) would be NaN; exp2(-inf - 0) = 0 keeps its sum at 0
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_vec = l_vec * tl.exp2(m_vec - m_safe) + tl.exp2(s - m_safe)
        m_vec = m_new
    m = tl.max(m_vec, axis=0)
    lse = (m + tl.log2(tl.sum(l_vec * tl.exp2(m_vec - m), axis=0))) * LN2  # natural log
    y = tl.load(y_ptr + row)
    y_ok = (y >= 0) & (y < V)
    z_y = tl.load(z_row + tl.where(y_ok, y, 0)).to(tl.float32)
    if softcap > 0:
        z_y = softcap * _tanh(z_y / softcap)
    z_y = tl.where(y_ok, z_y, float("nan"))  # out-of-range label: NaN loss, as in the other kernels
    tl.store(loss_ptr + row, lse - z_y + z_loss * lse * lse)

    # Pass 2: dz_v = (p_v * (1 + 2 z_loss lse) - [v == y]) * dcap_v, scaled, written over z.
    coef = 1.0 + 2.0 * z_loss * lse
    lse2 = lse * LOG2E
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
        if softcap > 0:
            t = _tanh(z / softcap)
            z = softcap * t
            dcap = 1.0 - t * t
        else:
            dcap = tl.full((BLOCK_V,), 1.0, dtype=tl.float32)
        p = tl.exp2(z * LOG2E - lse2)
        dz = (p * coef - tl.where(cols == y, 1.0, 0.0)) * dcap * grad_scale
        tl.store(z_row + cols, dz.to(z_ptr.dtype.element_ty), mask=cols < V)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _group_rows(block_rows, H, esize, num_row_blocks):
    # number of row blocks whose hidden rows (block_rows x H) fit the L2 share
    return max(1, min(num_row_blocks, _L2_HIDDEN_BYTES // max(1, block_rows * H * esize)))


def _check_inputs(hidden, weight, labels):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden (N, H) and weight (V, H), "
                         f"got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be (N,) = {tuple(hidden.shape[:1])}, got {tuple(labels.shape)}")
    if hidden.dtype not in _DOT_PREC:
        raise TypeError(f"masked_cross_entropy (triton): hidden must be fp16, bf16 or fp32, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"masked_cross_entropy (triton): hidden ({hidden.dtype}) and weight ({weight.dtype}) "
                        "must have the same dtype")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    if hidden.device != weight.device or hidden.device != labels.device:
        raise ValueError(f"hidden, weight, labels on different devices: "
                         f"{hidden.device}, {weight.device}, {labels.device}")
    if weight.stride(1) != 1:
        raise ValueError(f"weight must be contiguous along H (stride(1) == 1), got strides {weight.stride()}")


def _forward_rows(h, weight, y, softcap, z_loss, cfg):
    """h (M, H) contiguous, weight (V, H), y (M,) int64 -> (loss (M,) fp32, lse (M,) fp32)."""
    M, H = h.shape
    V = weight.shape[0]
    c = cfg["fwd"]
    BM, BV = c["BLOCK_M"], c["BLOCK_V"]
    num_rb = triton.cdiv(M, BM)
    num_vb = triton.cdiv(V, BV)
    vpp = max(1, min(int(cfg["vblocks_per_prog"]), num_vb))
    num_vg = triton.cdiv(num_vb, vpp)
    group_m = _group_rows(BM, H, h.element_size(), num_rb)
    m_part = torch.empty((M, num_vg), device=h.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    tgt = torch.full((M,), float("nan"), device=h.device, dtype=torch.float32)  # NaN if y not in [0, V)
    _ce_fwd_kernel[(num_rb * num_vg,)](
        h, weight, y, m_part, l_part, tgt,
        M, V, H, num_vg, vpp, group_m,
        h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), m_part.stride(0), m_part.stride(1),
        float(softcap or 0.0),
        BLOCK_M=BM, BLOCK_V=BV, BLOCK_K=c["BLOCK_K"], DOT_PREC=_DOT_PREC[h.dtype],
        num_warps=c["num_warps"], num_stages=c["num_stages"],
    )
    lse = torch.empty((M,), device=h.device, dtype=torch.float32)
    loss = torch.empty_like(lse)
    _ce_combine_kernel[(triton.cdiv(M, _COMBINE["BLOCK_R"]),)](
        m_part, l_part, tgt, lse, loss, M, num_vg, m_part.stride(0), m_part.stride(1), float(z_loss),
        BLOCK_R=_COMBINE["BLOCK_R"], BLOCK_G=_COMBINE["BLOCK_G"], num_warps=_COMBINE["num_warps"],
    )
    return loss, lse


def _vocab_chunk(M, V, esize, cfg):
    if cfg.get("vocab_chunk"):
        return int(cfg["vocab_chunk"])
    vc = (BWD_SCRATCH_BYTES // max(1, M * esize)) // 256 * 256
    return int(max(256, min(vc, triton.cdiv(V, 256) * 256)))


def _backward_rows(hidden, weight, idx, y, lse, r, softcap, z_loss, need_h, need_w, cfg):
    """Gradients for the labelled rows. r (M,) fp32 upstream grad per row (any stride).

    Returns dhidden (N, H) in hidden.dtype (rows not in idx are zero) or None, dweight (V, H) or None.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    M = idx.numel()
    h = hidden.index_select(0, idx)  # (M, H), contiguous
    dtype = hidden.dtype
    prec = _DOT_PREC[dtype]
    vc = _vocab_chunk(M, V, h.element_size(), cfg)
    num_chunks = triton.cdiv(V, vc)
    # scratch reused per chunk; its row stride stays a multiple of 256 even when vc > V, so the
    # compiled variant (16-divisible strides) is the same for every shape
    dz = torch.empty((M, vc), device=h.device, dtype=dtype)
    dh = torch.zeros((N, H), device=h.device, dtype=dtype) if need_h else None
    acc = torch.empty((M, H), device=h.device, dtype=torch.float32) if (need_h and num_chunks > 1) else None
    dw = torch.empty((V, H), device=weight.device, dtype=weight.dtype) if need_w else None
    dummy = torch.empty((1, 16), device=h.device, dtype=torch.float32)  # same stride class as acc
    cl, ch, cw = cfg["dlogits"], cfg["dh"], cfg["dw"]
    num_rb = triton.cdiv(M, cl["BLOCK_M"])
    g_rows = _group_rows(cl["BLOCK_M"], H, h.element_size(), num_rb)
    for ci in range(num_chunks):
        v0 = ci * vc
        kc = min(vc, V - v0)
        _ce_bwd_dlogits_kernel[(num_rb * triton.cdiv(kc, cl["BLOCK_V"]),)](
            h, weight, y, lse, dz,
            M, V, H, v0, kc, g_rows,
            h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), dz.stride(0), dz.stride(1),
            float(softcap or 0.0), float(z_loss),
            BLOCK_M=cl["BLOCK_M"], BLOCK_V=cl["BLOCK_V"], BLOCK_K=cl["BLOCK_K"], DOT_PREC=prec,
            num_warps=cl["num_warps"], num_stages=cl["num_stages"],
        )
        if need_h:
            final = ci == num_chunks - 1
            acc_t = acc if acc is not None else dummy  # single chunk: the fp32 buffer is never touched
            num_mb = triton.cdiv(M, ch["BLOCK_M"])
            _ce_bwd_dh_kernel[(num_mb * triton.cdiv(H, ch["BLOCK_N"]),)](
                dz, weight, acc_t, r, idx, dh,
                M, H, v0, kc, min(8, num_mb), int(ci > 0), int(final),
                dz.stride(0), dz.stride(1), weight.stride(0), weight.stride(1),
                acc_t.stride(0), acc_t.stride(1), r.stride(0), dh.stride(0), dh.stride(1),
                BLOCK_M=ch["BLOCK_M"], BLOCK_N=ch["BLOCK_N"], BLOCK_K=ch["BLOCK_K"], DOT_PREC=prec,
                num_warps=ch["num_warps"], num_stages=ch["num_stages"],
            )
        if need_w:
            num_cb = triton.cdiv(kc, cw["BLOCK_V"])
            _ce_bwd_dw_kernel[(num_cb * triton.cdiv(H, cw["BLOCK_N"]),)](
                dz, h, r, dw,
                M, H, v0, kc, min(8, num_cb),
                dz.stride(0), dz.stride(1), h.stride(0), h.stride(1), r.stride(0), dw.stride(0), dw.stride(1),
                BLOCK_V=cw["BLOCK_V"], BLOCK_N=cw["BLOCK_N"], BLOCK_K=cw["BLOCK_K"], DOT_PREC=prec,
                num_warps=cw["num_warps"], num_stages=cw["num_stages"],
            )
    return dh, dw


def _row_chunk(M, V, esize, cfg):
    """Rows per eager chunk: RC x V logits in the input dtype within the scratch budget."""
    if cfg.get("row_chunk"):
        return int(cfg["row_chunk"])
    rc = BWD_SCRATCH_BYTES // max(1, V * esize)
    if rc >= 128:
        rc = rc // 64 * 64  # GEMM-friendly row counts
    return int(max(1, min(rc, M)))


def _eager_rows(h, weight, y, softcap, z_loss, grad_scale, cfg):
    """h (M, H) contiguous, weight (V, H), y (M,) -> (loss (M,) fp32, dH_rows (M, H) in h.dtype).

    dH_rows = grad_scale * dloss/dh for each labelled row, computed chunk by chunk (see the module
    docstring, "eager"): logits and dZ share one (RC, V) scratch, both GEMMs are cuBLAS.
    """
    M, H = h.shape
    V = weight.shape[0]
    c = cfg["grad_rows"]
    rc = _row_chunk(M, V, h.element_size(), cfg)
    z = torch.empty((rc, V), device=h.device, dtype=h.dtype)
    dh_rows = torch.empty((M, H), device=h.device, dtype=h.dtype)
    loss = torch.empty((M,), device=h.device, dtype=torch.float32)
    wt = weight.t()
    for r0 in range(0, M, rc):
        n = min(rc, M - r0)
        zc = z[:n]
        torch.mm(h[r0:r0 + n], wt, out=zc)  # (n, V) logits of this chunk only
        _ce_grad_rows_kernel[(n,)](
            zc, y[r0:r0 + n], loss[r0:r0 + n], V, zc.stride(0),
            float(softcap or 0.0), float(z_loss), float(grad_scale),
            BLOCK_V=c["BLOCK_V"], num_warps=c["num_warps"],
        )
        torch.mm(zc, weight, out=dh_rows[r0:r0 + n])  # zc now holds dZ
    return loss, dh_rows


class _MaskedCrossEntropyEager(torch.autograd.Function):
    """(hidden (N, H), weight (V, H) frozen, idx (M,), y (M,)) -> scalar fp32 loss ("mean" or "sum").

    The hidden gradient is computed here in forward; backward scales it by the upstream scalar.
    """

    @staticmethod
    def forward(ctx, hidden, weight, idx, y, softcap, z_loss, mean, cfg):
        M = idx.numel()
        with on_device(hidden):
            loss, dh_rows = _eager_rows(hidden.index_select(0, idx), weight, y, softcap, z_loss,
                                        1.0 / M if mean else 1.0, cfg)
        ctx.save_for_backward(idx, dh_rows)
        ctx.n_rows = hidden.shape[0]
        total = loss.sum()
        return total / M if mean else total

    @staticmethod
    def backward(ctx, grad):
        idx, dh_rows = ctx.saved_tensors
        dh = dh_rows.new_zeros((ctx.n_rows, dh_rows.shape[1]))
        # grad is 1 for a plain loss.backward() (exact), 1/GAS under gradient accumulation
        dh.index_copy_(0, idx, (dh_rows.float() * grad).to(dh_rows.dtype))
        return dh, None, None, None, None, None, None, None


class _MaskedCrossEntropy(torch.autograd.Function):
    """(hidden (N, H), weight (V, H), idx (M,), y (M,)) -> per labelled row loss (M,) fp32.

    The reduction is left to torch outside, so backward receives one upstream gradient per row
    (an expanded scalar for "mean" / "sum"), applied in fp32 in the dH epilogue; in the dW operand dZ x r is formed
    in fp32 and rounded once to the input dtype, as tl.dot takes operands of one dtype (in fp16 a large loss scale
    could overflow it: the engine trains the LM head only in full fine-tuning, and in bf16).
    """

    @staticmethod
    def forward(ctx, hidden, weight, idx, y, softcap, z_loss, cfg):
        M = idx.numel()
        if M == 0:
            lse = loss = torch.zeros((0,), device=hidden.device, dtype=torch.float32)
        else:
            with on_device(hidden):
                loss, lse = _forward_rows(hidden.index_select(0, idx), weight, y, softcap, z_loss, cfg)
        # ZeRO-3 gathers `weight` around this call; backward reads it back from saved_tensors.
        ctx.save_for_backward(hidden, weight, idx, y, lse)
        ctx.softcap, ctx.z_loss, ctx.cfg, ctx.weight_shape = softcap, z_loss, cfg, tuple(weight.shape)
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        hidden, weight, idx, y, lse = ctx.saved_tensors
        if tuple(weight.shape) != ctx.weight_shape:
            raise RuntimeError(f"masked_cross_entropy backward: weight is {tuple(weight.shape)}, was "
                               f"{ctx.weight_shape} in forward (a ZeRO-3 partitioned weight must be gathered "
                               "again for backward)")
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if idx.numel() == 0 or not (need_h or need_w):
            dh = torch.zeros_like(hidden) if need_h else None
            dw = torch.zeros_like(weight) if need_w else None
            return dh, dw, None, None, None, None, None
        r = grad_rows.float().contiguous()  # (M,); from .sum() it is an expanded scalar
        with on_device(hidden):
            dh, dw = _backward_rows(hidden, weight, idx, y, lse, r, ctx.softcap, ctx.z_loss,
                                    need_h, need_w, ctx.cfg)
        return dh, dw, None, None, None, None, None


def _masked_ce_triton(hidden, weight, labels, *, ignore_index=-100, reduction="mean", softcap=None,
                      z_loss=0.0, cfg=None, all_labelled=False):
    _check_inputs(hidden, weight, labels)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    cfg = cfg or launch_config(hidden.dtype, hidden.device)
    strategy = cfg.get("strategy", "auto")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if all_labelled:  # the caller selected labelled rows already: no host sync
        idx = torch.arange(labels.shape[0], device=labels.device)
    else:
        idx = (labels != ignore_index).nonzero().squeeze(1)  # (M,) labelled rows; one host sync
    y = labels.index_select(0, idx)  # (M,) int64
    if strategy == "eager" and (reduction == "none" or weight.requires_grad):
        raise ValueError("masked_cross_entropy strategy='eager' needs reduction 'mean' or 'sum' and a frozen "
                         "weight (it computes no weight gradient); use 'recompute' or 'auto'")
    grad_h = torch.is_grad_enabled() and hidden.requires_grad
    # "auto" keeps fp16 on "recompute": eager rounds dZ = dloss/dz / M into the input dtype in the forward, before
    # the loss scale arrives, and in fp16 (5-bit exponent) ~97% of it flushes to 0 at M = 8k rows (bf16 is fine)
    eager = idx.numel() > 0 and (strategy == "eager" or (
        strategy == "auto" and grad_h and reduction != "none" and not weight.requires_grad
        and hidden.dtype != torch.float16))
    if eager:
        return _MaskedCrossEntropyEager.apply(hidden, weight, idx, y, softcap, float(z_loss), reduction == "mean",
                                              cfg)
    rows = _MaskedCrossEntropy.apply(hidden, weight, idx, y, softcap, float(z_loss), cfg)  # (M,) fp32
    if reduction == "none":
        return torch.zeros(hidden.shape[0], dtype=rows.dtype, device=hidden.device).index_put((idx,), rows)
    total = rows.sum()
    return total if reduction == "sum" else total / max(int(idx.numel()), 1)


# ----------------------------------------------------------------------------------------------
# Reference and public function
# ----------------------------------------------------------------------------------------------
def masked_cross_entropy_reference(
    hidden, weight, labels, *, ignore_index=-100, reduction="mean", softcap=None, z_loss=0.0, all_labelled=False
):
    """hidden (N, H), weight (V, H), labels (N,). Mean CE over rows whose label != ignore_index.

    All rows ignored -> loss 0 (connected to the graph, so gradients are zeros, not NaN).
    reduction: "mean" | "sum" | "none" (per-row (N,), zeros on ignored rows).
    Math in fp32 for half inputs (fp64 stays fp64, which the tests use as ground truth).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden (N, H) and weight (V, H), got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be (N,) = {tuple(hidden.shape[:1])}, got {tuple(labels.shape)}")
    if all_labelled:  # every row is labelled (the caller promises it): no nonzero(), no host sync
        idx = torch.arange(labels.shape[0], device=labels.device)
    else:
        idx = (labels != ignore_index).nonzero().squeeze(1)
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
    hidden, weight, labels, *, ignore_index=-100, reduction="mean", softcap=None, z_loss=0.0, impl=None,
    all_labelled=False
):
    """Cross-entropy of softmax(hidden @ weight^T) over rows with label != ignore_index.

    hidden (N, H), weight (V, H), labels (N,) int64. Returns a scalar (fp32 for half inputs) for
    "mean" / "sum", or (N,) with zeros on ignored rows for "none". ``softcap``: Gemma2-style
    z <- c * tanh(z / c). ``z_loss`` adds z_loss * lse^2 per row. impl: "auto" | "triton" | "torch".
    The Triton path never stores logits and skips the weight gradient when weight is frozen.
    ``all_labelled=True``: the caller guarantees no row is ignored (e.g. it selected the labelled rows on the
    host), so the labelled-row index is an arange and nothing syncs with the host.
    """
    # auto: fp64 (which the kernels do not take) runs the reference, as for the other ops
    backend = resolve_impl("masked_ce", impl, hidden, auto_dtypes=KERNEL_DTYPES)
    if backend == "triton":
        return _masked_ce_triton(hidden, weight, labels, ignore_index=ignore_index, reduction=reduction,
                                 softcap=softcap, z_loss=z_loss, all_labelled=all_labelled)
    return masked_cross_entropy_reference(
        hidden, weight, labels, ignore_index=ignore_index, reduction=reduction, softcap=softcap, z_loss=z_loss,
        all_labelled=all_labelled)
