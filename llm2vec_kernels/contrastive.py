"""In-batch contrastive (InfoNCE) loss with hard and cross-rank negatives.

    loss = mean_i [ logsumexp_j s_ij - s_i,t(i) ],   s_ij = cos(q_i, c_j) / T

over queries q (B, E) and candidates c (N, E); c is this rank's d (M = B*(1+n) rows, d[:B] positives,
d[B:] hard negatives) or, with ``gather_across_ranks``, every rank's d stacked rank-major, so query i
on rank r has its positive at t(i) = r*M + i.

The Triton path never builds the (B, N) score matrix:

* ``_row_inv_norm_kernel``   a_i = 1/max(||q_i||, eps), b_j = 1/max(||c_j||, eps) in fp32. Normalisation is
                             folded into the score tiles (s_ij = a_i b_j (q_i . c_j) / T), so no normalised
                             copies of q or c exist and the dot products see the exact input values.
* ``_contrastive_fwd_kernel`` one program per (query block, candidate split): streams its candidate blocks
                             with ``tl.dot`` (fp32 accumulation over E), keeps an online base-2 log-sum-exp
                             (running max m, running sum l) and picks the positive logit by column index.
* ``_lse_combine_kernel``    merges the per-split (m, l, positive) partials into the row LSE and row loss.
* ``_contrastive_bwd_scores_kernel`` recomputes score tiles and writes dL/ds (up to a scale) into a bounded
                             buffer, in the input dtype; cuBLAS then does the two big products; and
* ``_normalize_bwd_kernel``  applies the backward of x -> x/||x|| to them, in place.

Why the backward materialises a bounded slice of dL/ds: E is up to 4096, so a per-row-block dQ accumulator
(BLOCK_M x E fp32) does not fit in registers. The backward therefore works in chunks of at most
``_BWD_BUFFER_BYTES`` (256 MiB): query-row chunks for dq, candidate-column chunks for dc (two score
recomputes), or a single pass writing both buffers when the whole (B, N) block fits. Memory stays
O((B + N) E + buffer), the GEMMs run on tensor cores at cuBLAS speed, and nothing uses atomics, so the
result is deterministic.

fp32 inputs use IEEE fp32 dot products (no TF32); fp16/bf16 inputs accumulate in fp32. The loss is fp32.

In-batch false negatives (opt-in, ``q_keys`` / ``d_keys``). Each text carries an integer key (equal texts, equal
keys); ``q_keys[i]`` is the key of query i's positive, ``d_keys`` (gathered like d, rank-major, without gradient) one
per candidate. Candidate j is a false negative of query i when it is another copy of the positive:

    F(i) = { j != t(i) : k_j = q_keys[i] },   loss_i = logsumexp_{j not in F(i)} s_ij - s_i,t(i)

i.e. s_ij = -inf on F(i): its softmax weight is 0, so c_j gets no gradient from query i (nor q_i from c_j). t(i) is
never in F(i), so every row's LSE stays finite. Without keys every j != t(i) is a negative (llm2vec's loss) and the
kernels run the code they ran before (``HAS_KEYS`` is a constexpr; the key pointers go unread). With keys the
kernels compare int32 ids of the keys (:func:`_dense_ids`, exact), and |F| over this rank's queries is returned on
request (``return_masked``, counted from the ids, :func:`_count_false_negatives`) for the trainer's log.
"""
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import KERNEL_DTYPES, on_input_device, resolve_impl

_LOG2E = 1.4426950408889634
_NORM_EPS = 1e-12  # same clamp as F.normalize
_BWD_BUFFER_BYTES = 256 << 20


# ----------------------------------------------------------------------------------------------
# Cross-rank gather and the torch reference
# ----------------------------------------------------------------------------------------------

class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns this rank's slice of the summed upstream gradients.

    Every rank's loss depends on every rank's candidates, so d(sum_r loss_r)/d(x_s) is the sum over
    ranks of the gradient each one computed for slice s: an all-reduce, then keep our slice.
    """

    @staticmethod
    def forward(ctx, x):
        world = dist.get_world_size()
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
        sizes = [int(s.item()) for s in sizes]
        if len(set(sizes)) != 1:
            raise ValueError(f"all ranks must contribute the same number of rows, got {sizes}")
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x):
    """(n, E) on each rank -> (world * n, E), rank-major; gradients flow back to their owners."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def _check_inputs(q, d):
    if q.dim() != 2 or d.dim() != 2 or q.shape[1] != d.shape[1]:
        raise ValueError(f"expected q (B, E) and d (M, E), got {tuple(q.shape)} and {tuple(d.shape)}")
    if q.shape[0] == 0:
        raise ValueError("contrastive_loss: empty batch")
    B = q.shape[0]
    if d.shape[0] < B or d.shape[0] % B != 0:
        raise ValueError(f"d must hold B*(1+n) rows with B = {B}, got {d.shape[0]}")


def _zero_tiny_rows(x):
    """``x`` with its rows of norm below eps (1e-12) set to zero: such a row's normalised vector is taken as 0 (and
    its gradient is 0), on both paths. F.normalize would give x / eps, which the Triton backward's scaling leaves
    out of the other side's gradient (it keeps fp16 buffers from flushing, :func:`_unclamped_scale`); a pooled
    hidden state is never that small, so this costs one norm and one select per call and changes nothing else."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # fp16's own sum of squares overflows
    tiny = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc) < _NORM_EPS
    return torch.where(tiny, torch.zeros((), dtype=x.dtype, device=x.device), x)


def _check_keys(q, d, q_keys, d_keys):
    """(q_keys, d_keys) as contiguous int64 tensors on q's device, or (None, None): q_keys (B,), d_keys (M,)."""
    if q_keys is None and d_keys is None:
        return None, None
    if q_keys is None or d_keys is None:
        raise ValueError("contrastive_loss: give both q_keys and d_keys, or neither")
    for name, k, n in (("q_keys", q_keys, q.shape[0]), ("d_keys", d_keys, d.shape[0])):
        if not torch.is_tensor(k) or k.dim() != 1 or k.shape[0] != n:
            raise ValueError(f"contrastive_loss: {name} must be a ({n},) tensor, got "
                             f"{tuple(k.shape) if torch.is_tensor(k) else type(k).__name__}")
        if k.dtype.is_floating_point or k.dtype.is_complex or k.dtype == torch.bool:
            raise TypeError(f"contrastive_loss: {name} must hold integers, got {k.dtype}")
        if k.device != q.device:
            raise ValueError(f"contrastive_loss: {name} on {k.device} but q on {q.device}")
    return q_keys.to(torch.int64).contiguous(), d_keys.to(torch.int64).contiguous()


def _gathered(gather_across_ranks):
    return bool(gather_across_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _all_gather_keys(k):
    """(n,) integer keys on each rank -> (world * n,), rank-major as :func:`all_gather_with_grad`; no gradient."""
    out = [torch.empty_like(k) for _ in range(dist.get_world_size())]
    dist.all_gather(out, k)
    return torch.cat(out)


def _global_layout(q, d, gather_across_ranks, d_keys=None):
    """Return (candidates this rank scores, index of query 0's positive among them, their keys or None).

    Query i's positive is candidate ``offset + i``: rank r's block starts at r*M in the gathered set, and so do
    the keys of its candidates.
    """
    _check_inputs(q, d)
    if _gathered(gather_across_ranks):
        keys = None if d_keys is None else _all_gather_keys(d_keys)
        return all_gather_with_grad(d), dist.get_rank() * d.shape[0], keys
    return d, 0, d_keys


def false_negative_mask(q_keys, c_keys, offset):
    """(B, N) bool, F_ij = [c_keys[j] == q_keys[i] and j != offset + i]: the candidates left out of query i's
    log-sum-exp (copies of its positive t(i) = offset + i other than t(i) itself)."""
    B, N = q_keys.shape[0], c_keys.shape[0]
    t = offset + torch.arange(B, device=q_keys.device)
    return (q_keys[:, None] == c_keys[None, :]) & (torch.arange(N, device=q_keys.device)[None, :] != t[:, None])


def contrastive_loss_reference(q, d, *, temperature=0.05, gather_across_ranks=False, q_keys=None, d_keys=None,
                               return_masked=False):
    """q (B, E) queries, d (M, E) candidates with M = B*(1+n): d[i] is query i's positive, d[B:] hard negatives.

    Scores are cosine similarities / temperature; the loss is the mean over queries of
    logsumexp_j(s_ij) - s_i,pos. Computed in fp32 (or fp64 for fp64 inputs). A row of norm below 1e-12 counts as
    zero (:func:`_zero_tiny_rows`). With ``q_keys`` / ``d_keys`` the false negatives F (:func:`false_negative_mask`)
    score -inf. ``return_masked``: (loss, |F| as an int64 0-dim tensor).
    """
    q_keys, d_keys = _check_keys(q, d, q_keys, d_keys)
    q, d = _zero_tiny_rows(q), _zero_tiny_rows(d)
    cands, offset, c_keys = _global_layout(q, d, gather_across_ranks, d_keys)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    target = offset + torch.arange(q.shape[0], device=q.device)
    qn = F.normalize(q.to(cdt), dim=-1)
    dn = F.normalize(cands.to(cdt), dim=-1)
    scores = qn @ dn.t() / temperature  # (B, N)
    masked = torch.zeros((), dtype=torch.int64, device=q.device)
    if q_keys is not None:
        fn = false_negative_mask(q_keys, c_keys, offset)
        scores = scores.masked_fill(fn, float("-inf"))
        masked = fn.sum()
    loss = F.cross_entropy(scores, target)
    return (loss, masked) if return_masked else loss


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _row_inv_norm_kernel(
    x_ptr, out_ptr,
    R, E,
    stride_xr, stride_xe,
    eps,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # x (R, E) any float dtype -> out (R,) fp32 = 1 / max(||x_r||, eps)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    row_off = rows.to(tl.int64)[:, None] * stride_xr
    sumsq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        x = tl.load(x_ptr + row_off + es.to(tl.int64)[None, :] * stride_xe,
                    mask=rmask[:, None] & (es[None, :] < E), other=0.0).to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
    inv = 1.0 / tl.maximum(tl.sqrt_rn(sumsq), eps)
    tl.store(out_ptr + rows, inv, mask=rmask)


@triton.jit
def _dot_tile(
    q_ptr, c_ptr, rows, cols, rmask, cmask, E,
    stride_qb, stride_qe, stride_cn, stride_ce,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # raw dot products q[rows] . c[cols] over all of E, fp32 accumulator (BLOCK_M, BLOCK_N).
    # The candidate tile is loaded as (BLOCK_K, BLOCK_N), i.e. already transposed for tl.dot.
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qb
    c_cols = c_ptr + cols.to(tl.int64)[None, :] * stride_cn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, E, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < E
        qt = tl.load(q_rows + ks.to(tl.int64)[None, :] * stride_qe, mask=rmask[:, None] & kmask[None, :], other=0.0)
        ct = tl.load(c_cols + ks.to(tl.int64)[:, None] * stride_ce, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:  # CPU interpreter only: it mis-multiplies bf16 operands; bf16 x bf16 is exact in fp32
            acc = tl.dot(qt.to(tl.float32), ct.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(qt, ct, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _copies(q_key, c_key, cols, target):
    # (BLOCK_M, BLOCK_N) bool: column j is a false negative of row i, F(i): its key id is that of i's positive,
    # and j is not t(i) itself
    return (c_key[None, :] == q_key[:, None]) & (cols[None, :] != target[:, None])


@triton.jit
def _lse_shift(m, HAS_KEYS: tl.constexpr):
    # the running max an online log-sum-exp shifts by. With keys a row may have seen only masked scores so far
    # (m = -inf, sum 0): it shifts by 0 there, since exp2(-inf - -inf) is NaN. Without keys every row has a finite
    # score in every tile and split, and m is returned as it is
    shift = m
    if HAS_KEYS:
        shift = tl.where(m == float("-inf"), 0.0, m)
    return shift


@triton.jit
def _contrastive_fwd_kernel(
    q_ptr, c_ptr, q_inv_ptr, c_inv_ptr, q_key_ptr, c_key_ptr, part_ptr,
    B, N, E, pos_offset, blocks_per_split, num_splits,
    stride_qb, stride_qe, stride_cn, stride_ce, stride_pk, stride_ps,
    scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, HAS_KEYS: tl.constexpr,
):
    # q (B, E), c (N, E), q_inv (B,), c_inv (N,) -> part (3, num_splits, B) fp32: [m, l, positive], base 2.
    # HAS_KEYS: q_key (B,), c_key (N,) int32 ids (:func:`_dense_ids`: equal iff the int64 keys are); a false
    # negative (c_key[j] == q_key[i], j != t(i)) scores -inf. Without keys the key pointers are never read.
    #
    # Log2 trick: with s2_ij = s_ij * log2(e) we have exp(s - m) = exp2(s2 - m2), and exp2 is the native
    # instruction. log2(e)/T is folded into the row factor a_i once per program, so every score costs
    # two multiplies: s2_ij = (q_i . c_j) * (a_i log2(e)/T) * b_j.
    #
    # Split-N: program (row block, split) covers candidate blocks [split*bps, (split+1)*bps). Consecutive
    # programs share a row block (different splits) or a split (different row blocks), so the programs
    # resident at one time read only ~(#SMs/num_splits + num_splits) distinct E-wide panels per step
    # (~25 MB at E = 4096 on an H100, meant to stay in L2) instead of one 1 MB q panel per SM.
    pid = tl.program_id(0)
    pid_m = pid // num_splits
    pid_s = pid % num_splits
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    a = tl.load(q_inv_ptr + rows, mask=rmask, other=0.0) * scale_log2
    target = pos_offset + rows

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    pos = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_KEYS:
        q_key = tl.load(q_key_ptr + rows, mask=rmask, other=0)
    c_begin = pid_s * blocks_per_split * BLOCK_N
    c_end = tl.minimum(c_begin + blocks_per_split * BLOCK_N, N)
    for c0 in range(c_begin, c_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        acc = _dot_tile(q_ptr, c_ptr, rows, cols, rmask, cmask, E, stride_qb, stride_qe, stride_cn, stride_ce,
                        BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST)
        b = tl.load(c_inv_ptr + cols, mask=cmask, other=0.0)
        s2 = acc * a[:, None] * b[None, :]
        s2 = tl.where(cmask[None, :], s2, float("-inf"))
        if HAS_KEYS:
            c_key = tl.load(c_key_ptr + cols, mask=cmask, other=0)
            s2 = tl.where(_copies(q_key, c_key, cols, target), float("-inf"), s2)
        # The positive is found by index, not by value: duplicate candidates tie in score but only
        # column t(i) is the label.
        pos += tl.sum(tl.where(cols[None, :] == target[:, None], s2, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(s2, axis=1))
        m_ref = _lse_shift(m_new, HAS_KEYS)  # a tile whose every column is masked for a row keeps m = -inf
        l_i = l_i * tl.exp2(m_i - m_ref) + tl.sum(tl.exp2(s2 - m_ref[:, None]), axis=1)
        m_i = m_new

    out = part_ptr + pid_s * stride_ps + rows
    tl.store(out, m_i, mask=rmask)
    tl.store(out + stride_pk, l_i, mask=rmask)
    tl.store(out + 2 * stride_pk, pos, mask=rmask)


@triton.jit
def _lse_combine_kernel(
    part_ptr, lse2_ptr, loss_ptr,
    B, num_splits,
    stride_pk, stride_ps,
    BLOCK: tl.constexpr, HAS_KEYS: tl.constexpr,
):
    # part (3, num_splits, B) -> lse2 (B,) base-2 LSE, loss (B,) natural-log per-row loss.
    # Merging (m1, l1) and (m2, l2): m = max(m1, m2), l = l1 2^(m1-m) + l2 2^(m2-m).
    # HAS_KEYS: a split whose every candidate is a false negative of a row holds (m, l) = (-inf, 0) for it.
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < B
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK], dtype=tl.float32)
    pos = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, num_splits):
        p = part_ptr + s * stride_ps + rows
        m_s = tl.load(p, mask=rmask, other=0.0)
        l_s = tl.load(p + stride_pk, mask=rmask, other=1.0)
        pos += tl.load(p + 2 * stride_pk, mask=rmask, other=0.0)
        m_new = tl.maximum(m, m_s)
        m_ref = _lse_shift(m_new, HAS_KEYS)  # two empty partials
        l = l * tl.exp2(m - m_ref) + l_s * tl.exp2(m_s - m_ref)
        m = m_new
    # (m - pos) first: two scores of similar size, so their difference is (nearly) exact and the small loss
    # does not inherit the rounding of the large lse (|s2| reaches log2(e)/T ~ 29 at T = 0.05).
    tl.store(lse2_ptr + rows, m + tl.log2(l), mask=rmask)
    tl.store(loss_ptr + rows, ((m - pos) + tl.log2(l)) * 0.6931471805599453, mask=rmask)  # x ln 2


@triton.jit
def _contrastive_bwd_scores_kernel(
    q_ptr, c_ptr, q_inv_ptr, c_inv_ptr, lse2_ptr, q_key_ptr, c_key_ptr,
    ra_ptr, ca_ptr, ga_ptr, rb_ptr, cb_ptr, gb_ptr,
    row0, n_rows, col0, n_cols, E, pos_offset,
    stride_qb, stride_qe, stride_cn, stride_ce,
    stride_gar, stride_gac, stride_gbr, stride_gbc,
    scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, TWO_OUTPUTS: tl.constexpr, HAS_KEYS: tl.constexpr,
):
    # Tile (rows row0 + [0, n_rows), cols col0 + [0, n_cols)) of
    #   G_ij = softmax_j(s_i)_j - [j == t(i)]          (dL/ds_ij up to the factor g / B)
    # with softmax_j = 0 on the false negatives when HAS_KEYS (the forward's mask, recomputed from the keys),
    # written as ga[i - row0, j - col0] = G_ij * ra_i * ca_j, and with TWO_OUTPUTS also
    # gb[...] = G_ij * rb_i * cb_j, in the buffers' dtype. The launcher passes ca = b / max(b) (for
    # dq = ga @ c) or ra = a / max(a) (for dc = ga^T @ q), ones otherwise: the normalisation goes into the
    # products while every entry stays in [-1, 1], so an fp16 buffer neither overflows nor flushes the
    # small probabilities; the constant factors (g / (B T) and the maxima) are applied in fp32 afterwards.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(n_rows, BLOCK_M)
    num_pid_n = tl.cdiv(n_cols, BLOCK_N)
    # grouped tile order: GROUP_M row blocks sweep the column blocks together (L2 reuse of both panels)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    lrows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    lcols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = lrows < n_rows
    cmask = lcols < n_cols
    rows = row0 + lrows
    cols = col0 + lcols
    acc = _dot_tile(q_ptr, c_ptr, rows, cols, rmask, cmask, E, stride_qb, stride_qe, stride_cn, stride_ce,
                    BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST)
    a = tl.load(q_inv_ptr + rows, mask=rmask, other=0.0) * scale_log2
    b = tl.load(c_inv_ptr + cols, mask=cmask, other=0.0)
    lse2 = tl.load(lse2_ptr + rows, mask=rmask, other=0.0)
    p = tl.exp2(acc * a[:, None] * b[None, :] - lse2[:, None])
    if HAS_KEYS:
        q_key = tl.load(q_key_ptr + rows, mask=rmask, other=0)
        c_key = tl.load(c_key_ptr + cols, mask=cmask, other=0)
        p = tl.where(_copies(q_key, c_key, cols, pos_offset + rows), 0.0, p)
    g = p - tl.where(cols[None, :] == (pos_offset + rows)[:, None], 1.0, 0.0)
    mask = rmask[:, None] & cmask[None, :]
    lrows64 = lrows.to(tl.int64)[:, None]
    lcols64 = lcols.to(tl.int64)[None, :]
    ra = tl.load(ra_ptr + rows, mask=rmask, other=0.0)
    ca = tl.load(ca_ptr + cols, mask=cmask, other=0.0)
    tl.store(ga_ptr + lrows64 * stride_gar + lcols64 * stride_gac,
             (g * ra[:, None] * ca[None, :]).to(ga_ptr.dtype.element_ty), mask=mask)
    if TWO_OUTPUTS:
        rb = tl.load(rb_ptr + rows, mask=rmask, other=0.0)
        cb = tl.load(cb_ptr + cols, mask=cmask, other=0.0)
        tl.store(gb_ptr + lrows64 * stride_gbr + lcols64 * stride_gbc,
                 (g * rb[:, None] * cb[None, :]).to(gb_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _normalize_bwd_kernel(
    x_ptr, inv_ptr, gh_ptr, out_ptr, scale_ptr,
    R, E,
    stride_xr, stride_xe, stride_gr, stride_ge, stride_or, stride_oe,
    inv_eps,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # Backward of xhat = x * inv, inv = 1/max(||x||, eps), given u = scale * gh = dL/dxhat:
    #   dL/dx = inv * (u - xhat (xhat . u))
    # (the Jacobian of x/||x|| is (I - xhat xhat^T)/||x||). Rows whose norm was clamped to eps are a
    # plain scaling x/eps, so their projection term is dropped, as in F.normalize's autograd.
    # x, gh, out (R, E); inv (R,) fp32; scale a 1-element fp32 tensor. out may alias gh (each element
    # is read before it is written by the same program).
    scale = tl.load(scale_ptr)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    rows64 = rows.to(tl.int64)[:, None]
    inv = tl.load(inv_ptr + rows, mask=rmask, other=0.0)
    dot = tl.zeros([BLOCK_R], dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        es64 = es.to(tl.int64)[None, :]
        mask = rmask[:, None] & (es[None, :] < E)
        x = tl.load(x_ptr + rows64 * stride_xr + es64 * stride_xe, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gh_ptr + rows64 * stride_gr + es64 * stride_ge, mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(x * u, axis=1)
    proj = tl.where(inv < inv_eps, dot * inv * scale, 0.0)  # xhat . u
    for e0 in range(0, E, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        es64 = es.to(tl.int64)[None, :]
        mask = rmask[:, None] & (es[None, :] < E)
        x = tl.load(x_ptr + rows64 * stride_xr + es64 * stride_xe, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gh_ptr + rows64 * stride_gr + es64 * stride_ge, mask=mask, other=0.0).to(tl.float32) * scale
        dx = inv[:, None] * (u - x * (inv * proj)[:, None])
        tl.store(out_ptr + rows64 * stride_or + es64 * stride_oe, dx.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration (fixed; the tests compile exactly these for sm_90 and sm_80)
# ----------------------------------------------------------------------------------------------

_ROW_BLOCK_R, _ROW_BLOCK_E, _ROW_WARPS = 8, 512, 4   # the two row-wise kernels
_COMBINE_BLOCK = 256
_GROUP_M = 8
_MIN_SPLITS = 8  # see the split-N note in _contrastive_fwd_kernel


def launch_config(dtype, interpret=False):
    """Tile config of the two score kernels for an input dtype (shared by the launchers and the tests).

    INPUT_PRECISION only matters for fp32 ("ieee": no TF32). UPCAST is True only under the CPU
    interpreter with bf16 inputs; GPU launches never select it.
    """
    if dtype == torch.float32:
        # IEEE fp32 dot products run on FMA units and hold both operands in registers: smaller tiles.
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, INPUT_PRECISION="ieee", num_warps=8, num_stages=2)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, INPUT_PRECISION="tf32", num_warps=8, num_stages=3)
    cfg["UPCAST"] = bool(interpret and dtype == torch.bfloat16)
    return cfg


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_programs_target(device):
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4


def _check_launch(q, c):
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"contrastive_loss (triton): q dtype must be fp16/bf16/fp32, got {q.dtype}; use impl='torch'")
    if c.dtype != q.dtype:
        raise TypeError(f"contrastive_loss (triton): q and d must share a dtype, got {q.dtype} and {c.dtype}")
    if q.device != c.device:
        raise ValueError(f"contrastive_loss (triton): q on {q.device} but d on {c.device}")
    if q.stride(-1) != 1 or c.stride(-1) != 1:
        raise ValueError("contrastive_loss (triton): the embedding dim of q and d must be contiguous (stride 1)")


def _dense_ids(q_keys, c_keys):
    """int64 keys -> int32 ids in [0, B + N) with id_a == id_b iff key_a == key_b (rank of the key among the distinct
    ones). The kernels compare 32-bit ids: int64 keys held across a score tile cost the 16-bit forward ~64 registers
    a thread (it spilled at sm_90). Sort, compare and prefix sum: fixed sizes, no host sync."""
    keys = torch.cat([q_keys, c_keys])
    sorted_keys, order = torch.sort(keys)
    rank = torch.zeros_like(keys)
    rank[1:] = torch.cumsum((sorted_keys[1:] != sorted_keys[:-1]).to(torch.int64), 0)
    ids = torch.empty(keys.shape, dtype=torch.int32, device=keys.device)
    ids[order] = rank.to(torch.int32)
    return ids[:q_keys.shape[0]], ids[q_keys.shape[0]:]


def _count_false_negatives(q_ids, c_ids, offset):
    """|F| = sum_i #{j : c_j = q_i} - #{i : c_t(i) = q_i} from the dense ids (:func:`_dense_ids`) without the (B, N)
    comparison: a histogram of the candidates' ids (scatter-add, no host sync) read at each query's id."""
    B = q_ids.shape[0]
    hist = torch.zeros(B + c_ids.shape[0], dtype=torch.int64, device=c_ids.device)
    hist.scatter_add_(0, c_ids.to(torch.int64), torch.ones_like(c_ids, dtype=torch.int64))
    return hist[q_ids.to(torch.int64)].sum() - (c_ids[offset:offset + B] == q_ids).sum()


@on_input_device
def _row_inv_norm(x):
    R, E = x.shape
    out = torch.empty(R, dtype=torch.float32, device=x.device)
    _row_inv_norm_kernel[(triton.cdiv(R, _ROW_BLOCK_R),)](
        x, out, R, E, x.stride(0), x.stride(1), _NORM_EPS,
        BLOCK_R=_ROW_BLOCK_R, BLOCK_E=_ROW_BLOCK_E, num_warps=_ROW_WARPS)
    return out


@on_input_device
def _contrastive_fwd(q, c, temperature, pos_offset, num_splits=None, q_keys=None, c_keys=None):
    """q (B, E), c (N, E) [, q_keys (B,), c_keys (N,) int32 ids, :func:`_dense_ids`] -> (loss () fp32, lse2 (B,) fp32,
    q_inv (B,), c_inv (N,), number of false negatives () int64 (0 without keys))."""
    _check_launch(q, c)
    B, E = q.shape
    N = c.shape[0]
    if not 0 <= pos_offset <= N - B:
        raise ValueError(f"positives [{pos_offset}, {pos_offset + B}) fall outside the {N} candidates")
    cfg = launch_config(q.dtype, not q.is_cuda)
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    q_inv, c_inv = _row_inv_norm(q), _row_inv_norm(c)

    n_rb, n_cb = triton.cdiv(B, BM), triton.cdiv(N, BN)
    if num_splits is None:
        num_splits = max(_MIN_SPLITS, triton.cdiv(_num_programs_target(q.device), n_rb))
    num_splits = max(1, min(int(num_splits), n_cb))
    blocks_per_split = triton.cdiv(n_cb, num_splits)
    num_splits = triton.cdiv(n_cb, blocks_per_split)  # no empty splits

    keyed = q_keys is not None
    part = torch.empty((3, num_splits, B), dtype=torch.float32, device=q.device)
    _contrastive_fwd_kernel[(n_rb * num_splits,)](
        q, c, q_inv, c_inv, q_keys if keyed else q_inv, c_keys if keyed else c_inv, part,
        B, N, E, pos_offset, blocks_per_split, num_splits,
        q.stride(0), q.stride(1), c.stride(0), c.stride(1), part.stride(0), part.stride(1),
        _LOG2E / temperature,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=cfg["BLOCK_K"], INPUT_PRECISION=cfg["INPUT_PRECISION"],
        UPCAST=cfg["UPCAST"], HAS_KEYS=keyed, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    lse2 = torch.empty(B, dtype=torch.float32, device=q.device)
    row_loss = torch.empty(B, dtype=torch.float32, device=q.device)
    _lse_combine_kernel[(triton.cdiv(B, _COMBINE_BLOCK),)](
        part, lse2, row_loss, B, num_splits, part.stride(0), part.stride(1), BLOCK=_COMBINE_BLOCK, HAS_KEYS=keyed,
        num_warps=4)
    if keyed:
        masked = _count_false_negatives(q_keys, c_keys, pos_offset)
    else:
        masked = torch.zeros((), dtype=torch.int64, device=q.device)
    return row_loss.mean(), lse2, q_inv, c_inv, masked


@on_input_device
def _normalize_bwd_(x, inv, gh, scale, out=None):
    """gh (R, E) holding dL/dxhat / scale becomes dL/dx: in place, or written to ``out`` (another dtype) if given."""
    R, E = x.shape
    out = gh if out is None else out
    _normalize_bwd_kernel[(triton.cdiv(R, _ROW_BLOCK_R),)](
        x, inv, gh, out, scale, R, E,
        x.stride(0), x.stride(1), gh.stride(0), gh.stride(1), out.stride(0), out.stride(1),
        1.0 / _NORM_EPS,
        BLOCK_R=_ROW_BLOCK_R, BLOCK_E=_ROW_BLOCK_E, num_warps=_ROW_WARPS)
    return out


def _unclamped_scale(inv):
    """(max of the unclamped entries of ``inv`` (1 when there is none), inv / that max with clamped entries 0);
    no host sync."""
    unclamped = inv < 1.0 / _NORM_EPS
    m = torch.where(unclamped, inv, torch.zeros_like(inv)).max()
    m = torch.where(m > 0, m, torch.ones_like(m))
    return m, torch.where(unclamped, inv / m, torch.zeros_like(inv))


@on_input_device
def _contrastive_bwd(grad, q, c, q_inv, c_inv, lse2, temperature, pos_offset, need_q=True, need_c=True,
                     buffer_bytes=None, q_keys=None, c_keys=None):
    """dL/dq (B, E), dL/dc (N, E) in the input dtype (None where not needed).

    With G_ij = P_ij - [j == t(i)] (P_ij = 0 on the false negatives when keys are given) and g the upstream
    gradient of the mean loss:
        dL/dqhat_i = g/(B T) sum_j G_ij chat_j = g max(b)/(B T) * (ga @ c)_i,  ga_ij = G_ij b_j / max(b)
        dL/dchat_j = g/(B T) sum_i G_ij qhat_i = g max(a)/(B T) * (gb^T @ q)_j, gb_ij = G_ij a_i / max(a)
    then the normalisation backward turns dL/dxhat into dL/dx.
    """
    B, E = q.shape
    N = c.shape[0]
    cfg = launch_config(q.dtype, not q.is_cuda)
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    # A row whose norm was clamped to eps (a zero embedding) has inv = 1/eps but xhat = 0, so it adds nothing to
    # either product: leave it out of the max and give it scale 0. Else 1/eps would be the max, every other row's
    # scale ~1e-12: products of such tiny entries lose precision (in fp16 they would flush to 0).
    (a_max, row_scale), (b_max, col_scale) = _unclamped_scale(q_inv), _unclamped_scale(c_inv)
    ones_r = torch.ones(B, dtype=torch.float32, device=q.device)
    ones_c = torch.ones(N, dtype=torch.float32, device=q.device)
    base = grad.to(torch.float32) / (B * temperature)
    scale_q = (base * b_max).reshape(1)
    scale_c = (base * a_max).reshape(1)
    # fp16: the products before the normalisation backward can leave fp16's range where dL/dq, dL/dc do not:
    # (ga @ c)_i is up to 2 max|c| and (gb^T @ q)_j up to B max|q| (every query's mass on one candidate), so an
    # element above 65504 / B is enough. Their buffers and products run in fp32 (bf16 and fp32 have the range):
    # fp32 copies of q and c (B E + N E elements, each only where its product needs it) and fp32 scores buffers,
    # within the same buffer_bytes.
    work = torch.float32 if q.dtype == torch.float16 else q.dtype
    q_w, c_w = q.to(work) if need_c else None, c.to(work) if need_q else None
    buffer_elems = max(1, (buffer_bytes or _BWD_BUFFER_BYTES) // torch.empty((), dtype=work).element_size())
    dq = torch.empty(q.shape, dtype=work, device=q.device) if need_q else None
    dc = torch.empty(c.shape, dtype=work, device=q.device) if need_c else None

    keyed = q_keys is not None
    keys = (q_keys, c_keys) if keyed else (q_inv, c_inv)  # never read without keys

    def scores(row0, n_rows, col0, n_cols, out_a, scales_a, out_b=None, scales_b=None):
        grid = (triton.cdiv(n_rows, BM) * triton.cdiv(n_cols, BN),)
        two = out_b is not None
        out_b, scales_b = (out_b, scales_b) if two else (out_a, scales_a)
        _contrastive_bwd_scores_kernel[grid](
            q, c, q_inv, c_inv, lse2, *keys, *scales_a, out_a, *scales_b, out_b,
            row0, n_rows, col0, n_cols, E, pos_offset,
            q.stride(0), q.stride(1), c.stride(0), c.stride(1),
            out_a.stride(0), out_a.stride(1), out_b.stride(0), out_b.stride(1),
            _LOG2E / temperature,
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=cfg["BLOCK_K"], GROUP_M=_GROUP_M,
            INPUT_PRECISION=cfg["INPUT_PRECISION"], UPCAST=cfg["UPCAST"], TWO_OUTPUTS=two, HAS_KEYS=keyed,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    def buffer(n_rows, n_cols):
        # row stride padded to 64 elements: aligned, vectorised stores for any N (cuBLAS takes the stride)
        return torch.empty((n_rows, triton.cdiv(n_cols, 64) * 64), dtype=work, device=q.device)[:, :n_cols]

    for_dq, for_dc = (ones_r, col_scale), (row_scale, ones_c)
    n_buffers = int(need_q) + int(need_c)
    if n_buffers and B * N * n_buffers <= buffer_elems:
        # everything fits: one score recompute fills the buffer(s)
        bufs = [buffer(B, N) for _ in range(n_buffers)]
        if need_q and need_c:
            scores(0, B, 0, N, bufs[0], for_dq, bufs[1], for_dc)
        else:
            scores(0, B, 0, N, bufs[0], for_dq if need_q else for_dc)
        if need_q:
            torch.mm(bufs[0], c_w, out=dq)
        if need_c:
            torch.mm(bufs[-1].t(), q_w, out=dc)
        del bufs
    else:
        if need_q:  # query-row chunks: dq rows are complete after one product
            rows = max(1, buffer_elems // N)
            rows = min(B, rows - rows % BM if rows >= BM else rows)
            buf = buffer(rows, N)
            for r0 in range(0, B, rows):
                r = min(rows, B - r0)
                scores(r0, r, 0, N, buf[:r], for_dq)
                torch.mm(buf[:r], c_w, out=dq[r0:r0 + r])
            del buf
        if need_c:  # candidate-column chunks: dc rows are complete after one product
            cols = max(1, buffer_elems // B)
            cols = min(N, cols - cols % BN if cols >= BN else cols)
            buf = buffer(B, cols)
            for c0 in range(0, N, cols):
                n = min(cols, N - c0)
                scores(0, B, c0, n, buf[:, :n], for_dc)
                torch.mm(buf[:, :n].t(), q_w, out=dc[c0:c0 + n])
            del buf
    if need_q:
        dq = _normalize_bwd_(q, q_inv, dq, scale_q, out=torch.empty_like(q) if work != q.dtype else None)
    if need_c:
        dc = _normalize_bwd_(c, c_inv, dc, scale_c, out=torch.empty_like(c) if work != c.dtype else None)
    return dq, dc


class _ContrastiveLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, c, temperature, pos_offset, num_splits, buffer_bytes, q_keys, c_keys):
        loss, lse2, q_inv, c_inv, masked = _contrastive_fwd(q, c, temperature, pos_offset, num_splits, q_keys, c_keys)
        ctx.save_for_backward(q, c, q_inv, c_inv, lse2, q_keys, c_keys)
        ctx.temperature, ctx.pos_offset, ctx.buffer_bytes = temperature, pos_offset, buffer_bytes
        ctx.mark_non_differentiable(masked)
        return loss, masked

    @staticmethod
    def backward(ctx, grad, _masked_grad):
        q, c, q_inv, c_inv, lse2, q_keys, c_keys = ctx.saved_tensors
        need_q, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dq, dc = _contrastive_bwd(grad, q, c, q_inv, c_inv, lse2, ctx.temperature, ctx.pos_offset,
                                  need_q=need_q, need_c=need_c, buffer_bytes=ctx.buffer_bytes,
                                  q_keys=q_keys, c_keys=c_keys)
        return dq, dc, None, None, None, None, None, None


def _contrastive_loss_triton(q, d, *, temperature=0.05, gather_across_ranks=False, num_splits=None,
                             buffer_bytes=None, q_keys=None, d_keys=None, return_masked=False):
    """The Triton path. ``num_splits`` / ``buffer_bytes`` override the launch heuristics (tests)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    q_keys, d_keys = _check_keys(q, d, q_keys, d_keys)
    q, d = _zero_tiny_rows(q), _zero_tiny_rows(d)  # as the reference: a row below eps is a zero vector
    cands, offset, c_keys = _global_layout(q, d, gather_across_ranks, d_keys)
    q = q if q.stride(-1) == 1 else q.contiguous()
    cands = cands if cands.stride(-1) == 1 else cands.contiguous()
    q_ids, c_ids = (None, None) if q_keys is None else _dense_ids(q_keys, c_keys)
    loss, masked = _ContrastiveLossFn.apply(q, cands, float(temperature), int(offset), num_splits, buffer_bytes,
                                            q_ids, c_ids)
    return (loss, masked) if return_masked else loss


def contrastive_loss(q, d, *, temperature=0.05, gather_across_ranks=False, impl=None, q_keys=None, d_keys=None,
                     return_masked=False):
    """In-batch InfoNCE: q (B, E), d (M, E) with M = B*(1+n); d[i] is query i's positive, d[B:] hard negatives.

    Cosine similarity / temperature, mean over queries, fp32 result. With ``gather_across_ranks`` under
    torch.distributed, candidates from every rank are scored (rank-major) and their gradients flow back
    to their owners; the loss is the mean over this rank's queries (averaging gradients over ranks then
    gives the global-batch gradient when every rank has the same B).
    q_keys (B,), d_keys (M,): integer keys of the texts (q_keys[i]: query i's positive's); a candidate other than
    query i's positive whose key is q_keys[i] is left out of query i's log-sum-exp (a false negative; the keys are
    gathered like d). ``return_masked``: (loss, number of (query, candidate) pairs left out, int64 0-dim tensor on
    q's device, this rank's queries only).
    impl: "auto" (Triton on CUDA, reference elsewhere), "triton" or "torch"; fp64 "auto" uses the reference.
    """
    backend = resolve_impl("contrastive", impl, q)
    if backend == "triton" and q.dtype == torch.float64 and (impl or "auto") == "auto":
        backend = "torch"
    fn = _contrastive_loss_triton if backend == "triton" else contrastive_loss_reference
    return fn(q, d, temperature=temperature, gather_across_ranks=gather_across_ranks, q_keys=q_keys, d_keys=d_keys,
              return_masked=return_masked)


# ----------------------------------------------------------------------------------------------
# The torch yardstick of the GPU check (llm2vec_kernels/gpu_check/contrastive.py) and the benchmark
# ----------------------------------------------------------------------------------------------

def _torch_same_dtype_loss(q, d, temperature):
    """What plain torch computes when everything stays in the input dtype (the error yardstick)."""
    qn, dn = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
    scores = qn @ dn.t() / temperature
    return F.cross_entropy(scores, torch.arange(q.shape[0], device=q.device))
