"""Triton flash attention vs the fp64 torch reference, forward and backward.

Without a GPU the Triton kernels run in the CPU interpreter on tiny fp32/fp16 shapes (the conftest turns
TRITON_INTERPRET on), and ``test_kernels_compile_without_spills`` builds every launch configuration for
sm_90 and sm_80. With ``LLM2VEC_TEST_GPU=1`` on a CUDA machine the same tests run on the GPU, plus the
``gpu``-marked ones (``llm2vec_kernels.attention.gpu_check`` on model-sized shapes).

Accuracy rule: for the output and each gradient, the kernel's max error against the fp64 reference must be
at most ERR_FACTOR x the error of eager torch attention in the same dtype, plus a small floor.
"""
import json
import os

import pytest
import torch

from llm2vec_kernels import attention as A
import llm2vec_kernels
from llm2vec_kernels import set_default_impl
from llm2vec_kernels import _backend
from llm2vec_kernels.attention import configs as C, flash as F, tuning as T
from llm2vec_kernels.attention import flash_attention, flash_attention_dropout_mask, flash_attention_reference
from llm2vec_kernels.gpu_check import attention as GC
from llm2vec_kernels.gpu_check.attention import ERR_FACTOR, ERR_FLOOR, accuracy_case
from .helpers import count_launches

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") == "0"
DEVICE = "cuda" if ON_GPU else "cpu"
F32, F16 = torch.float32, torch.float16


def _rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values in the Triton result"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _cu(lens, device=DEVICE):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)


def _inputs(shape_prefix, hq, hkv, d, dtype, device=DEVICE, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda h: torch.randn(*shape_prefix, h, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    return mk(hq), mk(hkv), mk(hkv)


def _run(fn, q, k, v, do, **kw):
    out = fn(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return (out,) + grads


def _assert_accurate(q, k, v, **kw):
    out = accuracy_case(q.detach(), k.detach(), v.detach(), **kw)
    res = out[0] if kw.get("return_outputs") else out
    for name, (err, torch_err) in res.items():
        bound = ERR_FACTOR * torch_err + ERR_FLOOR[q.dtype]
        assert err <= bound, f"{name}: error {err:.2e} > {bound:.2e} (eager torch {torch_err:.2e})"
    return out


# ------------------------------------------------------------------------------------------------
# Accuracy against the fp64 reference (interpreter on CPU, or the GPU under LLM2VEC_TEST_GPU=1)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix, hq, hkv, d, dtype", [
    ((2, 17), 4, 1, 64, F32),     # GQA 4, odd length
    ((1, 63), 8, 1, 64, F16),     # GQA 8 (MQA-like), one short of two blocks
    ((3, 1), 2, 2, 64, F32),      # single-token sequences
    ((1, 129), 2, 2, 128, F16),   # MHA, D=128, one past a block boundary
    ((1, 33), 4, 2, 96, F16),     # D=96 padded to a 128 block
    ((1, 40), 4, 2, 64, torch.bfloat16),
], ids=["gqa4-s17-f32", "gqa8-s63-f16", "s1-f32", "d128-s129-f16", "d96-f16", "bf16"])
def test_dense_matches_fp64_reference(prefix, hq, hkv, d, dtype):
    _assert_accurate(*_inputs(prefix, hq, hkv, d, dtype))


@pytest.mark.parametrize("lens, hq, hkv, d, dtype", [
    ([1, 129, 17, 0, 63], 4, 1, 64, F32),   # very different lengths, an empty sequence, GQA 4
    ([100, 3, 1], 4, 4, 128, F16),
    ([9, 4, 1], 2, 1, 256, F16),            # D=256 (Gemma), MQA
], ids=["mixed-f32", "mixed-d128-f16", "d256-mqa-f16"])
def test_varlen_matches_fp64_reference(lens, hq, hkv, d, dtype):
    q, k, v = _inputs((sum(lens),), hq, hkv, d, dtype)
    _assert_accurate(q, k, v, cu_seqlens=_cu(lens))


@pytest.mark.parametrize("deterministic", [True, False])
def test_varlen_rows_past_the_last_sequence_get_zero_gradients(deterministic):
    """Rows past cu_seqlens[-1] belong to no sequence; their q / k / v gradients were uninitialised memory (which
    reached the projections' weight gradients), now zero, as the reference gives. torch's fill of uninitialised
    memory (NaN) makes the difference visible on CPU."""
    lens, tail = [7, 8], 5
    q, k, v = _inputs((sum(lens) + tail,), 4, 2, 32, F32)
    prev = torch.utils.deterministic.fill_uninitialized_memory, torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        out = flash_attention(q, k, v, cu_seqlens=_cu(lens), impl="triton", deterministic=deterministic)
        out[:sum(lens)].float().sum().backward()
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = prev[0]
        torch.use_deterministic_algorithms(prev[1])
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and (t.grad[sum(lens):] == 0).all()


@pytest.mark.parametrize("layout, dtype, dropout, deterministic", [
    ("dense", F32, 0.0, True), ("varlen", F32, 0.0, True), ("padded", F16, 0.0, True), ("varlen", F16, 0.2, True),
    ("varlen", F32, 0.0, False), ("padded", F32, 0.2, False),
])
def test_soft_capped_scores_match_fp64_reference(layout, dtype, dropout, deterministic):
    # Gemma2: s = c tanh(scale q.k / c), c = 50 in the model; 3 here, so that most scores bend (|x| ~ 3 * ...).
    lens = [37, 1, 64]
    if layout == "varlen":
        q, k, v = _inputs((sum(lens),), 4, 2, 32, dtype)
        kw = {"cu_seqlens": _cu(lens)}
    else:
        q, k, v = _inputs((3, 64), 4, 2, 32, dtype)
        kw = {"seqlens": torch.tensor(lens)} if layout == "padded" else {}
    q, k = (t.detach().mul(3).requires_grad_() for t in (q, k))  # large scores: the cap matters
    _assert_accurate(q, k, v, softcap=3.0, dropout_p=dropout, seed=3, deterministic=deterministic, **kw)
    capped = flash_attention(q, k, v, softcap=3.0, impl="triton", **kw)
    assert _rel(capped, flash_attention(q, k, v, impl="triton", **kw)) > 0.05  # the cap changed the result


def test_forward_and_backward_launch_on_their_inputs_device(monkeypatch):
    """Both launchers enter q's device (Triton launches on the current one, which a multi-device encode worker's
    model need not be on)."""
    from .helpers import record_launch_devices

    seen = record_launch_devices(monkeypatch)
    q, k, v = _inputs((2, 9), 4, 2, 32, F32)
    out = flash_attention(q, k, v, impl="triton")
    assert [t is q for t in seen] == [True]
    out.sum().backward()
    assert len(seen) == 2 and seen[1].shape == q.shape  # the backward's launcher, on the output gradient's device


def test_custom_scale_and_causal():
    q, k, v = _inputs((1, 45), 4, 2, 32, F32)
    _assert_accurate(q, k, v, scale=0.3)
    lens = [20, 45, 3]
    q, k, v = _inputs((sum(lens),), 4, 2, 32, F32)
    _assert_accurate(q, k, v, cu_seqlens=_cu(lens), causal=True)


def test_varlen_explicit_max_seqlen_and_packed_equals_dense():
    B, S, hq, hkv, d = 3, 40, 4, 2, 32
    q, k, v = _inputs((B, S), hq, hkv, d, torch.float32)
    dense = flash_attention(q, k, v, impl="triton")
    flat = [t.reshape(B * S, t.shape[2], d) for t in (q, k, v)]
    packed = flash_attention(*flat, cu_seqlens=_cu([S] * B), max_seqlen=S, impl="triton")
    torch.testing.assert_close(packed.reshape(B, S, hq, d), dense, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["dense", "padded", "varlen"])
def test_more_sequences_than_the_grid_takes_run_in_slices(layout, monkeypatch):
    """CUDA caps grid axis 2 (the sequence) at 65535: a bigger batch (an encode of many short texts) runs in slices
    of that many sequences. With the cap at 2, five sequences run as three slices and give the one-call results
    bit for bit, forward and backward; dropout, whose mask hashes the sequence index, is refused instead."""
    import llm2vec_kernels.attention.flash as flash_mod

    lens = [5, 1, 17, 0, 9]
    rows = sum(lens) if layout == "varlen" else 5
    if layout == "varlen":  # 3 tokens past the last sequence: the slices give them zeros, as the reference does
        q, k, v = _inputs((sum(lens) + 3,), 4, 2, 32, F32)
        kw = dict(cu_seqlens=_cu(lens), max_seqlen=17)
    else:
        q, k, v = _inputs((5, 17), 4, 2, 32, F32)
        kw = {"seqlens": torch.tensor(lens)} if layout == "padded" else {}

    def run():
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = flash_attention(qq, kk, vv, impl="triton", **kw)
        out.backward(torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape))
        return out.detach(), qq.grad, kk.grad, vv.grad

    whole = run()
    launches = []
    real = flash_mod._FlashAttention.apply
    monkeypatch.setattr(flash_mod, "MAX_GRID_BATCH", 2)
    monkeypatch.setattr(flash_mod._FlashAttention, "apply", lambda *a: launches.append(1) or real(*a))
    sliced = run()
    assert len(launches) == 3
    for a, b in zip(whole, sliced):
        torch.testing.assert_close(b[:rows], a[:rows], rtol=0, atol=0)
    assert sliced[0].shape == q.shape and not sliced[0][rows:].any() and not sliced[1][rows:].any()
    with pytest.raises(ValueError, match="5 sequences with dropout in one call"):
        flash_attention(q, k, v, impl="triton", dropout_p=0.1, seed=1, **kw)


def test_auto_sends_a_head_dim_past_256_to_the_reference(monkeypatch):
    """impl=auto on a CUDA tensor with D=320 raised the kernels' "head dim > 256" refusal; the other ops fall back
    to their reference past their limits (resolve_impl's fits=)."""
    from llm2vec_kernels import _backend

    q = torch.randn(1, 5, 2, 320)
    monkeypatch.setattr(_backend, "_on_cuda", lambda t: True)
    torch.testing.assert_close(flash_attention(q, q, q), flash_attention_reference(q, q, q), rtol=0, atol=0)
    with pytest.raises(ValueError, match="head dim 320"):
        flash_attention(q, q, q, impl="triton")


def test_varlen_rows_before_the_first_sequence_keep_their_place(monkeypatch):
    """cu_seqlens[0] > 0: the reference returned only the sequences' rows (a shorter output), and a call split at
    MAX_GRID_BATCH sequences dropped the rows before cu_seqlens[0], so every output row was another token's. Both
    now give q's rows, the sequences' at their own places, zeros outside [cu[0], cu[-1]) (Triton: the split path;
    an unsplit call leaves those rows unspecified, as documented)."""
    import llm2vec_kernels.attention.flash as flash_mod

    lens, head, tail = [5, 1, 7, 4], 3, 2
    q, k, v = _inputs((head + sum(lens) + tail,), 4, 2, 16, F32)
    cu = _cu(lens) + head
    ref = flash_attention(q, k, v, cu_seqlens=cu, impl="torch")
    assert ref.shape == q.shape and not ref[:head].any() and not ref[head + sum(lens):].any()
    inside = slice(head, head + sum(lens))
    torch.testing.assert_close(ref[inside], flash_attention(q[inside], k[inside], v[inside], cu_seqlens=_cu(lens),
                                                            impl="torch"), rtol=0, atol=0)
    whole = flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=7, impl="triton")
    monkeypatch.setattr(flash_mod, "MAX_GRID_BATCH", 2)
    sliced = flash_attention(q, k, v, cu_seqlens=cu, max_seqlen=7, impl="triton")
    assert whole.shape == sliced.shape == q.shape and not sliced[:head].any() and not sliced[head + sum(lens):].any()
    torch.testing.assert_close(sliced[inside], whole[inside], rtol=0, atol=0)
    torch.testing.assert_close(sliced[inside], ref[inside], rtol=1e-5, atol=1e-5)


def test_strided_views_of_a_fused_qkv_projection():
    # (B, S, 3, H, D) -> q/k/v are views with a sequence stride of 3*H*D; no copies needed.
    qkv = torch.randn(2, 41, 3, 4, 32, device=DEVICE)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    _assert_accurate(q, k, v)
    # a last dim that is not contiguous is copied, not misread
    qt = torch.randn(2, 41, 4, 32, device=DEVICE).transpose(-1, -2).contiguous().transpose(-1, -2)
    assert qt.stride(-1) != 1
    _assert_accurate(qt, k, v)


@pytest.mark.parametrize("varlen, dtype", [(False, F32), (True, F16)])
def test_dropout_gradients_match_reference_under_the_same_mask(varlen, dtype):
    if varlen:
        lens = [33, 1, 70]
        q, k, v = _inputs((sum(lens),), 4, 1, 64, dtype)
        _assert_accurate(q, k, v, cu_seqlens=_cu(lens), dropout_p=0.25, seed=1234)
    else:
        q, k, v = _inputs((2, 45), 4, 2, 64, dtype)
        _assert_accurate(q, k, v, dropout_p=0.25, seed=1234)


@pytest.mark.parametrize("case", ["dense-gqa4-f32", "varlen-mixed-f16", "dense-d128-f16", "varlen-dropout-f32",
                                  "causal-varlen-f32"])
def test_atomic_dq_matches_fp64_reference(case, monkeypatch):
    # deterministic=False: dQ accumulated with fp32 atomics in the dK/dV kernel; the dQ kernel never runs.
    lens = [1, 129, 17, 0, 63]
    if case == "dense-gqa4-f32":
        q, k, v = _inputs((2, 37), 4, 1, 64, F32)
        kw = {}
    elif case == "varlen-mixed-f16":
        q, k, v = _inputs((sum(lens),), 8, 2, 64, F16)
        kw = dict(cu_seqlens=_cu(lens))
    elif case == "dense-d128-f16":
        q, k, v = _inputs((1, 70), 4, 4, 128, F16)
        kw = {}
    elif case == "varlen-dropout-f32":
        q, k, v = _inputs((sum(lens),), 4, 2, 32, F32)
        kw = dict(cu_seqlens=_cu(lens), dropout_p=0.25, seed=99)
    else:
        q, k, v = _inputs((sum(lens),), 4, 2, 32, F32)
        kw = dict(cu_seqlens=_cu(lens), causal=True)
    dq_launches = count_launches(monkeypatch, F, "_attn_bwd_dq")
    _assert_accurate(q, k, v, deterministic=False, **kw)
    assert not dq_launches


@pytest.mark.parametrize("form,dropout", [(1, False), (2, True)])
def test_atomic_dq_forms_match_fp64_reference(form, dropout, monkeypatch):
    # Both ways of forming the atomic dQ tile, (M, D) and transposed (D, M), on a ragged GQA batch. The launcher's
    # own pick for each case (on CPU: 2 without dropout, 1 with it) is test_atomic_dq_matches_fp64_reference's
    # varlen-mixed-f16 and varlen-dropout-f32; here each case runs under the other form.
    assert C.atomic_dq_form(C._arch(torch.empty(0)), dropout) != form  # the form the launcher would not take
    monkeypatch.setattr(C, "atomic_dq_form", lambda arch, dropout: form)
    lens = [1, 129, 17, 0, 63]
    if not dropout:
        q, k, v = _inputs((sum(lens),), 8, 2, 64, F16)
        _assert_accurate(q, k, v, deterministic=False, cu_seqlens=_cu(lens))
    else:
        q, k, v = _inputs((sum(lens),), 4, 2, 32, F32)
        _assert_accurate(q, k, v, deterministic=False, cu_seqlens=_cu(lens), dropout_p=0.25, seed=7)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Output buffers start as NaN, so rows a kernel forgets to write cannot pass as zeros."""
    orig = torch.empty_like

    def nan_empty_like(t, *a, **kw):
        out = orig(t, *a, **kw)
        return out.fill_(float("nan")) if out.is_floating_point() else out
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)


@pytest.mark.parametrize("case", ["gqa4-f32", "d128-f16", "dropout-f32", "atomicdq-f16", "causal-f32"])
def test_right_padded_batch_without_unpadding(case, poisoned_outputs):
    # seqlens=: the dense (B, S) batch is read in place; padded rows of the output and of dq/dk/dv are 0.
    lens = torch.tensor([37, 0, 1, 20, 33], dtype=torch.int32)
    kw = {}
    if case == "gqa4-f32":
        q, k, v = _inputs((5, 37), 8, 2, 64, F32)
    elif case == "d128-f16":
        q, k, v = _inputs((5, 37), 4, 4, 128, F16)
    elif case == "dropout-f32":
        q, k, v = _inputs((5, 37), 4, 1, 32, F32)
        kw = dict(dropout_p=0.25, seed=11)
    elif case == "atomicdq-f16":
        q, k, v = _inputs((5, 37), 4, 2, 64, F16)
        kw = dict(deterministic=False)
    else:
        q, k, v = _inputs((5, 37), 4, 2, 32, F32)
        kw = dict(causal=True)
    # the kernel run checked against fp64 is the one whose padding and packed equality are checked below
    _, (out, dq, dk, dv), do = _assert_accurate(q, k, v, seqlens=lens, return_outputs=True, **kw)
    pad = torch.arange(37)[None, :] >= lens[:, None]
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all() and not t[pad].any(), name
    if not kw.get("deterministic", True):
        return  # atomics: equal to the packed path only to rounding (checked against fp64 above)
    # the valid rows are exactly what the packed varlen path computes on the same tokens
    keep = ~pad.flatten()
    flat = [t.detach().reshape(5 * 37, t.shape[2], t.shape[3])[keep].requires_grad_() for t in (q, k, v)]
    cu = _cu(lens.tolist())
    packed = _run(flash_attention, *flat, do.reshape(5 * 37, *do.shape[2:])[keep], cu_seqlens=cu, impl="triton", **kw)
    for a, b in zip((out, dq, dk, dv), packed):
        assert torch.equal(a.reshape(5 * 37, *a.shape[2:])[keep], b)


def test_padded_rejects_bad_lengths():
    q, k, v = _inputs((2, 9), 2, 2, 16, F32)
    with pytest.raises(ValueError, match="seqlens must be"):
        flash_attention(q, k, v, seqlens=torch.tensor([3]), impl="triton")
    with pytest.raises(ValueError, match="not both"):
        flash_attention(q, k, v, seqlens=torch.tensor([3, 4]), cu_seqlens=_cu([3, 4]), impl="triton")
    # lengths past S are clamped to S inside the kernels (never read out of bounds)
    out = flash_attention(q, k, v, seqlens=torch.tensor([9, 50]), impl="triton")
    torch.testing.assert_close(out, flash_attention(q, k, v, impl="triton"), rtol=0, atol=0)


def test_dropout_mask_properties():
    q = torch.empty(2, 64, 3, 16, device=DEVICE)
    m1 = flash_attention_dropout_mask(q, dropout_p=0.3, seed=7)
    assert m1.shape == (2, 3, 64, 64) and m1.dtype == torch.bool
    assert abs(m1.float().mean().item() - 0.7) < 0.02
    assert torch.equal(m1, flash_attention_dropout_mask(q, dropout_p=0.3, seed=7))
    m2 = flash_attention_dropout_mask(q, dropout_p=0.3, seed=8)
    assert (m1 != m2).float().mean().item() > 0.3
    # masks of different heads / sequences are not copies of each other
    assert (m1[0, 0] != m1[0, 1]).any() and (m1[0] != m1[1]).any()
    assert flash_attention_dropout_mask(q, dropout_p=0.0, seed=7).all()
    # varlen: per-sequence masks equal the dense mask of a batch of those sequences at positions < L
    lens = [10, 64]
    ms = flash_attention_dropout_mask(torch.empty(74, 3, 16, device=DEVICE), cu_seqlens=_cu(lens),
                                      dropout_p=0.3, seed=7)
    assert [tuple(m.shape) for m in ms] == [(3, 10, 10), (3, 64, 64)]
    assert torch.equal(ms[0], m1[0, :, :10, :10]) and torch.equal(ms[1], m1[1])


def test_the_reference_draws_its_own_dropout_mask_on_the_tensors_device(monkeypatch):
    # The engine's exact torch path (a sliding window under the sequence) gives the reference a seed, not a mask: a
    # (B, H, S, S) keep-mask per layer and step, which must not be drawn on the host and copied over.
    q, k, v = _inputs((2, 48), 4, 2, 16, torch.float32)
    keep = F._dropout_keep_mask_torch((2, 4, 48, 48), 0.3, 11, q.device)
    assert keep.device == q.device and keep.dtype == torch.bool and abs(keep.float().mean().item() - 0.7) < 0.03
    assert torch.equal(keep, F._dropout_keep_mask_torch((2, 4, 48, 48), 0.3, 11, q.device))
    assert not torch.equal(keep, F._dropout_keep_mask_torch((2, 4, 48, 48), 0.3, 12, q.device))
    out = flash_attention_reference(q, k, v, dropout_p=0.3, seed=11, softcap=50.0)
    assert torch.equal(out, flash_attention_reference(q, k, v, dropout_p=0.3, seed=11, softcap=50.0))
    assert torch.equal(out, flash_attention_reference(q, k, v, dropout_p=0.3, dropout_mask=keep, softcap=50.0))
    drawn = []
    real_rand = torch.rand

    def recording_rand(*a, **kw):
        drawn.append((kw.get("device"), kw["generator"].device))
        return real_rand(*a, **kw)

    monkeypatch.setattr(torch, "rand", recording_rand)
    meta = [t.to("meta") for t in (q, k, v)]
    assert flash_attention_reference(*meta, dropout_p=0.3, seed=11).device.type == "meta"  # no draw at all
    flash_attention_reference(q, k, v, dropout_p=0.3, seed=11)
    assert drawn == [(q.device, q.device)]


def test_dropout_mask_does_not_depend_on_tiling(monkeypatch):
    q, k, v = _inputs((1, 70), 2, 1, 32, torch.float32)
    base = flash_attention(q, k, v, dropout_p=0.4, seed=99, impl="triton")
    monkeypatch.setattr(C, "fwd_config", lambda *a, **kw: (16, 32, 4, 1))
    other = flash_attention(q, k, v, dropout_p=0.4, seed=99, impl="triton")
    assert _rel(other, base) < 3e-3  # tiling changes rounding only; a different mask would be off by ~0.5


def test_dropout_seed_and_rng():
    q, k, v = _inputs((1, 40), 2, 2, 16, torch.float32)
    a = flash_attention(q, k, v, dropout_p=0.5, seed=3, impl="triton")
    assert torch.equal(a, flash_attention(q, k, v, dropout_p=0.5, seed=3, impl="triton"))
    assert not torch.equal(a, flash_attention(q, k, v, dropout_p=0.5, seed=4, impl="triton"))
    torch.manual_seed(0)
    b = flash_attention(q, k, v, dropout_p=0.5, impl="triton")
    torch.manual_seed(0)
    assert torch.equal(b, flash_attention(q, k, v, dropout_p=0.5, impl="triton"))
    # expectation over masks is the plain attention: averaging many seeds converges to it
    plain = flash_attention(q, k, v, impl="triton")
    n = 16
    mean = sum(flash_attention(q, k, v, dropout_p=0.5, seed=s, impl="triton") for s in range(n)) / n
    one = flash_attention(q, k, v, dropout_p=0.5, seed=0, impl="triton")
    assert _rel(mean, plain) < 0.5 * _rel(one, plain)  # unbiased: averaging shrinks the error like 1/sqrt(n)


def test_backward_is_deterministic():
    lens = [30, 50]
    q, k, v = _inputs((sum(lens),), 4, 1, 32, torch.bfloat16)
    do = torch.randn_like(q)
    g1 = _run(flash_attention, q, k, v, do, cu_seqlens=_cu(lens), dropout_p=0.1, seed=5, impl="triton")
    g2 = _run(flash_attention, q, k, v, do, cu_seqlens=_cu(lens), dropout_p=0.1, seed=5, impl="triton")
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NaN-filled sequence's own rows are NaN
def test_padding_rows_are_never_read_or_written():
    # Rows past a sequence's end belong to the next sequence: poisoning them must not leak.
    lens = [5, 40]
    q, k, v = _inputs((sum(lens),), 2, 2, 16, torch.float32)
    out = flash_attention(q, k, v, cu_seqlens=_cu(lens), impl="triton")
    with torch.no_grad():
        k2, v2 = k.detach().clone(), v.detach().clone()
        k2[5:] = float("nan")
        v2[5:] = float("nan")
    out2 = flash_attention(q.detach(), k2, v2, cu_seqlens=_cu(lens), impl="triton")
    torch.testing.assert_close(out2[:5], out[:5].detach(), rtol=0, atol=0)


def test_empty_inputs():
    q, k, v = _inputs((0,), 2, 1, 16, torch.float32)
    out = flash_attention(q, k, v, cu_seqlens=_cu([]), impl="triton")
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_dispatch():
    q, k, v = _inputs((1, 20), 2, 1, 16, torch.float32)
    ref = flash_attention_reference(q, k, v)
    torch.testing.assert_close(flash_attention(q, k, v, impl="torch"), ref)
    assert _rel(flash_attention(q, k, v, impl="triton"), ref) < 3e-3
    try:
        set_default_impl("attention", "torch")
        torch.testing.assert_close(flash_attention(q, k, v), ref)
    finally:
        set_default_impl("attention", "auto")


@pytest.mark.parametrize("bad, match", [
    (dict(k=torch.randn(1, 8, 3, 16), v=torch.randn(1, 8, 3, 16)), "not divisible"),
    (dict(v=torch.randn(1, 8, 2, 16, dtype=torch.float64)), "dtype"),
    (dict(k=torch.randn(1, 8, 2, 8), v=torch.randn(1, 8, 2, 8)), "differ"),
    (dict(q=torch.randn(8, 4, 16)), "dense attention"),
    (dict(dropout_p=1.0), "dropout_p"),
    (dict(scale=-0.25), "scale must be"),
    (dict(scale=0.0), "scale must be"),
    (dict(scale=float("nan")), "scale must be"),
    (dict(q=torch.randn(1, 8, 4, 288), k=torch.randn(1, 8, 2, 288), v=torch.randn(1, 8, 2, 288)), "head dim"),
])
def test_rejects_bad_inputs(bad, match):
    args = dict(q=torch.randn(1, 8, 4, 16), k=torch.randn(1, 8, 2, 16), v=torch.randn(1, 8, 2, 16))
    args.update(bad)
    q, k, v = (args.pop(n).to(DEVICE) for n in ("q", "k", "v"))
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, impl="triton", **args)


# ------------------------------------------------------------------------------------------------
# Backend dispatch by speed (llm2vec_kernels/attention/dispatch.py): the rule on faked devices, the SDPA path's maths
# ------------------------------------------------------------------------------------------------

def _call(**kw):
    base = dict(impl="auto", device_type="cuda", arch=90, dtype=torch.bfloat16, head_dim=128, layout="dense")
    base.update(kw)
    return A.AttentionCall(**base)


@pytest.mark.parametrize("kw, eligible, chosen", [
    # dense, dropout-free: SDPA, unless a deterministic backward is needed (SDPA's fast backwards use atomics)
    (dict(), ["sdpa", "triton"], "sdpa"),
    (dict(needs_grad=True, deterministic=False), ["sdpa", "triton"], "sdpa"),
    (dict(needs_grad=True), ["triton"], "triton"),
    (dict(head_dim=64, dtype=torch.float16), ["sdpa", "triton"], "sdpa"),
    (dict(head_dim=256), ["sdpa", "triton"], "sdpa"),
    (dict(arch=80), ["sdpa", "triton"], "triton"),             # eligible, but not measured on sm_80: autotune decides
    (dict(arch=100), ["sdpa", "triton"], "triton"),            # nor on sm_100 / sm_120
    (dict(arch=120, layout="varlen", flash_attn=True), ["flash_attn", "triton"], "triton"),
    (dict(dropout=0.1), ["triton"], "triton"),                  # our Philox mask (replayed under checkpointing)
    (dict(dtype=torch.float32), ["triton"], "triton"),
    (dict(head_dim=100), ["triton"], "triton"),
    (dict(arch=75), ["torch"], "torch"),                      # below sm_80 the configs do not fit (MIN_AUTO_ARCH)
    (dict(arch=75, impl="triton"), ["triton"], "triton"),      # unless asked for
    # packed varlen: flash-attn when installed, deterministic backward only when timed
    (dict(layout="varlen"), ["triton"], "triton"),
    (dict(layout="varlen", flash_attn=True), ["flash_attn", "triton"], "flash_attn"),
    (dict(layout="varlen", flash_attn=True, needs_grad=True, deterministic=False), ["flash_attn", "triton"],
     "flash_attn"),
    (dict(layout="varlen", flash_attn=True, needs_grad=True), ["flash_attn", "triton"], "triton"),
    (dict(layout="varlen", flash_attn=True, dropout=0.1), ["triton"], "triton"),
    # what only the Triton kernel (or the reference) does
    (dict(layout="padded", flash_attn=True), ["triton"], "triton"),
    (dict(softcap=True), ["triton"], "triton"),  # SDPA cannot soft-cap; flash-attn's soft-cap is not wired in
    (dict(softcap=True, layout="varlen", flash_attn=True), ["triton"], "triton"),
    (dict(softcap=True, device_type="cpu"), ["torch"], "torch"),
    (dict(window=True), ["torch"], "torch"),
    (dict(window=True, softcap=True, impl="triton"), ["torch"], "torch"),
    (dict(head_dim=320), ["torch"], "torch"),  # past the kernels' 256: the reference, not the kernels' refusal
    (dict(head_dim=320, softcap=True), ["torch"], "torch"),
    (dict(head_dim=320, impl="triton"), ["triton"], "triton"),  # asked for: refused in one line by the kernel
    # the setting wins: model.attention=triton / torch, and auto off CUDA is the reference
    (dict(impl="triton"), ["triton"], "triton"),
    (dict(impl="triton", layout="varlen", flash_attn=True), ["triton"], "triton"),
    (dict(impl="torch"), ["torch"], "torch"),
    (dict(device_type="cpu"), ["torch"], "torch"),
    (dict(device_type="cpu", impl="triton"), ["triton"], "triton"),
])
def test_dispatch_rule(kw, eligible, chosen):
    call = _call(**kw)
    assert A.eligible(call) == eligible
    assert A.choose_backend(call) == chosen


@pytest.mark.parametrize("dtype, hq, hkv, d, scale", [(torch.float64, 4, 1, 32, None), (F32, 4, 2, 64, 0.3),
                                                      (F32, 3, 3, 16, None)], ids=["f64-gqa4", "f32-gqa2-scale", "f32-mha"])
def test_sdpa_path_matches_reference(dtype, hq, hkv, d, scale):
    # The dispatch's SDPA path in the Triton kernel's (B, S, H, D) layout, GQA via enable_gqa, against the fp64
    # reference, forward and backward. fp32: a few ulps of the values, accumulated over S and D.
    q, k, v = _inputs((2, 37), hq, hkv, d, dtype)
    do = torch.randn_like(q)
    got = _run(A.sdpa_attention, q, k, v, do, scale=scale)
    want = _run(flash_attention_reference, *(t.detach().double().requires_grad_() for t in (q, k, v)), do.double(),
                scale=scale)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape and a.dtype == dtype, name
        assert _rel(a, b) < tol, (name, _rel(a, b))


def test_engine_routes_attention_by_the_dispatch(monkeypatch):
    # engine.bidirectional._attend on a faked sm_90 device (bf16 as far as the rule knows; fp32 here): dense inference goes to SDPA, a deterministic backward
    # stays on the kernel path, a packed batch goes to flash-attn when installed (faked here), and
    # model.attention=triton forces the kernel. Outputs match the reference either way.
    import dataclasses

    from engine import bidirectional as bd
    from llm2vec_kernels.attention import dispatch as D

    real_call = bd._attention_call
    monkeypatch.setattr(bd, "_attention_call",
                        lambda *a: dataclasses.replace(real_call(*a), device_type="cuda", arch=90, flash_attn=True,
                                                           dtype=torch.bfloat16))
    used = []
    real_sdpa = D.sdpa_attention
    monkeypatch.setattr(D, "sdpa_attention", lambda *a: used.append("sdpa") or real_sdpa(*a))
    monkeypatch.setattr(bd, "_flash_attn_varlen", lambda q, k, v, cu, max_len, scale, det: used.append(
        ("flash_attn", det)) or flash_attention_reference(q, k, v, cu_seqlens=cu, scale=scale))
    real_fa = llm2vec_kernels.flash_attention
    monkeypatch.setattr(llm2vec_kernels, "flash_attention", lambda *a, **kw: used.append("kernel") or real_fa(*a, **kw))

    q, k, v = _inputs((2, 21), 4, 2, 16, F32)
    ref = flash_attention_reference(q, k, v, scale=0.3)
    with torch.no_grad():
        torch.testing.assert_close(bd._attend(q, k, v, 21, 0.3, 0.0, None, None), ref)
    assert used == ["sdpa"]
    used.clear()
    out = bd._attend(q, k, v, 21, 0.3, 0.0, None, None)  # grads needed, deterministic (the default)
    assert used == ["kernel"]
    torch.testing.assert_close(out, ref)
    used.clear()
    bd.set_deterministic_attention(False)
    try:
        out = bd._attend(q, k, v, 21, 0.3, 0.0, None, None)
    finally:
        bd.set_deterministic_attention(True)
    assert used == ["sdpa"]
    g_sdpa = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    g_ref = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
    for a, b in zip(g_sdpa, g_ref):
        torch.testing.assert_close(a, b)
    used.clear()
    lens = [5, 16]
    qv, kv, vv = _inputs((sum(lens),), 4, 2, 16, F32)
    with torch.no_grad():
        out = bd._attend(qv, kv, vv, 16, 0.3, 0.0, None, None, cu_seqlens=_cu(lens), max_seqlen=16)
    assert used == [("flash_attn", True)]
    torch.testing.assert_close(out, flash_attention_reference(qv, kv, vv, cu_seqlens=_cu(lens), scale=0.3))
    used.clear()
    set_default_impl("attention", "triton")  # model.attention=triton
    try:
        with torch.no_grad():
            out = bd._attend(q, k, v, 21, 0.3, 0.0, None, None)
    finally:
        set_default_impl("attention", "auto")
    assert used == ["kernel"]
    assert _rel(out, ref) < 3e-3  # the Triton kernel (interpreter; TF32-style fp32 dots)
    # Gemma2: soft-capped scores go to the kernel, never to SDPA or flash-attn; a sliding window shorter than the
    # sequence goes to the exact torch path, soft-capping kept
    used.clear()
    with torch.no_grad():
        out = bd._attend(q, k, v, 21, 0.3, 0.0, None, 2.0)
        windowed = bd._attend(q, k, v, 21, 0.3, 0.0, 8, 2.0)
    assert used == ["kernel"]
    assert _rel(out, flash_attention_reference(q, k, v, scale=0.3, softcap=2.0)) < 3e-3
    torch.testing.assert_close(windowed, flash_attention_reference(q, k, v, scale=0.3, softcap=2.0, window=8))


def test_dispatch_autotune_times_each_backend_and_records_it(monkeypatch, tmp_path):
    # With autotuning on, select_backend times every eligible backend once per bucket (forward and backward when
    # gradients are needed) on detached copies, keeps the fastest, writes it to the per-GPU cache under a
    # "backend" bucket, and a fresh process reads it back without timing.
    from llm2vec_kernels.attention import dispatch as D

    clock = _fake_cuda_clock(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    path = tmp_path / "tuned.json"
    monkeypatch.setenv("LLM2VEC_ATTN_TUNE_CACHE", str(path))
    monkeypatch.setattr(T, "_AUTOTUNE", {"on": True})
    fresh = lambda: (monkeypatch.setattr(T, "_TUNED", {}), monkeypatch.setattr(T, "_DISK", {"loaded": None}))  # noqa: E731
    cost = {"sdpa": 3.0, "triton": 2.0}
    calls = []

    def runner(name):
        def run(q, k, v):
            calls.append((name, q.requires_grad, torch.is_grad_enabled()))
            clock[0] += cost[name]
            return flash_attention_reference(q, k, v)
        return run

    runners = {n: runner(n) for n in cost}
    q, k, v = _inputs((2, 9), 2, 1, 16, F32)
    call = _call(needs_grad=True, deterministic=False)
    fresh()
    assert D.select_backend(call, runners, q, k, v, 9) == "triton"  # the rule said sdpa; the clock says triton
    assert [c[0] for c in calls] == ["sdpa"] * 4 + ["triton"] * 4  # one untimed call + 3 timed, each
    assert all(c[1] and c[2] for c in calls)  # with gradients: the backward is timed too
    assert q.grad is None  # on detached copies
    (bucket, choice), = json.loads(path.read_text()).items()
    assert choice == "triton" and "|backend|" in bucket and bucket.startswith("Fake GPU|")
    calls.clear()
    fresh()
    assert D.select_backend(call, runners, q, k, v, 9) == "triton" and not calls  # from the disk cache
    # autotuning off, or a single eligible backend: the fixed rule, nothing timed
    monkeypatch.setattr(T, "_AUTOTUNE", {"on": False})
    assert D.select_backend(call, runners, q, k, v, 9) == "sdpa" and not calls
    monkeypatch.setattr(T, "_AUTOTUNE", {"on": True})
    assert D.select_backend(_call(dropout=0.1), runners, q, k, v, 9) == "triton" and not calls
    # a cached backend that is no longer eligible (flash-attn uninstalled) is timed afresh
    path.write_text(json.dumps({bucket: "flash_attn"}))
    fresh()
    assert D.select_backend(call, runners, q, k, v, 9) == "triton" and calls


def test_dispatch_autotune_inside_activation_checkpointing(monkeypatch):
    # The engine's layers run under non-reentrant activation checkpointing: the timing's own forward/backward must
    # not leak saved tensors into the checkpointed region (its recompute check fails with a count mismatch).
    import torch.utils.checkpoint as checkpoint
    from llm2vec_kernels.attention import dispatch as D

    _fake_cuda_clock(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setenv("LLM2VEC_ATTN_TUNE_CACHE", "")
    monkeypatch.setattr(T, "_AUTOTUNE", {"on": True})
    monkeypatch.setattr(T, "_TUNED", {})
    call = _call(head_dim=16, needs_grad=True, deterministic=False)
    runners = {"sdpa": A.sdpa_attention, "triton": flash_attention_reference}

    def layer(x):
        q = x * 2
        return runners[D.select_backend(call, runners, q, q, q, 9)](q, q, q).sin()

    x = torch.randn(2, 9, 2, 16, requires_grad=True)
    checkpoint.checkpoint(layer, x, use_reentrant=False).sum().backward()
    want = torch.autograd.grad(layer(x).sum(), x)[0]
    assert T._TUNED and torch.allclose(x.grad, want, rtol=1e-5, atol=1e-6)


def test_gpu_check_harness_on_cpu():
    # The rows harness the GPU run calls, at tiny shapes in the interpreter: the packed and in-place padded
    # layouts, the atomic-dQ backward, a non-default (folded) softmax scale, bf16 and the SDPA path (D=256:
    # test_varlen_matches_fp64_reference[d256-mqa-f16]).
    cases = [
        ("tiny-varlen-scale", F16, (23,), 4, 2, 32, {"cu_seqlens": [5, 17, 1], "scale": 0.7}),
        ("tiny-padded-atomicdq", F16, (3, 17), 4, 1, 64, {"seqlens": [17, 0, 9], "deterministic": False}),
        ("tiny-bf16-padded", torch.bfloat16, (2, 12), 2, 2, 32, {"seqlens": [12, 5]}),
        ("tiny-sdpa", F32, (2, 13), 4, 2, 32, {"backend": "sdpa"}),
    ]
    rows = GC.gpu_check(budget_s=None, cases=cases, device="cpu")
    assert [(r["case"], r["tensor"]) for r in rows] == [
        (f"{c[0]}-{str(c[1])[6:]}", t) for c in cases for t in ("out", "dq", "dk", "dv")]
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    # the GPU list itself: every case has a known layout and the budget-ordered head covers the new paths
    names = [c[0] for c in GC.GPU_CHECK_CASES]
    assert names[:7] == ["mistral-varlen-mix", "mistral-varlen-mix-scale0.3", "mistral-padded-mix",
                         "gemma-2b-d256-varlen", "mistral-padded-mix-atomicdq", "mistral-varlen-mix-atomicdq",
                         "mistral-dense-512-sdpa"]


# ------------------------------------------------------------------------------------------------
# Every launch configuration compiles for sm_90 and sm_80 without register spills
# ------------------------------------------------------------------------------------------------

_FLOAT_ARGS = {"qk_scale", "cap", "sm_scale", "drop_scale"}
_TYPE = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def _signature(fn, dtype):
    sig = {}
    for name in fn.arg_names:
        if name.endswith("_ptr"):
            sig[name] = {"cu_ptr": "*i32", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "out_ptr": "*i8",
                         "dqa_ptr": "*fp32", "seed_ptr": "*i32", "len_ptr": "*i32"}.get(
                name, _TYPE[dtype])
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        elif not name.isupper():
            sig[name] = "i32"
    return sig


def _compile(fn, dtype, constexprs, arch, num_warps, num_stages):
    """tests.triton_compile.compile_for_gpu with the specialisation the runtime gives these launches:
    16-byte aligned pointers and strides divisible by 16 (every stride here when the head dim is a
    multiple of 16), the LSE strides excepted."""
    from tests import triton_compile

    jit = triton_compile._as_jit_function(fn)
    sig = _signature(jit, dtype)
    divisible = [n for n in sig if n.endswith("_ptr") or (n.startswith("stride_") and n not in ("stride_lb", "stride_lh", "stride_on"))]
    res = triton_compile.compile_for_gpu(fn, sig, {k: v for k, v in constexprs.items() if k in jit.arg_names},
                                         arch=arch, num_warps=num_warps, num_stages=num_stages, divisible=divisible)
    return res, res.shared_bytes


# (arch, dtype, head dim, dropout, varlen, causal, GQA group[, softcap]): every config bucket the launchers pick
# from (head dim <= 64, <= 128 incl. padded 96, 256; fp32's own configs), with and without dropout, on both archs;
# soft-capping (Gemma2: head dim 256, 16 heads over 8, packed or right-padded, SimCSE's dropout) on the same configs.
def _variant_list():
    out = []
    for arch in (90, 80):
        for dropout in (False, True):
            out.append((arch, "bfloat16", 256, dropout, True, False, 2, True))
        out.append((arch, "bfloat16", 256, False, "padded", False, 2, True))
        out.append((arch, "bfloat16", 128, True, True, False, 4, True))
        for d in (64, 96, 128, 256):
            for dropout in (False, True):
                out.append((arch, "bfloat16", d, dropout, True, False, 4))
        out.append((arch, "float16", 128, False, False, False, 1))
        out.append((arch, "bfloat16", 128, False, True, True, 1))  # causal
        out.append((arch, "bfloat16", 128, False, "padded", False, 4))  # right-padded dense (seqlens=)
        out.append((arch, "bfloat16", 64, True, "padded", False, 3))
        out.append((arch, "bfloat16", 256, False, "padded", False, 2))  # Gemma2's D=256 (16/8 heads), in place
        out.append((arch, "float32", 64, False, False, False, 2))
        out.append((arch, "float32", 128, True, True, False, 2))
    return out


def _variant_id(v):
    arch, dt, d, dropout, varlen, causal, group, *softcap = v
    layout = "padded" if varlen == "padded" else ("varlen" if varlen else "dense")
    return (f"sm{arch}-{dt}-d{d}-{'drop' if dropout else 'nodrop'}-{layout}"
            f"{'-causal' if causal else ''}-g{group}{'-softcap' if softcap and softcap[0] else ''}")


def _compile_variant(v):
    """[(kernel, registers, spilled bytes, shared bytes)] for every launch flash_attention makes for variant v."""
    arch, dtype_name, d, dropout, varlen, causal, group, *softcap = v
    dtype = getattr(torch, dtype_name)
    bd = C._block_d(d)
    padded, varlen = varlen == "padded", varlen is True
    common = dict(GROUP=group, HEAD_DIM=d, BLOCK_D=bd, VARLEN=varlen, CAUSAL=causal, DROPOUT=dropout,
                  PRECISION=_backend.dot_precision(dtype), UPCAST=False, PADDED=padded,
                  SOFTCAP=bool(softcap and softcap[0]))
    bm, bn, warps, stages = A.launch_config("fwd", bd, dtype, dropout=dropout, arch=arch)
    kbm, kbn, kwarps, kstages = A.launch_config("dkdv", bd, dtype, dropout=dropout, arch=arch)
    qbm, qbn, qwarps, qstages = A.launch_config("dq", bd, dtype, dropout=dropout, arch=arch)
    launches = [
        ("fwd", F._attn_fwd, dict(common, BLOCK_M=bm, BLOCK_N=bn), warps, stages),
        ("dkdv", F._attn_bwd_dkdv, dict(common, BLOCK_M=kbm, BLOCK_N=kbn, ATOMIC_DQ=0), kwarps, kstages),
        ("dq", F._attn_bwd_dq, dict(common, BLOCK_M=qbm, BLOCK_N=qbn), qwarps, qstages),
        ("pre", F._attn_bwd_pre, dict(HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=C._PRE_BLOCK_M, VARLEN=varlen, PADDED=padded), 4, 1),
    ]
    if A.atomic_dq_supported(bd, dtype):  # deterministic=False: dK/dV with the dQ atomics, its own config
        abm, abn, awarps, astages = A.launch_config("dkdv", bd, dtype, dropout=dropout, arch=arch, atomic_dq=True)
        launches.append(("dkdv-atomicdq", F._attn_bwd_dkdv,
                         dict(common, BLOCK_M=abm, BLOCK_N=abn, ATOMIC_DQ=A.atomic_dq_form(arch, dropout)),
                         awarps, astages))
    if dropout:
        launches.append(("mask", _backend.keep_mask_kernel, dict(BLOCK_M=32, BLOCK_N=32, HAS_LENS=varlen,
                                                                     PACKED=False), 4, 1))
    report = []
    for name, fn, constexprs, w, s in launches:
        res, smem = _compile(fn, dtype, constexprs, arch, w, s)
        report.append((name, res.registers, res.spills, smem, _mma_sync_count(res.ptx)))
    return report


def _mma_sync_count(ptx):
    """mma.sync instructions in the PTX: on sm_90 a tl.dot whose tile cannot feed a warpgroup MMA (wgmma) falls
    back to them, at a fraction of the tensor-core rate."""
    return ptx.count("mma.sync")


def _candidate_list():
    """(arch, head dim, dropout, kernel, config) for every opt-in autotune candidate that is not already a
    default config in _variant_list (bf16, varlen, GQA group 4, as there)."""
    out = []
    for arch in (90, 80):
        for d in (64, 128):
            for dropout in (False, True):
                defaults = {k: A.launch_config(k, d, torch.bfloat16, dropout, arch) for k in ("fwd", "dkdv", "dq")}
                defaults["dkdv-atomicdq"] = A.launch_config("dkdv", d, torch.bfloat16, dropout, arch, atomic_dq=True)
                for kernel in ("fwd", "dkdv", "dq", "dkdv-atomicdq"):
                    for cfg in A.tune_candidates(kernel, d, torch.bfloat16, dropout, arch):
                        if cfg != defaults[kernel]:
                            out.append((arch, d, dropout, kernel, cfg))
    return out


def _compile_candidate(c):
    arch, d, dropout, kernel, (bm, bn, warps, stages) = c
    fn = {"fwd": F._attn_fwd, "dkdv": F._attn_bwd_dkdv, "dq": F._attn_bwd_dq, "dkdv-atomicdq": F._attn_bwd_dkdv}[kernel]
    constexprs = dict(GROUP=4, HEAD_DIM=d, BLOCK_D=C._block_d(d), VARLEN=True, CAUSAL=False, DROPOUT=dropout,
                      PRECISION=_backend.dot_precision(torch.bfloat16), UPCAST=False, BLOCK_M=bm, BLOCK_N=bn,
                      ATOMIC_DQ=A.atomic_dq_form(arch, dropout) if kernel == "dkdv-atomicdq" else 0, PADDED=False,
                      SOFTCAP=False)
    res, smem = _compile(fn, torch.bfloat16, constexprs, arch, warps, stages)
    return [(kernel, res.registers, res.spills, smem, _mma_sync_count(res.ptx))]


def _candidate_id(c):
    arch, d, dropout, kernel, cfg = c
    return f"tune-sm{arch}-d{d}-{'drop' if dropout else 'nodrop'}-{kernel}-" + "x".join(map(str, cfg))


def _compile_all(workers=2):
    """Child-process entry point: compile every variant and autotune candidate (a small process pool) and
    print a JSON report.

    Runs with the interpreter off: under TRITON_INTERPRET=1 the kernels' @triton.jit helpers (and
    tl.philox) are interpreter objects that the compiler cannot inline.
    """
    from concurrent.futures import ProcessPoolExecutor

    variants, cands = _variant_list(), _candidate_list()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        reports = list(pool.map(_compile_variant, variants))
        cand_reports = list(pool.map(_compile_candidate, cands))
    out = {_variant_id(v): r for v, r in zip(variants, reports)}
    out.update({_candidate_id(c): r for c, r in zip(cands, cand_reports)})
    print(json.dumps(out))


@pytest.fixture(scope="module")
def compile_reports():
    """The report of compile job "attention" (tests.compile_variants.COMPILE_JOBS), which the session started in
    the background (tests/conftest.py), else runs now."""
    from .compile_variants import JOBS, job_codes

    code, = job_codes("attention")
    rc, stdout, stderr = JOBS.result(code, timeout=1800)
    assert rc == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.compile_check("attention")
@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="compile checks run on the CPU machines; the GPU run executes the kernels")
@pytest.mark.parametrize("variant", [pytest.param(v, id=_variant_id(v)) for v in _variant_list()])
def test_kernels_compile_without_spills(compile_reports, variant):
    arch = variant[0]
    for name, regs, spills, smem, _ in compile_reports[_variant_id(variant)]:
        assert spills == 0, f"{name}: {spills} bytes spilled ({regs} registers)"
        assert smem <= _SMEM_LIMIT[arch], f"{name}: {smem} bytes of shared memory"


@pytest.mark.compile_check("attention")
@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="compile checks run on the CPU machines; the GPU run executes the kernels")
def test_hopper_matmuls_run_as_wgmma(compile_reports):
    # The sm_90 bf16 defaults without dropout (the training hot path) keep every tl.dot on warpgroup MMAs: a tile
    # change that drops one to mma.sync (as the atomic-dQ product did with its 16-row query tile) fails here.
    fallen_back = {}
    for v in _variant_list():
        arch, dtype, d, dropout, *_ = v
        if arch == 90 and dtype == "bfloat16" and not dropout and d <= 128:
            for name, _, _, _, n_mma_sync in compile_reports[_variant_id(v)]:
                if name in ("fwd", "dkdv", "dq", "dkdv-atomicdq") and n_mma_sync:
                    fallen_back[f"{_variant_id(v)}:{name}"] = n_mma_sync
    assert not fallen_back, fallen_back
    assert A.atomic_dq_form(90, False) == 2 and A.atomic_dq_form(90, True) == 1 and A.atomic_dq_form(80, False) == 1


def test_autotune_candidate_lists():
    bf16 = torch.bfloat16
    for arch in (90, 80):
        for d in (64, 128):
            for kernel in ("fwd", "dkdv", "dq", "dkdv-atomicdq"):
                full = A.tune_candidates(kernel, d, bf16, False, arch)
                drop = A.tune_candidates(kernel, d, bf16, True, arch)
                assert full and set(drop) <= set(full) and all(len(c) == 4 for c in full)
    # 96 shares the 128 block; "nodrop" entries are left out under dropout
    assert A.tune_candidates("fwd", 128, bf16, False, 90) == A.tune_candidates("fwd", 96, bf16, False, 90)
    assert (128, 128, 8, 2) in A.tune_candidates("fwd", 128, bf16, False, 90)
    assert (128, 128, 8, 2) not in A.tune_candidates("fwd", 128, bf16, True, 90)
    assert A.tune_candidates("fwd", 256, bf16, False, 90) == []  # fixed config only
    assert A.tune_candidates("dq", 64, torch.float32, False, 90) == []


class _FakeCudaTensor:
    is_cuda = True
    device = "cuda:0"


def _fake_cuda_clock(monkeypatch):
    """torch.cuda.Event against a scripted device clock (no GPU here): returns the clock, a one-item list that
    the fake launches advance."""
    clock = [0.0]

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = clock[0]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", Event)
    return clock


def test_autotune_times_each_candidate_once_and_keeps_the_fastest(monkeypatch):
    # The tuner's logic against a scripted device clock: each launch advances the clock by the config's cost,
    # a config that fails to launch is skipped, and a tuned bucket is never timed again.
    clock = _fake_cuda_clock(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(T, "_TUNED", {})
    monkeypatch.setattr(T, "_DISK", {"loaded": None})
    monkeypatch.setenv("LLM2VEC_ATTN_TUNE_CACHE", "")  # memory only here; the disk cache has its own test
    cost = {(32, 64, 8, 2): 5.0, (16, 64, 8, 3): 2.0, (16, 128, 8, 3): 3.0}
    launched = []

    def launch(cfg):
        launched.append(cfg)
        if cfg == (32, 128, 8, 2):
            raise RuntimeError("out of resource: shared memory")
        clock[0] += cost.get(cfg, 9.0)

    key = ("dkdv", 90, torch.bfloat16, 128, False, False, True, 4, 512)
    default = (32, 64, 8, 2)
    monkeypatch.setattr(T, "_AUTOTUNE", {"on": False})
    assert T._tuned("dkdv", lambda: key, default, _FakeCudaTensor(), launch) == default and not launched  # off: no timing
    A.set_autotune(True)
    assert T._tuned("dkdv", lambda: key, default, torch.zeros(1), launch) == default and not launched  # CPU tensor
    best = T._tuned("dkdv", lambda: key, default, _FakeCudaTensor(), launch)
    cands = A.tune_candidates("dkdv", 128, torch.bfloat16, False, 90)
    assert best == (16, 64, 8, 3)
    assert launched == [c for c in cands for _ in range(1 if c == (32, 128, 8, 2) else 4)]  # compile + 3 timed
    launched.clear()
    assert T._tuned("dkdv", lambda: key, default, _FakeCudaTensor(), launch) == best and not launched  # cached
    report = A.tuned_configs()["dkdv/90/torch.bfloat16/128/False/False/True/4/512"]
    assert report["best"] == [16, 64, 8, 3] and report["ms"]["32x64x8x2"] == 5.0 and "32x128x8x2" not in report["ms"]


def test_autotune_choices_persist_per_gpu(monkeypatch, tmp_path):
    # A tuned bucket is written to the JSON cache; a new process (empty memory) reads it instead of timing,
    # but only on a GPU of the same name. A corrupt file is ignored with a warning.
    _fake_cuda_clock(monkeypatch)
    path = tmp_path / "tuned.json"
    gpu = ["GPU A"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: gpu[0])
    monkeypatch.setenv("LLM2VEC_ATTN_TUNE_CACHE", str(path))
    monkeypatch.setattr(T, "_AUTOTUNE", {"on": True})
    key = ("dq", 90, torch.bfloat16, 128, False, False, True, 4, 512)
    launched = []
    fresh = lambda: (monkeypatch.setattr(T, "_TUNED", {}), monkeypatch.setattr(T, "_DISK", {"loaded": None}))  # noqa: E731

    fresh()
    best = T._tuned("dq", lambda: key, (128, 32, 8, 3), _FakeCudaTensor(), launched.append)
    assert launched and json.loads(path.read_text()) == {"|".join(["GPU A"] + [str(x) for x in key]): list(best)}
    launched.clear()
    fresh()
    assert T._tuned("dq", lambda: key, (128, 32, 8, 3), _FakeCudaTensor(), launched.append) == best and not launched
    gpu[0] = "GPU B"  # another card: tuned afresh, both entries kept
    fresh()
    T._tuned("dq", lambda: key, (128, 32, 8, 3), _FakeCudaTensor(), launched.append)
    assert launched and len(json.loads(path.read_text())) == 2
    path.write_text("{not json")
    fresh()
    with pytest.warns(UserWarning, match="ignoring the attention tune cache"):
        T._tuned("dq", lambda: key, (128, 32, 8, 3), _FakeCudaTensor(), launched.append)


@pytest.mark.compile_check("attention")
@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="compile checks run on the CPU machines; the GPU run executes the kernels")
def test_autotune_candidates_compile_without_spills(compile_reports):
    cands = _candidate_list()
    assert len(cands) > 20  # the lists are not empty by accident
    bad = []
    for c in cands:
        for name, regs, spills, smem, _ in compile_reports[_candidate_id(c)]:
            if spills or smem > _SMEM_LIMIT[c[0]]:
                bad.append((_candidate_id(c), regs, spills, smem))
    assert not bad, bad


# ------------------------------------------------------------------------------------------------
# Benchmark smoke run (CPU CI keeps benchmarks/bench_attention.py working)
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(ON_GPU, reason="the tiny CPU benchmark; the GPU run calls the benchmark directly")
def test_benchmark_tiny_runs(gemma2_gpu_run_rehearsal):
    # `python -m benchmarks.bench_attention --tiny --out CSV --plot PNG` (TRITON_INTERPRET=1), run once for the
    # session as a step of gpu_run.sh's CPU rehearsal (tests/conftest.py; test_bench_train_step.py checks the run):
    # its CSV is in $OUT, the plot in results.tar.gz
    import tarfile

    from benchmarks.common import read_rows

    out, _, r = gemma2_gpu_run_rehearsal
    assert "ok bench_attention in" in (out / "log.txt").read_text(), r.stdout[-3000:] + r.stderr[-3000:]
    with tarfile.open(out / "results.tar.gz") as tar:
        pngs = [m for m in tar.getmembers() if os.path.basename(m.name) == "bench_attention.png"]
        assert len(pngs) == 1 and tar.extractfile(pngs[0]).read(8) == b"\x89PNG\r\n\x1a\n"
    rows = read_rows(str(out / "bench_attention.csv"))
    impls = {r["impl"] for r in rows}
    assert {"triton", "triton-atomicdq", "triton-padded", "triton-padded-atomicdq", "torch", "sdpa-math",
            "sdpa-padmask"} <= impls, impls
    # every Triton variant agrees with the fp32 reference (err= is max |out - ref| / max |ref| on real rows)
    errs = {r["impl"]: float(r["extra"].split("err=")[1].split(";")[0]) for r in rows
            if r["impl"].startswith("triton") and "err=" in r.get("extra", "")}
    assert errs and max(errs.values()) < 1e-2, errs
    assert {r["pass"] for r in rows if r["impl"] == "triton"} == {"fwd", "bwd", "fwd+bwd"}
    assert all(float(r["ms"]) > 0 for r in rows)
    # the soft-capped (Gemma2) case: SDPA cannot soft-cap and is left out; transformers' eager attention and
    # (forward only on CPU) FlexAttention are timed instead. Its inputs make the cap matter: the uncapped
    # reference is 0.19 off there, so err < 1e-2 shows every row soft-capped.
    capped = [r for r in rows if "xcap50" in r["shape"]]
    by_impl = {}
    for r in capped:
        by_impl.setdefault(r["impl"], set()).add(r["pass"])
    assert {"triton", "triton-atomicdq", "triton-padded", "triton-padded-atomicdq", "eager", "torch"} <= set(by_impl)
    assert by_impl["eager"] == {"fwd", "bwd", "fwd+bwd"} and by_impl["flex"] == {"fwd"}, by_impl
    assert not any(i.startswith("sdpa") for i in by_impl), by_impl
    cap_errs = {r["impl"]: float(r["extra"].split("err=")[1].split(";")[0]) for r in capped}
    assert max(cap_errs.values()) < 1e-2, cap_errs


# ------------------------------------------------------------------------------------------------
# GPU only: model-sized shapes
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_check_model_shapes():
    rows = GC.gpu_check(budget_s=None)
    assert rows and {r["tensor"] for r in rows} == {"out", "dq", "dk", "dv"}
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad


@pytest.mark.gpu
def test_gpu_matches_sdpa_and_auto_dispatch():
    q, k, v = _inputs((4, 512), 16, 16, 128, torch.bfloat16, device="cuda")
    out = flash_attention(q, k, v)  # impl="auto" -> Triton on CUDA
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert _rel(out, ref) < 1e-2


@pytest.mark.gpu
def test_gpu_engine_dispatch_on_this_device():
    # The engine's dispatch on the real device: dense bf16 inference goes to SDPA on sm_90 (Triton elsewhere), a
    # deterministic training call to Triton; both agree with the Triton kernel to bf16 rounding.
    from engine import bidirectional as bd

    q, k, v = _inputs((2, 256), 32, 8, 128, torch.bfloat16, device="cuda")
    arch = A.dispatch.device_arch(q)
    with torch.no_grad():
        assert A.choose_backend(bd._attention_call(q, k, v, 256, 0.0, None, None, {})) == (
            "sdpa" if arch >= 90 else "triton")
        out = bd._attend(q, k, v, 256, 0.1, 0.0, None, None)
        want = flash_attention(q, k, v, scale=0.1, impl="triton")
    assert _rel(out, want) < 1e-2
    assert A.choose_backend(bd._attention_call(q, k, v, 256, 0.0, None, None, {})) == "triton"


@pytest.mark.gpu
def test_gpu_offsets_past_int32():
    # 4200 packed sequences of 128 tokens x 32 heads x 128: 2.2e9 elements, so the last sequences start
    # past 2**31 elements and are only reached through the kernels' 64-bit base offsets.
    n, L, h, d = 4200, 128, 32, 128
    q = torch.randn(n * L, h, d, device="cuda", dtype=torch.bfloat16)
    assert q.numel() > 2**31
    out = flash_attention(q, q, q, cu_seqlens=_cu([L] * n, "cuda"), max_seqlen=L)
    for b in (0, n - 1):
        seg = q[b * L:(b + 1) * L]
        want = flash_attention_reference(seg[None], seg[None], seg[None])[0]
        assert _rel(out[b * L:(b + 1) * L], want) < 1e-2


def test_auto_sends_fp64_to_the_reference(monkeypatch):
    """On CUDA "auto" sent fp64 to the Triton kernels, which do not take it; the dtypes it hands to Triton, read at
    the call, leave fp64 to the reference."""
    seen, real = [], F.resolve_impl
    monkeypatch.setattr(F, "resolve_impl", lambda *a, **k: seen.append(k.get("auto_dtypes")) or real(*a, **k))
    q, k, v = (torch.randn(1, 5, 2, 16, dtype=torch.float64) for _ in range(3))
    assert flash_attention(q, k, v).dtype == torch.float64
    assert seen and torch.float64 not in seen[0] and {F16, torch.bfloat16, F32} <= set(seen[0])
