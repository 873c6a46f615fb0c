"""Fused in-batch contrastive loss: Triton path (CPU interpreter) vs the fp64 reference, cross-rank
gloo equivalence, GPU cross-compilation of every launched kernel variant, the tiny benchmark, and the
on-GPU check.

Accuracy standard (llm2vec_kernels.gpu_check.contrastive.contrastive_tolerance): the reference sees the same rounded inputs, so
|triton - ref64| may only be the kernel's arithmetic and its output rounding: FACTOR fp32 ulps of the LSE (1/T +
log N) for the fp32 loss, FACTOR ulps of the input dtype at the largest gradient entry, plus FACTOR times torch's
fp32 error on the same inputs. Each tolerance must also be under 5% of the largest value compared.
"""
import math
import os

import pytest
import torch

from engine.distributed import free_port
from llm2vec_kernels import contrastive as C
from llm2vec_kernels.contrastive import (
    _contrastive_loss_triton,
    _torch_same_dtype_loss,
    contrastive_loss,
    contrastive_loss_reference,
)
from llm2vec_kernels.gpu_check import contrastive as GC
from llm2vec_kernels.gpu_check.contrastive import _loss_and_grads

from .compile_variants import job_rows

FACTOR = 4.0


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _make(B, n, E, dtype, seed=0, dupes=False):
    """q (B, E), d (B*(1+n), E): positives correlate with their queries, row norms vary over ~e^±1."""
    g = torch.Generator().manual_seed(seed)
    M = B * (1 + n)
    q = torch.randn(B, E, generator=g, dtype=torch.float64)
    d = 0.7 * q[torch.arange(M) % B] + torch.randn(M, E, generator=g, dtype=torch.float64)
    q = q * torch.exp(0.5 * torch.randn(B, 1, generator=g, dtype=torch.float64))
    d = d * torch.exp(0.5 * torch.randn(M, 1, generator=g, dtype=torch.float64))
    if dupes:
        # identical texts give identical embeddings: repeated queries, repeated candidates, and a hard
        # negative that is an exact copy of its query's positive
        q[1::2] = q[0::2]
        d[1:B:2] = d[0:B:2]
        d[B] = d[0]
    return q.to(dtype), d.to(dtype)


def _check(kernel, torch_fp32, ref, dtype, T, what=""):
    # GC.contrastive_tolerance: fp32 ulps of the LSE for the (fp32) loss, dtype ulps of the largest entry for the
    # gradients (returned in the input dtype), plus torch's fp32 error on the same inputs.
    n_cand = kernel[2].shape[0]
    for name, k, t, r in zip(("loss", "dq", "dd"), kernel, torch_fp32, ref):
        assert torch.isfinite(k).all(), f"{what} {name}: non-finite"
        err = float((k - r).abs().max())
        terr = float((t - r).abs().max())
        tol = GC.contrastive_tolerance(name, r, terr, dtype, T, n_cand, FACTOR)
        assert tol < 0.05 * float(r.abs().max()), f"{what} {name}: tolerance {tol:.3e} is not small next to the values"
        assert err <= tol, f"{what} {name}: |triton - ref64| = {err:.3e} > {tol:.3e} (torch fp32: {terr:.3e})"


def _ref64(T):
    return lambda a, b: contrastive_loss_reference(a.double(), b.double(), temperature=T)


# ----------------------------------------------------------------------------------------------
# accuracy vs the fp64 reference (interpreter)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,n,E,dtype,T", [
    (5, 1, 3, torch.float32, 0.05),       # E = 3 (one padded K block)
    (7, 2, 64, torch.float32, 0.05),      # odd B, odd M = 21
    (9, 0, 3, torch.float32, 1.0),        # no hard negatives (M = B)
    (3, 1, 4096, torch.float32, 0.05),    # E = 4096: 128 K steps
    (5, 2, 64, torch.float16, 0.1),
    (6, 1, 64, torch.bfloat16, 0.05),
    (3, 1, 4096, torch.bfloat16, 0.02),
])
def test_matches_fp64_reference(B, n, E, dtype, T):
    q, d = _make(B, n, E, dtype, seed=B * 100 + E)
    ref = _loss_and_grads(_ref64(T), q, d)
    tor = _loss_and_grads(lambda a, b: _torch_same_dtype_loss(a.float(), b.float(), T), q, d)
    ker = _loss_and_grads(lambda a, b: contrastive_loss(a, b, temperature=T, impl="triton"), q, d)
    _check(ker, tor, ref, dtype, T, f"B={B} n={n} E={E} {dtype}")


@pytest.mark.parametrize("zero", ["query", "doc"])
def test_a_zero_embedding_leaves_the_other_rows_gradients_in_fp16(zero):
    """A zero row (norm clamped to eps, inverse norm 1e12) must not set the backward's scale: its normalised row is
    0 and adds nothing, and with it as the max every other row's fp16 scores gradient flushed to 0 (relative
    error 1.0 on the other side's whole gradient). The rows besides the zero one match the fp64 reference."""
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(16, 64, generator=g).half(), torch.randn(32, 64, generator=g).half()
    (q if zero == "query" else d)[3] = 0  # ids avoid "candidate": .ci/run selects the Triton 3.6 compile checks by name
    ker = _loss_and_grads(lambda a, b: contrastive_loss(a, b, impl="triton"), q, d)
    ref = _loss_and_grads(_ref64(0.05), q, d)
    keep_q = [i for i in range(16) if not (zero == "query" and i == 3)]
    keep_d = [i for i in range(32) if not (zero == "doc" and i == 3)]
    for k, r, keep in ((ker[1], ref[1], keep_q), (ker[2], ref[2], keep_d)):
        rel = float((k[keep].double() - r[keep]).norm() / r[keep].norm())
        assert rel < 2e-3, rel  # fp16: ~3.5e-4 (1.0 before)


@pytest.mark.parametrize("tiny", ["query", "doc"])
def test_a_row_below_eps_counts_as_zero_on_both_paths(tiny):
    """A row of norm between 0 and 1e-12 (fp32): F.normalize gives it x / eps, which the forward used but the
    Triton backward left out of the other side's gradient (relative error 0.2 on dd with a tiny query). Both paths
    now take it as a zero vector, so the Triton loss and every gradient row match the fp64 reference."""
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(4, 16, generator=g), torch.randn(8, 16, generator=g)
    (q if tiny == "query" else d)[1] = 1e-13 * torch.randn(16, generator=g)
    ker = _loss_and_grads(lambda a, b: contrastive_loss(a, b, impl="triton"), q, d)
    ref = _loss_and_grads(_ref64(0.05), q, d)
    assert abs(float(ker[0]) - float(ref[0])) < 1e-5
    for k, r in ((ker[1], ref[1]), (ker[2], ref[2])):
        assert float((k.double() - r).norm() / r.norm()) < 1e-5
    assert not (ker[1] if tiny == "query" else ker[2])[1].any()  # a zero vector's gradient: none


def _far_positive_fp16(B=4, big=60000.0):
    """fp16 q (B, 2B), d (2B, 2B): query i = e_i + e_{B+i} / 2; its positive big * (e_{B+i} - e_i) sits at cos -0.32,
    its hard negative big * (e_{B+i} + e_i) at 0.95, so at T = 0.05 G_i = P_i - onehot is about +1 on the negative
    and -1 on the positive, and (G @ d)_i,i = big - (-big) = 2 big, past fp16's 65504 for any big above ~3.3e4."""
    E = 2 * B
    q = torch.zeros(B, E, dtype=torch.float64)
    d = torch.zeros(2 * B, E, dtype=torch.float64)
    for i in range(B):
        q[i, i], q[i, B + i] = 1.0, 0.5
        d[i, i], d[i, B + i] = -big, big
        d[B + i, i], d[B + i, B + i] = big, big
    return q.half(), d.half()


@pytest.mark.parametrize("buffer_bytes", [None, 32], ids=["one-pass", "chunks"])
def test_fp16_embedding_elements_near_the_fp16_max_give_finite_gradients(buffer_bytes):
    """The fp16 backward multiplied dL/ds by the embeddings in fp16: (G @ d)_i reaches 2 max|d| and (G^T @ q)_j
    B max|q|, so elements above ~3.3e4 (or 65504 / B) made that product inf, and the normalisation backward turned
    it into NaN where the fp64 reference is finite (review: every row of dq NaN for elements of 3e4 * randn). The
    products now run in fp32 for fp16 inputs. Both the one-buffer path and the row / column chunks (buffer_bytes=32:
    two fp32 elements a chunk) must match the reference, on the constructed worst case and on random elements of
    that size."""
    T = 0.05
    run = lambda a, b: _contrastive_loss_triton(a, b, temperature=T, buffer_bytes=buffer_bytes)  # noqa: E731
    q, d = _far_positive_fp16()
    ref = _loss_and_grads(_ref64(T), q, d)
    tor = _loss_and_grads(lambda a, b: _torch_same_dtype_loss(a.float(), b.float(), T), q, d)
    _check(_loss_and_grads(run, q, d), tor, ref, torch.float16, T, f"constructed, buffer {buffer_bytes}")
    # random rows of norm ~2.4e5: every gradient entry (~1e-5) is an fp16 subnormal, so the floor of its error is the
    # subnormals' spacing, 2^-24
    g = torch.Generator().manual_seed(0)
    q, d = [(3e4 * torch.randn(n, 64, generator=g)).clamp(-6e4, 6e4).half() for n in (4, 8)]
    ker, ref = _loss_and_grads(run, q, d), _loss_and_grads(_ref64(T), q, d)
    assert abs(float(ker[0] - ref[0])) < 1e-5
    for k in (1, 2):  # dq, dd
        assert torch.isfinite(ker[k]).all() and float(ref[k].abs().max()) > 2 ** -17
        assert float((ker[k] - ref[k]).abs().max()) <= 2 ** -24, k


LAUNCHERS = ("_row_inv_norm", "_contrastive_fwd", "_contrastive_bwd", "_normalize_bwd_")


def test_forward_and_backward_launch_on_their_inputs_device(monkeypatch):
    """Every launcher enters its first input's device (Triton launches on the current one): each one of LAUNCHERS
    is seen entering it, through on_input_device, with a tensor of its inputs' device."""
    import contextlib
    import sys

    from llm2vec_kernels import _backend

    seen = []

    def recording(t):  # called by on_input_device's wrapper, whose frame holds the launcher it wraps
        seen.append((sys._getframe(1).f_locals["launcher"].__name__, t))
        return contextlib.nullcontext()

    monkeypatch.setattr(_backend, "on_device", recording)
    q, d = _make(4, 1, 32, torch.float32)
    q, d = q.requires_grad_(), d.requires_grad_()
    contrastive_loss(q, d, impl="triton").backward()
    assert {name for name, _ in seen} == set(LAUNCHERS), [name for name, _ in seen]
    assert all(callable(getattr(C, name)) for name in LAUNCHERS)  # the real names, not a stale list
    assert all(t.device == q.device for _, t in seen)
    # fwd (norms, scores), bwd (scores, norms), each entering q's or d's device (the launchers get them after
    # _zero_tiny_rows, a copy with their shapes)
    assert {tuple(q.shape), tuple(d.shape)} <= {tuple(t.shape) for _, t in seen}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_duplicate_rows(dtype):
    q, d = _make(8, 1, 64, dtype, seed=3, dupes=True)
    assert torch.equal(q[0], q[1]) and torch.equal(d[0], d[8])
    ref = _loss_and_grads(_ref64(0.05), q, d)
    tor = _loss_and_grads(lambda a, b: _torch_same_dtype_loss(a.float(), b.float(), 0.05), q, d)
    ker = _loss_and_grads(lambda a, b: contrastive_loss(a, b, impl="triton"), q, d)
    _check(ker, tor, ref, dtype, 0.05, "duplicates")


def test_all_identical_rows_give_log_n_and_zero_grad():
    # Analytic case: every score ties, so the loss is exactly log(N) and q's gradient vanishes (the softmax
    # average of identical candidates equals the positive). No reference involved.
    B, n, E = 6, 2, 16
    v = torch.randn(E, generator=torch.Generator().manual_seed(7))
    q, d = v.repeat(B, 1), (3.0 * v).repeat(B * (1 + n), 1)
    loss, dq, _ = _loss_and_grads(lambda a, b: contrastive_loss(a, b, impl="triton"), q, d)
    assert abs(float(loss) - math.log(B * (1 + n))) < 1e-5
    assert float(dq.abs().max()) < 1e-5


# ----------------------------------------------------------------------------------------------
# in-batch false negatives (q_keys / d_keys): Triton vs the fp64 reference, and the reference by hand
# ----------------------------------------------------------------------------------------------

def _keyed(B, n, E, dtype, seed, world=1, rank=0):
    """q (B, E), d (M, E), q_keys (B,), d_keys (M,), and ``world - 1`` other ranks' candidates (before our block:
    rank ``rank``) with their keys. Copies of a text copy its embedding and its key: positive 1 is positive 0, hard
    negative B+2 is its own query's positive, hard negative B+3 another query's, and the other ranks hold a copy
    of positive 4 and of positive 0. Hard negative B+4 has positive 3's low 32 key bits and differs above them (it
    stays a negative). Keys are random int64s of either sign."""
    M = B * (1 + n)
    q, d = _make(B, n, E, torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    others = torch.randn((world - 1) * M, E, generator=g, dtype=torch.float64)
    keys = torch.randint(-2 ** 62, 2 ** 62, (M + len(others),), generator=g, dtype=torch.int64)
    d_keys, o_keys = keys[:M].clone(), keys[M:].clone()
    for dst, src in ((1, 0), (B + 2, 2), (B + 3, 4 % B)):
        d[dst], d_keys[dst] = d[src], d_keys[src]
    d_keys[B + 4] = d_keys[3] ^ (1 << 45)
    if world > 1:
        others[3], o_keys[3] = d[4 % B], d_keys[4 % B]
        others[-1], o_keys[-1] = d[0], d_keys[0]
    q_keys = d_keys[:B].clone()
    return q.to(dtype), d.to(dtype), q_keys, d_keys, others.to(dtype), o_keys, rank * M


def _as_rank(monkeypatch, others, o_keys, offset):
    """Both paths score [others[:offset], d, others[offset:]] with query i's positive at offset + i, as rank
    offset / M of a gathered batch (the other ranks' candidates are constants here)."""
    def layout(q, d, gather_across_ranks, d_keys=None):
        C._check_inputs(q, d)
        keys = None if d_keys is None else torch.cat([o_keys[:offset], d_keys, o_keys[offset:]])
        return torch.cat([others[:offset].to(d.dtype), d, others[offset:].to(d.dtype)]), offset, keys

    monkeypatch.setattr(C, "_global_layout", layout)


def _count_by_loop(q_keys, c_keys, offset):
    return sum(1 for i in range(len(q_keys)) for j in range(len(c_keys))
               if j != offset + i and int(c_keys[j]) == int(q_keys[i]))


@pytest.mark.parametrize("B,n,E,dtype,T,world,rank,kw", [
    (70, 2, 72, torch.float32, 0.05, 3, 1, {}),                              # 2 row blocks, 10 column blocks
    (70, 2, 72, torch.float32, 0.05, 3, 2, dict(num_splits=4, buffer_bytes=4 * 630 * 50)),  # splits, chunks
    (9, 3, 80, torch.float16, 0.05, 2, 1, {}),
    (9, 3, 80, torch.float16, 0.1, 2, 0, dict(buffer_bytes=4 * 72 * 20)),    # fp32 work buffers in chunks
    (5, 1, 72, torch.float32, 1.0, 1, 0, {}),
], ids=["fp32-rank1", "fp32-rank2-splits-chunks", "fp16-rank1", "fp16-rank0-chunks", "fp32-one-rank"])
def test_false_negative_masking_matches_the_fp64_reference(B, n, E, dtype, T, world, rank, kw, monkeypatch):
    """With keys, Triton (forward, split combine, one-pass and chunked backward) matches the fp64 reference on the
    same mask, for copies among the positives, among the hard negatives and in other ranks' blocks; both count
    the masked (query, candidate) pairs as a loop over them does. Masking changes the loss: the test sees it."""
    q, d, qk, dk, others, ok, offset = _keyed(B, n, E, dtype, seed=B + E + rank, world=world, rank=rank)
    _as_rank(monkeypatch, others, ok, offset)
    keys = dict(q_keys=qk, d_keys=dk)
    ref = _loss_and_grads(lambda a, b: contrastive_loss_reference(a.double(), b.double(), temperature=T, **keys), q, d)
    tor = _loss_and_grads(lambda a, b: contrastive_loss_reference(a.float(), b.float(), temperature=T, **keys), q, d)
    ker = _loss_and_grads(lambda a, b: _contrastive_loss_triton(a, b, temperature=T, **keys, **kw), q, d)
    _check(ker, tor, ref, dtype, T, f"keyed B={B} n={n} E={E} {dtype} rank {rank}/{world}")
    unmasked = _loss_and_grads(lambda a, b: contrastive_loss_reference(a.double(), b.double(), temperature=T), q, d)
    assert abs(float(unmasked[0] - ref[0])) > 0.01  # the copies weigh in the loss: the mask is seen
    want = _count_by_loop(qk, torch.cat([ok[:offset], dk, ok[offset:]]), offset)
    assert want >= 4 + (2 if world > 1 else 0)
    for fn in (_contrastive_loss_triton, contrastive_loss_reference):
        _, masked = fn(q, d, temperature=T, **keys, return_masked=True)
        assert masked.dtype == torch.int64 and int(masked) == want, fn.__name__


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_distinct_keys_leave_the_loss_bit_for_bit_and_a_copy_changes_it(impl):
    """Keys that never repeat mask nothing: loss and gradients are the key-less ones, bit for bit (the keyed
    kernels only add selects that keep every value). One repeated key changes the loss."""
    q, d = _make(7, 2, 72, torch.float32, seed=9)
    d[12] = d[3]  # query 3's positive repeated as query 5's hard negative
    dk = torch.arange(21, dtype=torch.int64) * 7919 - 50
    run = lambda **k: _loss_and_grads(lambda a, b: contrastive_loss(a, b, impl=impl, **k), q, d)  # noqa: E731
    plain, distinct = run(), run(q_keys=dk[:7], d_keys=dk)
    for x, y in zip(plain, distinct):
        assert torch.equal(x, y)
    dk[12] = dk[3]  # and now its key says so
    assert abs(float(run(q_keys=dk[:7], d_keys=dk)[0] - plain[0])) > 1e-3


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_false_negative_masking_by_hand(impl):
    """B = 2, one hard negative each, T = 0.5 (s = 2 cos). Candidate 3 (query 1's hard negative) is a copy of query
    0's positive (key 10): query 0's log-sum-exp runs over candidates 0, 1, 2 only; query 1 has no copy:

        loss_0 = log(e^2 + e^0 + e^sqrt2) - 2,   loss_1 = log(e^0 + e^2 + e^sqrt2 + e^0) - 2

    and query 0's gradient does not see candidate 3 (moving it leaves dq[0] as it was)."""
    r = 2 ** -0.5
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[2.0, 0.0], [0.0, 3.0], [r, r], [2.0, 0.0]])
    keys = dict(q_keys=torch.tensor([10, 20]), d_keys=torch.tensor([10, 20, 30, 10]))
    s = 2 * r  # cos(q_0, d_2) / T = cos(q_1, d_2) / T = sqrt(2)
    want = 0.5 * ((math.log(math.exp(2) + 1 + math.exp(s)) - 2) + (math.log(2 + math.exp(2) + math.exp(s)) - 2))
    loss, masked = contrastive_loss(q, d, temperature=0.5, impl=impl, return_masked=True, **keys)
    assert abs(float(loss) - want) < 1e-6 and int(masked) == 1
    dq = _loss_and_grads(lambda a, b: contrastive_loss(a, b, temperature=0.5, impl=impl, **keys), q, d)[1]
    moved = d.clone()
    moved[3] = torch.tensor([0.3, -2.0])
    dq_moved = _loss_and_grads(lambda a, b: contrastive_loss(a, b, temperature=0.5, impl=impl, **keys), q, moved)[1]
    assert torch.allclose(dq_moved[0], dq[0], rtol=0, atol=1e-7) and not torch.allclose(dq_moved[1], dq[1])


@pytest.mark.parametrize("impl,kw", [("torch", {}), ("triton", dict(num_splits=3))])
def test_when_every_other_text_is_a_copy_only_the_positive_is_left(impl, kw, monkeypatch):
    """Analytic case: every candidate has the same key, so each query's log-sum-exp holds its positive only: loss 0,
    no gradient, and every other pair masked. As rank 2 of 3 the positives sit past the first of 3 forward splits:
    whole tiles and a whole split are masked for every row ((m, l) = (-inf, 0) partials), which must not give NaN."""
    B, n, E = 6, 20, 16
    q, d, _, _, others, _, offset = _keyed(B, n, E, torch.float32, seed=3, world=3, rank=2)
    _as_rank(monkeypatch, others, torch.full((len(others),), 5), offset)
    fn = _contrastive_loss_triton if impl == "triton" else contrastive_loss_reference
    keys = dict(q_keys=torch.full((B,), 5), d_keys=torch.full((d.shape[0],), 5))
    loss, dq, dd = _loss_and_grads(lambda a, b: fn(a, b, temperature=0.05, **keys, **kw), q, d)
    assert float(loss) == 0.0 and not dq.any() and not dd.any()
    assert int(fn(q, d, **keys, **kw, return_masked=True)[1]) == B * (3 * d.shape[0] - 1)


def test_keys_are_checked():
    q, d = _make(4, 1, 8, torch.float32, seed=1)
    k = torch.arange(8)
    with pytest.raises(ValueError, match="both q_keys and d_keys"):
        contrastive_loss(q, d, q_keys=k[:4])
    with pytest.raises(ValueError, match=r"d_keys must be a \(8,\) tensor"):
        contrastive_loss(q, d, q_keys=k[:4], d_keys=k[:7], impl="triton")
    with pytest.raises(TypeError, match="integers"):
        contrastive_loss(q, d, q_keys=k[:4].float(), d_keys=k.float())


# ----------------------------------------------------------------------------------------------
# launch paths: split-N forward, chunked backward, partial gradients
# ----------------------------------------------------------------------------------------------

def test_split_forward_and_chunked_backward_agree():
    # fp32 tiles are 64 x 64: B = 130, N = 260 gives 3 row blocks x 5 column blocks.
    B, n, E, T = 130, 1, 8, 0.05
    q, d = _make(B, n, E, torch.float32, seed=11)
    N, el = B * (1 + n), 4
    ref = _loss_and_grads(_ref64(T), q, d)
    tor = _loss_and_grads(lambda a, b: _torch_same_dtype_loss(a.float(), b.float(), T), q, d)
    variants = {
        "one split, single buffer": dict(num_splits=1),
        "3 splits, chunks < block": dict(num_splits=3, buffer_bytes=el * N * 50),    # rows 50, cols 100
        "5 splits, block chunks": dict(num_splits=5, buffer_bytes=el * N * 100),     # rows 64, cols 192
    }
    outs = {}
    for name, kw in variants.items():
        outs[name] = _loss_and_grads(lambda a, b: _contrastive_loss_triton(a, b, temperature=T, **kw), q, d)
        _check(outs[name], tor, ref, torch.float32, T, name)
    base = outs["one split, single buffer"]
    for name, out in outs.items():
        for x, y in zip(out, base):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("which", ["q", "d"])
def test_gradient_for_one_input_only(which):
    B, n, E, T = 5, 1, 16, 0.05
    q, d = _make(B, n, E, torch.float32, seed=5)
    ref = _loss_and_grads(_ref64(T), q, d)
    q_ = q.clone().requires_grad_(which == "q")
    d_ = d.clone().requires_grad_(which == "d")
    contrastive_loss(q_, d_, temperature=T, impl="triton").backward()
    got, want = (q_.grad, ref[1]) if which == "q" else (d_.grad, ref[2])
    other = d_.grad if which == "q" else q_.grad
    assert other is None
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# dispatch and validation
# ----------------------------------------------------------------------------------------------

def test_dispatch_and_validation():
    q, d = _make(4, 1, 8, torch.float32, seed=1)
    # auto on CPU is the reference, bit for bit
    assert torch.equal(contrastive_loss(q, d), contrastive_loss_reference(q, d))
    assert torch.equal(contrastive_loss(q.double(), d.double()), contrastive_loss_reference(q.double(), d.double()))
    # strided views work (rows with a gap, and a strided embedding dim, which is copied); the loss is fp32
    for qs in (torch.cat([q, q], 1)[:, :q.shape[1]], torch.stack([q, q], -1)[..., 0]):
        assert qs.stride(0) == 2 * q.shape[1] and torch.equal(qs, q)
        out = contrastive_loss(qs, d, impl="triton")
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, contrastive_loss_reference(q, d), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="B\\*\\(1\\+n\\)"):
        contrastive_loss(q, d[:6], impl="triton")
    with pytest.raises(ValueError, match="expected q"):
        contrastive_loss(q, d[:, :4], impl="triton")
    with pytest.raises(TypeError, match="share a dtype"):
        contrastive_loss(q, d.half(), impl="triton")
    with pytest.raises(TypeError, match="fp16/bf16/fp32"):
        contrastive_loss(q.double(), d.double(), impl="triton")
    with pytest.raises(ValueError, match="temperature"):
        contrastive_loss(q, d, temperature=0.0, impl="triton")
    with pytest.raises(ValueError, match="empty"):
        contrastive_loss(q[:0], d[:0], impl="triton")


# ----------------------------------------------------------------------------------------------
# two ranks over gloo == one process over the global batch
# ----------------------------------------------------------------------------------------------

WORLD, RB, RN, RE, RT = 2, 3, 2, 16, 0.05  # per-rank B, hard negatives per query, E, temperature


# keyed: copies across the ranks (global d index <- the index it copies): rank 1's positive 0 is rank 0's positive
# 1, rank 0's first hard negative is rank 1's positive 2
_COPIES = ((RB, 1), (WORLD * RB, RB + 2))


def _by_rank(x):
    """Global rows (W*B positives in query order, then each rank's B*n negatives) -> each rank's block."""
    negs = x[WORLD * RB:].reshape(WORLD, RB * RN, *x.shape[1:])
    return [torch.cat([x[r * RB:(r + 1) * RB], negs[r]]) for r in range(WORLD)]


def _rank_data(keyed=False):
    q, d = _make(WORLD * RB, RN, RE, torch.float32, seed=42)
    dk = torch.arange(d.shape[0], dtype=torch.int64) * 1000003 - 7
    if keyed:  # a copied text copies its embedding and its key
        for dst, src in _COPIES:
            d[dst], dk[dst] = d[src], dk[src]
    # rank r owns queries [r*B, (r+1)*B) and a d block of M = B*(1+n) rows: its positives, then negatives
    qs = [q[r * RB:(r + 1) * RB] for r in range(WORLD)]
    if keyed:
        return q, d, qs, _by_rank(d), dk, _by_rank(dk)
    return q, d, qs, _by_rank(d)


def _rank_worker(rank, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        _, _, qs, ds = _rank_data()
        res = {}
        for impl in ("torch", "triton"):
            res[impl] = _loss_and_grads(
                lambda a, b: contrastive_loss(a, b, temperature=RT, gather_across_ranks=True, impl=impl),
                qs[rank], ds[rank])
        # mask_false_negatives: the keys are gathered with the candidates, rank-major
        _, _, qs, ds, _, dks = _rank_data(keyed=True)
        keys = dict(q_keys=dks[rank][:RB], d_keys=dks[rank])
        for impl in ("torch", "triton"):
            run = lambda a, b, **k: contrastive_loss(a, b, temperature=RT, gather_across_ranks=True, impl=impl,  # noqa
                                                     **keys, **k)
            res[f"{impl} keyed"] = (*_loss_and_grads(run, qs[rank], ds[rank]),
                                    run(qs[rank], ds[rank], return_masked=True)[1])
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_gloo_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    assert os.environ.get("TRITON_INTERPRET", "0") != "0"  # inherited by the spawned ranks
    mp.spawn(_rank_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    q, d, _, _ = _rank_data()  # single process: d[:W*B] positives (in query order), then negatives
    ref = _loss_and_grads(_ref64(RT), q, d)
    for impl in ("torch", "triton"):
        single = _loss_and_grads(
            lambda a, b: contrastive_loss(a, b, temperature=RT, impl=impl), q, d)
        # the loss of the global batch is the mean of the per-rank losses
        loss = sum(r[impl][0] for r in ranks) / WORLD
        # per-rank gradients are WORLD x the global-mean gradients (the data-parallel average divides)
        dq = torch.cat([r[impl][1] for r in ranks]) / WORLD
        dd_pos = torch.cat([r[impl][2][:RB] for r in ranks]) / WORLD
        dd_neg = torch.cat([r[impl][2][RB:] for r in ranks]) / WORLD
        dd = torch.cat([dd_pos, dd_neg])
        for got, sp, r64, name in zip((loss, dq, dd), single, ref, ("loss", "dq", "dd")):
            torch.testing.assert_close(got, sp, rtol=1e-5, atol=1e-7, msg=f"{impl} {name} vs single process")
            torch.testing.assert_close(got, r64, rtol=1e-4, atol=1e-6, msg=f"{impl} {name} vs fp64")
    # with keys: each rank leaves out the copies among every rank's candidates, as one process does on the whole
    # batch (the copies across ranks weigh in the loss: unmasked, it differs)
    q, d, _, _, dk, _ = _rank_data(keyed=True)
    keys = dict(q_keys=dk[:WORLD * RB], d_keys=dk)
    ref = _loss_and_grads(lambda a, b: contrastive_loss_reference(a.double(), b.double(), temperature=RT, **keys),
                          q, d)
    assert abs(float(ref[0]) - float(_loss_and_grads(_ref64(RT), q, d)[0])) > 0.01
    for impl in ("torch", "triton"):
        run = lambda a, b, **k: contrastive_loss(a, b, temperature=RT, impl=impl, **keys, **k)  # noqa: E731
        single = _loss_and_grads(run, q, d)
        got = [r[f"{impl} keyed"] for r in ranks]
        loss = sum(r[0] for r in got) / WORLD
        dq = torch.cat([r[1] for r in got]) / WORLD
        dd = torch.cat([torch.cat([r[2][:RB] for r in got]), torch.cat([r[2][RB:] for r in got])]) / WORLD
        for x, sp, r64, name in zip((loss, dq, dd), single, ref, ("loss", "dq", "dd")):
            # fp32 sums in another order (the gradients reach 0.65 here): within 1e-6, as vs fp64
            torch.testing.assert_close(x, sp, rtol=1e-5, atol=1e-6, msg=f"{impl} keyed {name} vs single process")
            torch.testing.assert_close(x, r64, rtol=1e-4, atol=1e-6, msg=f"{impl} keyed {name} vs fp64")
        # queries 1 and B drop each other's positive, query B+2 its copy among rank 0's hard negatives
        assert sum(int(r[3]) for r in got) == int(run(q, d, return_masked=True)[1]) == 3


# ----------------------------------------------------------------------------------------------
# GPU cross-compilation of every launched variant (sm_90 and sm_80)
# ----------------------------------------------------------------------------------------------

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
_SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
# Scalars the runtime does not mark divisible-by-16 in the main launch (temperature scale, split counts
# and the positive offset can be anything); every other int/pointer is 16-aligned at E = 4096.
_NOT_DIVISIBLE = {"scale_log2", "eps", "inv_eps", "num_splits", "blocks_per_split", "pos_offset"}
# With an odd E (E = 3) only torch's allocations and the padded dL/ds buffers stay aligned.
_ALWAYS_DIVISIBLE = {"stride_gar", "stride_gbr", "stride_pk", "stride_ps"}


def _variants():
    """(kernel, signature, constexprs, num_warps, num_stages, aligned, tag) for every launch variant.

    The launcher asserts unit stride along E, which the runtime specialises to a constant, so those
    strides are constexpr 1 here as well. ``aligned`` mirrors Triton's divisibility-by-16 specialisation
    of the E = 4096 launches; the unaligned (E = 3 style) specialisation of the bf16 score kernels is
    compiled for sm_90 as well and its spills reported (allowed: only odd E launches it). The ``keyed`` variants
    (``contrastive.mask_false_negatives``: HAS_KEYS, int32 key ids) are compiled for sm_90 only (:func:`_sm90_only`;
    they doubled the job's sm_80 compile time, and were spill-free there when added).
    """
    out = []
    for dt, p in _PTR.items():
        cfg = C.launch_config(dt)
        tiles = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "INPUT_PRECISION", "UPCAST")}
        # without keys the launchers pass the fp32 inverse norms as the (unread) key pointers
        fwd_sig = dict(q_ptr=p, c_ptr=p, q_inv_ptr="*fp32", c_inv_ptr="*fp32", q_key_ptr="*fp32", c_key_ptr="*fp32",
                       part_ptr="*fp32", B="i32", N="i32", E="i32", pos_offset="i32", blocks_per_split="i32",
                       num_splits="i32", stride_qb="i32", stride_cn="i32", stride_pk="i32", stride_ps="i32",
                       scale_log2="fp32")
        work = "*fp32" if dt == torch.float16 else p  # fp16's backward buffers and products are fp32
        bwd_sig = dict(q_ptr=p, c_ptr=p, q_inv_ptr="*fp32", c_inv_ptr="*fp32", lse2_ptr="*fp32", q_key_ptr="*fp32",
                       c_key_ptr="*fp32", ra_ptr="*fp32", ca_ptr="*fp32", ga_ptr=work, rb_ptr="*fp32", cb_ptr="*fp32",
                       gb_ptr=work, row0="i32", n_rows="i32", col0="i32", n_cols="i32", E="i32", pos_offset="i32",
                       stride_qb="i32", stride_cn="i32", stride_gar="i32", stride_gbr="i32", scale_log2="fp32")
        keyed = dict(q_key_ptr="*i32", c_key_ptr="*i32")  # mask_false_negatives: the keys' int32 ids
        unit = dict(stride_qe=1, stride_ce=1)
        w, s = cfg["num_warps"], cfg["num_stages"]
        for has_keys, kw in ((False, ""), (True, " keyed")):
            sig = lambda base: dict(base, **(keyed if has_keys else {}))  # noqa: E731
            out.append((C._contrastive_fwd_kernel, sig(fwd_sig), dict(tiles, **unit, HAS_KEYS=has_keys), w, s, True,
                        f"fwd{kw} {dt}"))
            for two in (False, True):
                ce = dict(tiles, **unit, GROUP_M=C._GROUP_M, TWO_OUTPUTS=two, HAS_KEYS=has_keys, stride_gac=1,
                          stride_gbc=1)
                out.append((C._contrastive_bwd_scores_kernel, sig(bwd_sig), ce, w, s, True,
                            f"bwd_scores{kw} two={two} {dt}"))
        rows = dict(BLOCK_R=C._ROW_BLOCK_R, BLOCK_E=C._ROW_BLOCK_E)
        out.append((C._row_inv_norm_kernel, dict(x_ptr=p, out_ptr="*fp32", R="i32", E="i32", stride_xr="i32",
                                                 eps="fp32"), dict(rows, stride_xe=1), C._ROW_WARPS, 3, True,
                    f"row_inv_norm {dt}"))
        out.append((C._normalize_bwd_kernel, dict(x_ptr=p, inv_ptr="*fp32", gh_ptr=work, out_ptr=p, scale_ptr="*fp32",
                                                  R="i32", E="i32", stride_xr="i32", stride_gr="i32",
                                                  stride_or="i32", inv_eps="fp32"),
                    dict(rows, stride_xe=1, stride_ge=1, stride_oe=1), C._ROW_WARPS, 3, True, f"normalize_bwd {dt}"))
        if dt == torch.bfloat16:
            out.append((C._contrastive_fwd_kernel, fwd_sig, dict(tiles, **unit, HAS_KEYS=False), w, s, False,
                        f"fwd {dt} unaligned"))
            ce = dict(tiles, **unit, GROUP_M=C._GROUP_M, TWO_OUTPUTS=True, HAS_KEYS=False, stride_gac=1, stride_gbc=1)
            out.append((C._contrastive_bwd_scores_kernel, bwd_sig, ce, w, s, False,
                        f"bwd_scores two=True {dt} unaligned"))
    for has_keys in (False, True):
        out.append((C._lse_combine_kernel, dict(part_ptr="*fp32", lse2_ptr="*fp32", loss_ptr="*fp32", B="i32",
                                                num_splits="i32", stride_pk="i32", stride_ps="i32"),
                    dict(BLOCK=C._COMBINE_BLOCK, HAS_KEYS=has_keys), 4, 3, True,
                    "lse_combine keyed" if has_keys else "lse_combine"))
    return out


def _sm90_only(variant):
    """The odd-E specialisation and the keyed variants: compiled for the target GPU (sm_90) only."""
    return not variant[5] or " keyed" in variant[6]


def _compile_report(arch):
    """Runs in a subprocess without TRITON_INTERPRET (the interpreter's language patching breaks codegen).

    Registers, spills and shared memory come from tests/triton_compile.compile_for_gpu.
    """
    import tests.triton_compile as tc

    rows = []
    for v in _variants():
        fn, sig, ce, warps, stages, aligned, tag = v
        if _sm90_only(v) and arch != 90:  # the odd-E specialisation is reported for the target GPU only
            continue
        divisible = [a for a in sig if a not in _NOT_DIVISIBLE and sig[a] != "fp32"
                     and (aligned or sig[a].startswith("*") or a in _ALWAYS_DIVISIBLE)]
        res = tc.compile_for_gpu(fn, sig, ce, arch=arch, num_warps=warps, num_stages=stages, divisible=divisible)
        rows.append(dict(kernel=tag, arch=arch, aligned=aligned, registers=res.registers, spills=res.spills,
                         shared=res.shared_bytes))
    return rows


@pytest.mark.compile_check("contrastive")
def test_compile_every_variant_for_sm90_and_sm80():
    # one process per architecture, in parallel
    rows = job_rows("contrastive")
    assert len(rows) == 2 * len(_variants()) - sum(1 for v in _variants() if _sm90_only(v))
    for r in rows:
        print(f"{r['kernel']:40s} sm_{r['arch']} regs={r['registers']:3d} spills={r['spills']:4d} "
              f"shared={r['shared']}")
        assert r["shared"] <= _SMEM_LIMIT[r["arch"]], r
        assert r["registers"] <= 255, r
        if r["aligned"]:  # the real (E multiple of 16) launches must not spill
            assert r["spills"] == 0, r
    # the 16-bit score kernels really are pipelined through shared memory (and the dynamic figure is read)
    assert all(r["shared"] >= 64 * 1024 for r in rows
               if r["kernel"].startswith(("fwd", "bwd")) and "float32" not in r["kernel"] and r["aligned"])


# ----------------------------------------------------------------------------------------------
# benchmark (tiny CPU mode) and GPU
# ----------------------------------------------------------------------------------------------

def test_benchmark_tiny(tmp_path):
    from benchmarks import bench_contrastive
    from benchmarks.common import read_rows

    csv, png = tmp_path / "bench.csv", tmp_path / "bench.png"
    bench_contrastive.main(["--tiny", "--out", str(csv), "--plot", str(png), "--batches", "8"])
    rows = read_rows(csv)
    for impl in ("torch", "torch_lowp", "triton"):
        got = [r for r in rows if r["impl"] == impl]
        assert {r["pass"] for r in got} == {"fwd", "fwd+bwd"}, impl
        assert all("status=ok" in r["extra"] and float(r["ms"]) > 0 for r in got), got
    # the triton step row states its time ratio to both dense baselines (CPU: no peak memory, no memory ratio)
    ms = {r["impl"]: float(r["ms"]) for r in rows if r["pass"] == "fwd+bwd"}
    extra = dict(kv.split("=", 1) for kv in next(r for r in rows if r["impl"] == "triton" and r["pass"] == "fwd+bwd")
                 ["extra"].split(";"))
    assert float(extra["time_vs_lowp"]) == pytest.approx(ms["triton"] / ms["torch_lowp"], rel=1e-3, abs=1e-3)
    assert float(extra["time_vs_torch"]) == pytest.approx(ms["triton"] / ms["torch"], rel=1e-3, abs=1e-3)
    # the dense baselines ran first (the ratios need them), whatever order --impls names them in
    rows = bench_contrastive.main(["--tiny", "--out", str(tmp_path / "b.csv"), "--batches", "8",
                                   "--impls", "triton,torch_lowp", "--budget-ms", "1"])
    assert [r["impl"] for r in rows] == ["torch_lowp"] * 2 + ["triton"] * 2
    assert "time_vs_lowp=" in rows[-1]["extra"] and "time_vs_torch" not in rows[-1]["extra"]
    assert png.exists()


def test_gpu_check_rows_on_cpu():
    # gpu_check's row builder, run here on tiny shapes through the interpreter, so it cannot rot
    cases = [("B5_n1_E8_determinism", 5, 1, 8, torch.float32, 0.05, {}),
             ("B6_n1_E16_dupes", 6, 1, 16, torch.bfloat16, 0.05, dict(num_splits=1, buffer_bytes=64))]
    rows = GC._accuracy_rows(cases, torch.device("cpu"))
    assert len(rows) == 7
    assert {"op", "case", "max_err", "torch_bf16_err", "ok"} <= set(rows[0])
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


@pytest.mark.gpu
def test_gpu_check():
    rows = GC.gpu_check()
    bad = [r for r in rows if not r["ok"]]
    assert rows and not bad, bad


@pytest.mark.gpu
def test_gpu_benchmark_smoke(tmp_path):
    from benchmarks import bench_contrastive

    rows = bench_contrastive.main(["--out", str(tmp_path / "b.csv"), "--batches", "512", "--budget-ms", "50"])
    assert {r["impl"] for r in rows} == {"torch", "torch_lowp", "triton"}
