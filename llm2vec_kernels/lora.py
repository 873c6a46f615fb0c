"""Fused LoRA projections over a frozen base: ``y_i = x W_i^T (+ b_i) + s * dropout(x) A_i^T B_i^T``.

One call serves a *group* of projections that read the same input: q/k/v of an attention block,
gate/up of an MLP, or a single projection (o, down). Per group:

* ``x`` is read once for the low-rank path: one GEMM of the concatenated A's, ``h = s * drop(x) A_cat^T``
  (M, sum r), with the dropout mask applied while ``x`` is loaded and the scaling ``s`` folded in;
* one dropout mask per group (PEFT draws one per projection: see ``engine/lora.py``);
* each output y_i is two cuBLAS GEMMs and no copy: the base GEMM writes it once, ``y_i = x W_i^T``
  (``torch.mm``; with a bias ``torch.addmm(b_i, x, W_i^T)``, the bias added in cuBLASLt's epilogue as
  ``nn.Linear`` does), then the low-rank product is added in place, ``y_i.addmm_(h_i, B_i^T)`` (beta = 1:
  the GEMM reads y_i and writes the sum back). An out-of-place ``addmm(low, x, W_i^T)`` first copies
  ``low`` into a new output: one more pass over (M, N_i) per projection. Exception: under torch's selective
  activation checkpointing (engine/memory.py's "selective" policy saves every mm / addmm output and must not
  see one mutated; it would also replay the mutated tensor) the forward keeps that out-of-place form,
  ``low = h_i B_i^T (+ b_i)`` then ``y_i = addmm(low, x, W_i^T)``, so the saved outputs stay valid;
* the backward computes only what a frozen base needs, and of that only what autograd asks for
  (``needs_input_grad``: no grad x for the first layer, whose input comes from frozen embeddings): grad x,
  grad A_i, grad B_i, never grad W_i, all
  accumulated in place: ``gx = gy_0 W_0`` (``torch.mm``), ``gx.addmm_(gy_i, W_i)`` for the other projections,
  then ``+= s * mask / (1 - p) * (gh A_cat)`` with ``gh = [gy_i B_i]``: one kernel pass that applies the
  dropout backward and adds into gx (impl="triton": ``_lora_grad_x_kernel``; impl="torch": ``gx.addmm_``, or
  with dropout ``gx.add_`` of the masked product); grad A = ``s / (1 - p) * gh^T (mask * x)`` and
  grad B_i = ``gy_i^T h_i`` are fresh (small) results.

Dropout RNG. impl="triton": the keep-mask of element (m, k) is a pure function of a seed and (m, k)
(``llm2vec_kernels._backend.philox_keep8``: one Philox-4x32-7 call per eight columns, counter = (k // 8, m), a 16-bit
draw per element against round(p * 2**16)); no mask is stored, the forward, a checkpointed recompute and the
backward each regenerate it. Cost on sm_90 (static SASS instructions per masked element, Triton 3.9,
``python -m tests.lora_dropout_sass``): the keep function 4.25 (25.75 with one Philox call per element); the
dropout adds 9.75 / 7.75 / 11.75 to the down / grad A / grad x kernels (31.25 / 27.75 / 30 before). The seed is
one int32 drawn with ``torch.randint`` *on x's device*, so it comes from that device's torch generator and never
needs a host sync; activation checkpointing (which restores the CPU and device RNG states before recomputing)
and gradient caching's RNG replay (engine/stages/contrastive.py restores both states) therefore redraw the same
seed and get the same mask.
impl="torch": the mask is ``bernoulli_`` on x's device from the same torch generator (same replay
guarantees); it is kept as a bool tensor for the backward. :func:`lora_dropout_mask` rebuilds the
Triton mask from a seed (tests).

``lora_group_reference`` is the plain per-projection math (what PEFT computes), for tests.
impl="auto" takes the Triton kernels for fp16/bf16 CUDA tensors and the torch path otherwise (fp32 Triton dots
would be TF32). Launch configurations are fixed (``launch_config``) and compile spill-free for sm_90 and sm_80.
This module imports only torch and triton.
"""
import torch
import triton
import triton.language as tl

from ._backend import (KERNEL_DTYPES, dot_precision, dropout_threshold, keep_mask, on_input_device, philox_keep8,
                       resolve_impl)


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------

def lora_group_reference(x, weights, lora_a, lora_b, scaling, dropout_p=0.0, keep=None, biases=None):
    """[x W_i^T + b_i + s (x * keep / (1 - p)) A_i^T B_i^T for each i]; ``keep`` (bool, x's shape) when p > 0."""
    if dropout_p > 0:
        if keep is None:
            raise ValueError("lora_group_reference: dropout_p > 0 needs the keep mask")
        xd = x * keep.to(x.dtype) / (1.0 - dropout_p)
    else:
        xd = x
    biases = biases if biases is not None else [None] * len(weights)
    out = []
    for w, a, b, bias in zip(weights, lora_a, lora_b, biases):
        y = x @ w.t() + scaling * ((xd @ a.t()) @ b.t())
        out.append(y if bias is None else y + bias)
    return out


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _lora_down_kernel(
    x_ptr, a_ptr, h_ptr, seed_ptr,
    M, K, N,
    stride_xm, stride_xk, stride_an, stride_ak, stride_hm, stride_hn,
    drop_thresh, scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # h[m, n] = scale * sum_k keep[m, k] * x[m, k] * a[n, k]; scale = s / (1 - p) (s without dropout)
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    rows64 = offs_m.to(tl.int64)
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(philox_keep8(seed, offs_m, k0, 0, 0, drop_thresh, BLOCK_K), x, 0.0)
        a = tl.load(a_ptr + offs_n[None, :].to(tl.int64) * stride_an + offs_k[:, None].to(tl.int64) * stride_ak,
                    mask=(offs_n[None, :] < N) & k_ok[:, None], other=0.0)  # (BLOCK_K, BLOCK_N) = A^T tile
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
    acc = acc * scale
    tl.store(h_ptr + rows64[:, None] * stride_hm + offs_n[None, :].to(tl.int64) * stride_hn,
             acc.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))


@triton.jit
def _lora_grad_a_kernel(
    x_ptr, g_ptr, part_ptr, seed_ptr,
    M, K, N, rows_per_split,
    stride_xm, stride_xk, stride_gm, stride_gn, stride_ps, stride_pn, stride_pk,
    drop_thresh,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # part[split, n, k] = sum over this split's rows m of g[m, n] * keep[m, k] * x[m, k]  (unscaled)
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    k_ok = offs_k < K
    seed = tl.load(seed_ptr)
    m_lo = split * rows_per_split
    m_hi = tl.minimum(m_lo + rows_per_split, M)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < m_hi
        rows64 = offs_m.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(philox_keep8(seed, offs_m, pid_k * BLOCK_K, 0, 0, drop_thresh, BLOCK_K), x, 0.0)
        gt = tl.load(g_ptr + rows64[None, :] * stride_gm + offs_n[:, None].to(tl.int64) * stride_gn,
                     mask=row_ok[None, :] & (offs_n[:, None] < N), other=0.0)  # (BLOCK_N, BLOCK_M) = g^T tile
        acc = tl.dot(gt, x, acc, input_precision=PRECISION)
    tl.store(part_ptr + split.to(tl.int64) * stride_ps + offs_n[:, None].to(tl.int64) * stride_pn
             + offs_k[None, :].to(tl.int64) * stride_pk, acc, mask=(offs_n[:, None] < N) & k_ok[None, :])


@triton.jit
def _lora_grad_x_kernel(
    gx_ptr, g_ptr, a_ptr, seed_ptr,
    M, K, N,
    stride_gxm, stride_gxk, stride_gm, stride_gn, stride_an, stride_ak,
    drop_thresh, scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # gx[m, k] += scale * keep[m, k] * sum_n g[m, n] a[n, k]   (in place; scale = s / (1 - p))
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    k_ok = offs_k < K
    rows64 = offs_m.to(tl.int64)
    g = tl.load(g_ptr + rows64[:, None] * stride_gm + offs_n[None, :].to(tl.int64) * stride_gn,
                mask=row_ok[:, None] & (offs_n[None, :] < N), other=0.0)
    a = tl.load(a_ptr + offs_n[:, None].to(tl.int64) * stride_an + offs_k[None, :].to(tl.int64) * stride_ak,
                mask=(offs_n[:, None] < N) & k_ok[None, :], other=0.0)
    if HAS_DROPOUT:  # the mask folded into the scale (keeps the mask's layout apart from the dot's: fewer moves)
        seed = tl.load(seed_ptr)
        keep = philox_keep8(seed, offs_m, pid_k * BLOCK_K, 0, 0, drop_thresh, BLOCK_K)
        acc = tl.dot(g, a, input_precision=PRECISION) * tl.where(keep, scale, 0.0)
    else:
        acc = tl.dot(g, a, input_precision=PRECISION) * scale
    ptrs = gx_ptr + rows64[:, None] * stride_gxm + offs_k[None, :].to(tl.int64) * stride_gxk
    both = row_ok[:, None] & k_ok[None, :]
    prev = tl.load(ptrs, mask=both, other=0.0)
    tl.store(ptrs, (prev.to(tl.float32) + acc).to(gx_ptr.dtype.element_ty), mask=both)


# ----------------------------------------------------------------------------------------------
# Launch configuration (fixed; chosen so every variant compiles spill-free for sm_80 and sm_90)
# ----------------------------------------------------------------------------------------------

# The widest rank tile: every kernel holds the group's summed rank N in one tile of _block_n(N) columns. Up to 128
# they compile spill-free (tests/test_lora.py: N = 96 in a 128 tile); N = 192 spills on sm_90 and 768 exceeds its
# shared memory, so "auto" takes the torch path above 128 and "triton" refuses it.
MAX_BLOCK_N = 128


def _block_n(n):
    return max(16, triton.next_power_of_2(n))


def fits_one_tile(rank_sum):
    """Whether the kernels can hold a group's summed LoRA rank in one tile (at most MAX_BLOCK_N columns)."""
    return _block_n(rank_sum) <= MAX_BLOCK_N


def launch_config(kind, n, dtype, dropout=False):
    """(BLOCK_M, BLOCK_K, num_warps, num_stages) for kernel ``kind`` in {"down", "grad_a", "grad_x"}, N = sum r.

    With dropout the Philox mask of a 128 x 64 tile spills (sm_90: 112 bytes in "down"), so tiles are 64 x 64;
    fp32 operands take 2 stages (3 puts "down" at 255 registers). Under Triton 3.6 (the GPU image's) "grad_a" with
    dropout and N > 64 spills 8 bytes on sm_90 on 4 warps (2 or 3 stages), so it runs on 8 warps (172 registers
    with 3.6, 128 with 3.9, no spills on sm_90 or sm_80)."""
    wide = _block_n(n) > 64
    if dtype == torch.float32:
        return (64, 64, 4, 2)
    if dropout:
        if kind == "grad_a" and wide:
            return (64, 64, 8, 3)
        return (64, 64, 4, 3) if kind != "grad_x" else (64, 64, 4, 2)
    if kind == "down":
        return (64, 64, 4, 3) if wide else (128, 64, 4, 3)
    if kind == "grad_a":
        return (64, 64, 4, 3) if wide else (64, 128, 4, 3)
    return (64, 64, 4, 2) if wide else (64, 128, 4, 2)


def _split_count(k_blocks, M, device):
    if M <= 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(2 * sms, max(k_blocks, 1)), triton.cdiv(M, 256)))


@on_input_device
def _down(x, a_cat, seed, p, scale):
    M, K = x.shape
    N = a_cat.shape[0]
    h = torch.empty(M, N, device=x.device, dtype=x.dtype)
    bm, bk, warps, stages = launch_config("down", N, x.dtype, p > 0)
    _lora_down_kernel[(triton.cdiv(M, bm),)](
        x, a_cat, h, seed, M, K, N, x.stride(0), x.stride(1), a_cat.stride(0), a_cat.stride(1),
        h.stride(0), h.stride(1), dropout_threshold(p, packed=True), scale, HAS_DROPOUT=p > 0, BLOCK_M=bm,
        BLOCK_N=_block_n(N), BLOCK_K=bk, PRECISION=dot_precision(x.dtype), num_warps=warps, num_stages=stages)
    return h


@on_input_device
def _grad_a(x, gh, seed, p, scale):
    M, K = x.shape
    N = gh.shape[1]
    bm, bk, warps, stages = launch_config("grad_a", N, x.dtype, p > 0)
    k_blocks = triton.cdiv(K, bk)
    splits = _split_count(k_blocks, M, x.device)
    rows = triton.cdiv(triton.cdiv(max(M, 1), splits), bm) * bm
    splits = triton.cdiv(max(M, 1), rows)
    part = torch.empty(splits, N, K, device=x.device, dtype=torch.float32)
    _lora_grad_a_kernel[(k_blocks, splits)](
        x, gh, part, seed, M, K, N, rows, x.stride(0), x.stride(1), gh.stride(0), gh.stride(1),
        part.stride(0), part.stride(1), part.stride(2), dropout_threshold(p, packed=True), HAS_DROPOUT=p > 0,
        BLOCK_M=bm, BLOCK_N=_block_n(N), BLOCK_K=bk, PRECISION=dot_precision(x.dtype), num_warps=warps,
        num_stages=stages)
    return part.sum(0).mul_(scale) if splits > 1 else part[0].mul_(scale)


@on_input_device
def _grad_x_(gx, gh, a_cat, seed, p, scale):
    M, K = gx.shape
    N = gh.shape[1]
    bm, bk, warps, stages = launch_config("grad_x", N, gx.dtype, p > 0)
    _lora_grad_x_kernel[(triton.cdiv(M, bm), triton.cdiv(K, bk))](
        gx, gh, a_cat, seed, M, K, N, gx.stride(0), gx.stride(1), gh.stride(0), gh.stride(1),
        a_cat.stride(0), a_cat.stride(1), dropout_threshold(p, packed=True), scale, HAS_DROPOUT=p > 0,
        BLOCK_M=bm, BLOCK_N=_block_n(N), BLOCK_K=bk, PRECISION=dot_precision(gx.dtype), num_warps=warps,
        num_stages=stages)
    return gx


def _under_selective_checkpoint():
    """True while torch's selective activation checkpointing runs (its caching / cached dispatch modes)."""
    from torch.utils import checkpoint
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    modes = _get_current_dispatch_mode_stack()
    kinds = tuple(getattr(checkpoint, n) for n in ("_CachingTorchDispatchMode", "_CachedTorchDispatchMode")
                  if hasattr(checkpoint, n))
    return any(isinstance(m, kinds) for m in modes) if kinds else bool(modes)


def lora_dropout_mask(seed, shape, dropout_p, device=None):
    """The Triton path's keep-mask (bool, ``shape`` = (M, K)) for an int32 seed tensor of one element."""
    M, K = shape
    return keep_mask(seed.to(device or seed.device), (1, 1, M, K), dropout_p, packed=True)[0, 0]


def draw_seed(device):
    """One int32 seed from ``device``'s torch generator (replayed by checkpointing and gradient caching)."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int32)


# ----------------------------------------------------------------------------------------------
# Autograd function
# ----------------------------------------------------------------------------------------------

class _LoraGroupFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, impl, p, s, n, *tensors):
        weights, biases, lora_a, lora_b = tensors[:n], tensors[n:2 * n], tensors[2 * n:3 * n], tensors[3 * n:]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        dt = x2.dtype
        a_cat = torch.cat([a.to(dt) for a in lora_a], 0)  # (sum r, K): small
        ranks = [a.shape[0] for a in lora_a]
        keep, seed = None, None
        if impl == "triton":
            seed = draw_seed(x2.device) if p > 0 else torch.zeros(1, dtype=torch.int32, device=x2.device)
            h = _down(x2, a_cat, seed, p, s / (1.0 - p))
        else:
            if p > 0:
                keep = torch.empty_like(x2, dtype=torch.bool).bernoulli_(1.0 - p)
                xd = x2 * keep * (1.0 / (1.0 - p))
            else:
                xd = x2
            h = torch.mm(xd, a_cat.t() * s)  # (M, sum r); the scaling folded into the small operand
        outs, r0 = [], 0
        in_place = not _under_selective_checkpoint()
        for w, bias, b, r in zip(weights, biases, lora_b, ranks):
            h_i = h[:, r0:r0 + r]
            r0 += r
            if in_place:  # the base GEMM writes the output (bias in its epilogue), the low-rank GEMM adds in place
                y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias.to(dt), x2, w.t())
                y.addmm_(h_i, b.to(dt).t())
            else:  # selective checkpointing keeps GEMM outputs and forbids mutating them: low-rank first, then
                low = torch.mm(h_i, b.to(dt).t()) if bias is None else torch.addmm(bias.to(dt), h_i, b.to(dt).t())
                y = torch.addmm(low, x2, w.t())  # the base GEMM onto a copy of it (beta = 1)
            outs.append(y.view(*shape[:-1], w.shape[0]))
        ctx.save_for_backward(x2, h, a_cat, keep, seed, *weights, *lora_b)
        ctx.impl, ctx.p, ctx.s, ctx.n, ctx.ranks, ctx.shape = impl, p, s, n, ranks, shape
        ctx.a_dtypes = [a.dtype for a in lora_a]
        ctx.b_dtypes = [b.dtype for b in lora_b]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        # Only what autograd asks for (ctx.needs_input_grad): the first layer's input comes from frozen embeddings,
        # so its grad x (every base GEMM gy_i W_i and the low-rank term) is skipped there, and a group whose A or B
        # are frozen skips their products.
        x2, h, a_cat, keep, seed, *rest = ctx.saved_tensors
        n, p, s = ctx.n, ctx.p, ctx.s
        weights, lora_b = rest[:n], rest[n:]
        needs = ctx.needs_input_grad
        need_x, need_a, need_b = needs[0], needs[5 + 2 * n:5 + 3 * n], needs[5 + 3 * n:]
        need_gh = need_x or any(need_a)
        dt = x2.dtype
        M, K = x2.shape
        gx = None
        gh_parts, grad_b, r0 = [], [], 0
        for gy, w, b, r, nb in zip(grads, weights, lora_b, ctx.ranks, need_b):
            h_i = h[:, r0:r0 + r]
            r0 += r
            if gy is None:
                gh_parts.append(torch.zeros(M, r, device=x2.device, dtype=dt))
                grad_b.append(torch.zeros_like(b) if nb else None)
                continue
            gy = gy.reshape(M, w.shape[0])  # not -1: M may be 0
            if need_x:
                if gx is None:
                    gx = torch.mm(gy, w.to(dt))
                else:
                    gx.addmm_(gy, w.to(dt))
            if need_gh:
                gh_parts.append(torch.mm(gy, b.to(dt)))  # d loss / d h_i (h already carries s)
            grad_b.append(torch.mm(gy.t(), h_i).to(b.dtype) if nb else None)
        if need_x and gx is None:
            gx = torch.zeros_like(x2)
        ga = None
        if need_gh:
            gh = torch.cat(gh_parts, 1)  # (M, sum r)
            scale = s / (1.0 - p)
            if ctx.impl == "triton":
                if any(need_a):
                    ga = _grad_a(x2, gh, seed, p, scale)
                if need_x:
                    _grad_x_(gx, gh, a_cat, seed, p, scale)
            else:
                if any(need_a):
                    xd = x2 if keep is None else x2 * keep
                    ga = torch.mm(gh.t(), xd).mul_(scale)
                if need_x and keep is None:
                    gx.addmm_(gh, a_cat, alpha=scale)
                elif need_x:
                    gx.add_(torch.mm(gh, a_cat).mul_(keep).mul_(scale))
        grad_a, r0 = [], 0
        for r, adt, na in zip(ctx.ranks, ctx.a_dtypes, need_a):
            grad_a.append(ga[r0:r0 + r].to(adt) if na else None)
            r0 += r
        return (gx.view(ctx.shape) if need_x else None, None, None, None, None, *([None] * (2 * n)), *grad_a,
                *grad_b)


def lora_group(x, weights, lora_a, lora_b, scaling, dropout_p=0.0, biases=None, impl=None):
    """Fused frozen-base LoRA projections sharing input ``x`` (..., K); returns a tuple of (..., N_i).

    weights: frozen (N_i, K); lora_a: (r_i, K); lora_b: (N_i, r_i); biases: frozen (N_i,) or None.
    One dropout mask (probability ``dropout_p``) is shared by the whole group. ``impl``: auto | triton | torch.
    """
    n = len(weights)
    if not (n == len(lora_a) == len(lora_b)) or n == 0:
        raise ValueError("lora_group needs the same number (>= 1) of weights, lora_a and lora_b")
    K = x.shape[-1]
    for w, a, b in zip(weights, lora_a, lora_b):
        if w.shape[1] != K or a.shape[1] != K or b.shape != (w.shape[0], a.shape[0]):
            raise ValueError(f"lora_group: shapes do not line up: x (..., {K}), W {tuple(w.shape)}, "
                             f"A {tuple(a.shape)}, B {tuple(b.shape)}")
        if w.requires_grad:
            raise ValueError("lora_group computes no base-weight gradient; the base weights must be frozen")
        if not w.device == a.device == b.device == x.device:  # a kernel would read another device's pointer
            raise ValueError(f"lora_group: x on {x.device}, W on {w.device}, A on {a.device}, B on {b.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    # auto: Triton for 16-bit CUDA tensors only; fp32 stays on the exact torch path (the kernels' fp32 dots are
    # TF32 on a GPU, about 1e-3 relative error, as in llm2vec_kernels.attention), and CPU tensors too.
    rank_sum = sum(a.shape[0] for a in lora_a)
    fits = fits_one_tile(rank_sum)
    impl = resolve_impl("lora", impl, x, auto_dtypes=(torch.float16, torch.bfloat16), fits=fits)
    if impl == "triton" and x.dtype not in KERNEL_DTYPES:  # the reference takes any float (fp64 for checks)
        raise TypeError(f"lora_group: unsupported dtype {x.dtype} for impl='triton' (fp16, bf16 or fp32)")
    if impl == "triton" and not fits:
        raise ValueError(f"lora_group: impl='triton' holds the group's summed rank ({rank_sum}) in one tile, "
                         f"at most {MAX_BLOCK_N} (a larger one spills or exceeds shared memory); use impl='auto' "
                         f"or 'torch', or a smaller rank")
    biases = list(biases) if biases is not None else [None] * n
    if any(b is not None and b.device != x.device for b in biases):
        raise ValueError(f"lora_group: a bias is not on x's device {x.device}")
    if any(b is not None and b.requires_grad for b in biases):  # its backward returns no bias gradient
        raise ValueError("lora_group computes no bias gradient; the base biases must be frozen")
    return _LoraGroupFn.apply(x, impl, float(dropout_p), float(scaling), n, *weights, *biases, *lora_a, *lora_b)
