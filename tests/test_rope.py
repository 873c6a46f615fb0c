"""llm2vec_kernels/rope.py: the Triton rotary embedding on q and k against the fp64 reference, forward and backward.

CPU: the kernel runs in the Triton interpreter in fp32 / fp16, on odd head dims (half not a power of 2),
S = 1, GQA, strided q views as the models pass them, batch-1 cos / sin broadcast, and real shapes (Llama
32/8 heads x 128, Gemma 256). Errors are bounded by twice torch's own error in that dtype plus a few ulps.
The reference is transformers' apply_rotary_pos_emb exactly. Every launch variant compiles for sm_90 and
sm_80 without spills.
"""
import importlib

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from llm2vec_kernels import rope, rope_reference
from llm2vec_kernels._backend import interpreter_enabled

from .compile_variants import check_all_compile
from .helpers import check_bench_tiny
from .helpers import assert_close_to_fp64 as _assert_close

rp = importlib.import_module("llm2vec_kernels.rope")  # the module (llm2vec_kernels.rope is the function)
needs_interpreter = pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (CPU tests)")


def _cos_sin(B, S, D, dtype, g, base=10000.0):
    # HF's construction: angles = position * inv_freq, repeated over both halves
    inv = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    pos = torch.randint(0, 4096, (B, S), generator=g).double()
    ang = pos[..., None] * inv
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _inputs(B, Hq, Hkv, S, D, dtype, seed=0, strided=True, cos_batch=None):
    g = torch.Generator().manual_seed(seed)
    # the models pass (B, S, H, D) memory viewed as (B, H, S, D)
    q = torch.randn(B, S, Hq, D, generator=g).to(dtype).transpose(1, 2) if strided else \
        torch.randn(B, Hq, S, D, generator=g).to(dtype)
    k = torch.randn(B, S, Hkv, D, generator=g).to(dtype).transpose(1, 2)
    cos, sin = _cos_sin(cos_batch or B, S, D, dtype, g)
    dq, dk = torch.randn(q.shape, generator=g).to(dtype), torch.randn(k.shape, generator=g).to(dtype)
    return q, k, cos, sin, dq, dk


def _run(fn, q, k, cos, sin, dq, dk, **kw):
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    qo, ko = fn(q, k, cos, sin, **kw)
    torch.autograd.backward([qo, ko], [dq, dk])
    return qo.detach(), ko.detach(), q.grad, k.grad


CASES = {  # B, Hq, Hkv, S, D
    "odd_half": (2, 3, 1, 5, 10),
    "s1": (3, 4, 2, 1, 64),
    "gqa_llama": (1, 32, 8, 7, 128),
    "gemma_256": (2, 8, 1, 3, 256),
    "mha_d96": (1, 6, 6, 19, 96),
}


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_fp64_reference(case, dtype):
    q, k, cos, sin, dq, dk = _inputs(*CASES[case], dtype)
    out = _run(rope, q, k, cos, sin, dq, dk, impl="triton")
    ref = _run(rope_reference, q.double(), k.double(), cos.double(), sin.double(), dq.double(), dk.double())
    tor = _run(rope_reference, q, k, cos, sin, dq, dk)
    assert out[0].stride() == q.stride() and out[0].dtype == dtype  # same layout as torch's elementwise ops
    for name, o, r, t in zip(("q", "k", "dq", "dk"), out, ref, tor):
        _assert_close(o, r, t, dtype, name)


@needs_interpreter
def test_contiguous_q_and_broadcast_cos():
    q, k, cos, sin, dq, dk = _inputs(3, 4, 2, 9, 32, torch.float32, seed=2, strided=False, cos_batch=1)
    out = _run(rope, q, k, cos, sin, dq, dk, impl="triton")
    ref = _run(rope_reference, q.double(), k.double(), cos.double(), sin.double(), dq.double(), dk.double())
    tor = _run(rope_reference, q, k, cos, sin, dq, dk)
    for name, o, r, t in zip(("q", "k", "dq", "dk"), out, ref, tor):
        _assert_close(o, r, t, torch.float32, name)


@needs_interpreter
def test_cos_and_sin_whose_two_halves_differ():
    """The kernel reads every column of cos and sin: HF repeats the frequencies over both halves, but nothing here
    assumes it (a kernel that read the first half twice passed every test built on HF's construction)."""
    q, k, _, _, dq, dk = _inputs(2, 4, 2, 5, 12, torch.float32, seed=7)
    g = torch.Generator().manual_seed(8)
    cos, sin = (torch.randn(2, 5, 12, generator=g) for _ in range(2))
    assert not torch.equal(cos[..., :6], cos[..., 6:])
    out = _run(rope, q, k, cos, sin, dq, dk, impl="triton")
    ref = _run(rope_reference, q.double(), k.double(), cos.double(), sin.double(), dq.double(), dk.double())
    tor = _run(rope_reference, q, k, cos, sin, dq, dk)
    for name, o, r, t in zip(("q", "k", "dq", "dk"), out, ref, tor):
        _assert_close(o, r, t, torch.float32, name)


@needs_interpreter
def test_backward_is_rotation_by_minus_sin():
    # with HF's repeated frequencies the backward equals the forward with -sin
    q, k, cos, sin, dq, dk = _inputs(1, 4, 2, 6, 16, torch.float32, seed=5)
    _, _, gq, gk = _run(rope, q, k, cos, sin, dq, dk, impl="triton")
    eq, ek = rope_reference(dq.double(), dk.double(), cos.double(), -sin.double())
    assert float((gq.double() - eq).abs().max()) < 1e-5 and float((gk.double() - ek).abs().max()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_is_transformers_exactly(dtype):
    q, k, cos, sin, _, _ = _inputs(2, 4, 2, 5, 32, dtype)
    a, b = rope_reference(q, k, cos, sin)
    c, d = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(a, c) and torch.equal(b, d)


def test_validation():
    q, k, cos, sin, _, _ = _inputs(1, 2, 2, 3, 8, torch.float32)
    with pytest.raises(ValueError, match="shapes disagree"):
        rope(q, k[:, :, :2], cos, sin)
    with pytest.raises(ValueError, match="even"):
        rope(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])
    with pytest.raises(TypeError, match="dtype"):
        rope(q, k, cos.double(), sin.double())


@needs_interpreter
def test_benchmark_tiny_mode(tmp_path):
    from benchmarks import bench_rope

    check_bench_tiny(bench_rope, tmp_path)


@pytest.mark.gpu
def test_gpu_bf16_matches_fp64():
    q, k, cos, sin, dq, dk = _inputs(1, 32, 8, 4096, 128, torch.float32)
    q, k, cos, sin, dq, dk = (t.cuda().bfloat16() for t in (q, k, cos, sin, dq, dk))
    out = _run(rope, q, k, cos, sin, dq, dk, impl="triton")
    ref = _run(rope_reference, q.double(), k.double(), cos.double(), sin.double(), dq.double(), dk.double())
    tor = _run(rope_reference, q, k, cos, sin, dq, dk)
    for name, o, r, t in zip(("q", "k", "dq", "dk"), out, ref, tor):
        err, terr = float((o.double() - r).abs().max()), float((t.double() - r).abs().max())
        assert err <= 2 * terr + 4 * 2.0 ** -8 * float(r.abs().max()), (name, err, terr)


# ------------------------------------------------------------------------------------------------
# every launch variant compiles for sm_90 and sm_80 without spills
# ------------------------------------------------------------------------------------------------
def _variants():
    out = []
    for dt, D in [("bf16", 64), ("bf16", 128), ("bf16", 256), ("fp32", 128)]:
        P = "*" + dt
        BLOCK_S, BLOCK_D, nw = rp.launch_config(D)
        strides = ["stride_qb", "stride_qh", "stride_qs", "stride_kb", "stride_kh", "stride_ks", "stride_qob",
                   "stride_qoh", "stride_qos", "stride_kob", "stride_koh", "stride_kos", "stride_cs"]
        sig = dict(q_ptr=P, k_ptr=P, cos_ptr=P, sin_ptr=P, qo_ptr=P, ko_ptr=P, S="i32", num_sblocks="i32",
                   HQ="i32", HKV="i32", HALF="i32", **{s: "i32" for s in strides})
        for backward in (False, True):
            # packed varlen rows: batch 1, so the batch strides of cos / sin are 0 (constexpr, as specialised)
            out.append((f"{'bwd' if backward else 'fwd'} {dt} D={D}", "_rope_kernel", sig,
                        dict(stride_cb=0, BACKWARD=backward, BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D),
                        ["q_ptr", "k_ptr", "cos_ptr", "sin_ptr", "qo_ptr", "ko_ptr", "HALF"] + strides, nw))
    return out


VARIANTS = _variants()


@pytest.mark.compile_check("rope")
def test_all_kernel_variants_compile_for_sm90_and_sm80():
    check_all_compile("rope", "tests.test_rope")
