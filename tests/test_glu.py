"""llm2vec_kernels/glu.py: the Triton gated activations (SwiGLU, GeGLU-tanh) against the fp64 reference, fwd and bwd.

CPU: the kernels run in the Triton interpreter in fp32 / fp16, on odd sizes, a single element, a real
intermediate size (14336) and large |gate| (the activations saturate). Errors are bounded by twice torch's own
error in that dtype plus a few ulps. The reference is transformers' ACT2FN["silu"] / ["gelu_pytorch_tanh"]
times up, exactly. Every launch variant compiles for sm_90 and sm_80 without spills.
"""
import importlib

import pytest
import torch
from transformers.activations import ACT2FN

from llm2vec_kernels import glu, glu_reference
from llm2vec_kernels._backend import interpreter_enabled

from .compile_variants import check_all_compile
from .helpers import check_bench_tiny
from .helpers import assert_close_to_fp64 as _assert_close

gm = importlib.import_module("llm2vec_kernels.glu")  # the module (llm2vec_kernels.glu is the function)
needs_interpreter = pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (CPU tests)")


def _run(fn, gate, up, dy, act, **kw):
    gate, up = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    y = fn(gate, up, act, **kw)
    y.backward(dy)
    return y.detach(), gate.grad, up.grad


SHAPES = {"odd": (3, 7, 11), "one": (1,), "real": (2, 14336)}


@needs_interpreter
@pytest.mark.parametrize("act", gm.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_matches_fp64_reference(shape, dtype, act):
    g = torch.Generator().manual_seed(0)
    shape = SHAPES[shape]
    gate = (torch.randn(shape, generator=g) * 4).to(dtype)
    if gate.numel() > 8:
        gate.view(-1)[:4] = torch.tensor([-30.0, 30.0, 0.0, -1e-3]).to(dtype)  # saturated tails, zero, tiny
    up, dy = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    out = _run(glu, gate, up, dy, act, impl="triton")
    ref = _run(glu_reference, gate.double(), up.double(), dy.double(), act)
    tor = _run(glu_reference, gate, up, dy, act)
    assert out[0].dtype == dtype and out[0].shape == gate.shape
    for name, o, r, t in zip(("y", "dgate", "dup"), out, ref, tor):
        _assert_close(o, r, t, dtype, name)


@needs_interpreter
def test_the_bound_rejects_a_kernel_off_on_the_small_outputs():
    """The error bound is no wider than needed: in fp16 at the real shape, outputs whose |y| < 0.5 shifted by 0.1
    (the max-scaled bound alone, 4 ulps of max |y|, let that pass) fail, while torch's own fp16 result passes."""
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(2, 14336, generator=g) * 4).half()
    up = torch.randn(2, 14336, generator=g).half()
    ref = glu_reference(gate.double(), up.double(), "silu")
    tor = glu_reference(gate, up, "silu")
    _assert_close(tor, ref, tor, torch.float16, "y")
    off = torch.where(tor.abs() < 0.5, tor + 0.1 * tor.sign(), tor)
    assert float((off.double() - ref).abs().max()) < 4 * 2.0 ** -10 * float(ref.abs().max())  # within the max rule
    with pytest.raises(AssertionError, match="rms"):
        _assert_close(off, ref, tor, torch.float16, "y")


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(1)
    both = torch.randn(5, 2 * 24, generator=g)
    gate, up = both[:, :24], both[:, 24:]  # strided views
    dy = torch.randn(5, 24, generator=g)
    out = _run(glu, gate, up, dy, "silu", impl="triton")
    ref = _run(glu_reference, gate.double(), up.double(), dy.double(), "silu")
    tor = _run(glu_reference, gate, up, dy, "silu")
    for name, o, r, t in zip(("y", "dgate", "dup"), out, ref, tor):
        _assert_close(o, r, t, torch.float32, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_transformers_exactly(dtype):
    gate, up = torch.randn(4, 33).to(dtype), torch.randn(4, 33).to(dtype)
    assert torch.equal(glu_reference(gate, up, "silu"), ACT2FN["silu"](gate) * up)
    assert torch.equal(glu_reference(gate, up, "gelu_tanh"), ACT2FN["gelu_pytorch_tanh"](gate) * up)


def test_validation():
    with pytest.raises(ValueError, match="activation"):
        glu(torch.randn(3), torch.randn(3), "relu")
    with pytest.raises(ValueError, match="match"):
        glu(torch.randn(3), torch.randn(4))


@needs_interpreter
def test_benchmark_tiny_mode(tmp_path):
    from benchmarks import bench_glu

    check_bench_tiny(bench_glu, tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("act", gm.ACTIVATIONS)
def test_gpu_bf16_matches_fp64(act):
    torch.manual_seed(0)
    gate, up, dy = (torch.randn(4096, 14336, device="cuda").bfloat16() for _ in range(3))
    out = _run(glu, gate * 4, up, dy, act, impl="triton")
    ref = _run(glu_reference, (gate * 4).double(), up.double(), dy.double(), act)
    tor = _run(glu_reference, gate * 4, up, dy, act)
    for name, o, r, t in zip(("y", "dgate", "dup"), out, ref, tor):
        err, terr = float((o.double() - r).abs().max()), float((t.double() - r).abs().max())
        assert err <= 2 * terr + 4 * 2.0 ** -8 * float(r.abs().max()), (name, err, terr)


# ------------------------------------------------------------------------------------------------
# every launch variant compiles for sm_90 and sm_80 without spills
# ------------------------------------------------------------------------------------------------
def _variants():
    out = []
    block, warps = gm.launch_config(1 << 20)
    for dt in ("bf16", "fp32"):
        P = "*" + dt
        for act, act_id in gm._ACT_ID.items():
            c = dict(ACT=act_id, BLOCK=block)
            out.append((f"fwd {dt} {act}", "_glu_fwd_kernel", dict(gate_ptr=P, up_ptr=P, y_ptr=P, N="i32"), c,
                        ["gate_ptr", "up_ptr", "y_ptr", "N"], warps))
            out.append((f"bwd {dt} {act}", "_glu_bwd_kernel",
                        dict(dy_ptr=P, gate_ptr=P, up_ptr=P, dgate_ptr=P, dup_ptr=P, N="i32"), c,
                        ["dy_ptr", "gate_ptr", "up_ptr", "dgate_ptr", "dup_ptr", "N"], warps))
    return out


VARIANTS = _variants()


@pytest.mark.compile_check("glu")
def test_all_kernel_variants_compile_for_sm90_and_sm80():
    check_all_compile("glu", "tests.test_glu")
