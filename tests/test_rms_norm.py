"""llm2vec_kernels/rms_norm.py: the Triton RMSNorm (Llama and Gemma forms) against the fp64 reference, fwd and bwd.

CPU: the kernels run in the Triton interpreter in fp32 / fp16. Each check bounds the kernel's error against
fp64 by twice the error torch itself makes in that dtype (transformers' own code path) plus a few ulps of the
largest value. The reference is checked to be transformers' LlamaRMSNorm / GemmaRMSNorm exactly. Every launch
variant compiles for sm_90 and sm_80 without spills.
"""
import importlib

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from llm2vec_kernels import rms_norm, rms_norm_reference
from llm2vec_kernels._backend import interpreter_enabled

from .compile_variants import check_all_compile
from .helpers import EPS, check_bench_tiny
from .helpers import assert_close_to_fp64 as _assert_close

rn = importlib.import_module("llm2vec_kernels.rms_norm")  # the module (llm2vec_kernels.rms_norm is the function)
needs_interpreter = pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (CPU tests)")


def _run(fn, x, w, dy, gemma, **kw):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(w.requires_grad)
    y = fn(x, w, 1e-6, gemma=gemma, **kw)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, w.grad


def _inputs(shape, dtype, gemma, seed=0, weight_grad=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype)
    w = (torch.randn(shape[-1], generator=g) * 0.3 + (0.0 if gemma else 1.0)).to(dtype).requires_grad_(weight_grad)
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, w, dy


SHAPES = [(3, 5, 37), (1, 1), (2, 1, 4096), (7, 128), (33, 96), (5, 2304)]


@needs_interpreter
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp64_reference(shape, dtype, gemma):
    x, w, dy = _inputs(shape, dtype, gemma)
    out = _run(rms_norm, x, w, dy, gemma, impl="triton")
    ref = _run(rms_norm_reference, x.double(), w.double(), dy.double(), gemma)
    tor = _run(rms_norm_reference, x, w, dy, gemma)
    assert out[0].dtype == tor[0].dtype == dtype and out[0].shape == x.shape
    for name, o, r, t in zip(("y", "dx", "dw"), out, ref, tor):
        _assert_close(o, r, t, dtype, name)


@needs_interpreter
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_frozen_weight_gets_no_gradient(gemma, monkeypatch):
    x, w, dy = _inputs((9, 40), torch.float32, gemma, weight_grad=False)
    seen = []
    real = rn._backward
    monkeypatch.setattr(rn, "_backward", lambda *a: seen.append(a[-1]) or real(*a))
    y, dx, dw = _run(rms_norm, x, w, dy, gemma, impl="triton")
    assert dw is None and seen == [False]  # the kernel ran without the dweight reduction
    ref = _run(rms_norm_reference, x.double(), w.double(), dy.double(), gemma)
    _assert_close(dx, ref[1], _run(rms_norm_reference, x, w, dy, gemma)[1], torch.float32, "dx")


@needs_interpreter
def test_the_output_can_be_modified_in_place_as_transformers_can():
    """The kernel's output is its own tensor, not a view made inside the autograd Function: an in-place edit (a
    forward hook's, a caller's y.mul_) raised "Output 0 of _RMSNorm is a view and is being modified inplace", where
    transformers' RMSNorm output takes it. The gradient then flows through the edit."""
    x = torch.randn(2, 3, 40, dtype=torch.float32, requires_grad=True)
    w = torch.randn(40, dtype=torch.float32)
    y = rms_norm(x, w, 1e-6, impl="triton")
    assert y.shape == (2, 3, 40) and not y._is_view()
    y.mul_(2)
    y[:, 0] = 0
    y.sum().backward()
    xr = x.detach().double().requires_grad_()
    yr = rms_norm_reference(xr, w.double(), 1e-6) * 2
    yr[:, 0] = 0
    yr.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad.float(), rtol=1e-4, atol=1e-5)


@needs_interpreter
def test_many_row_blocks_reduce_dweight_over_programs():
    # more row blocks than backward programs (8 on CPU): each program walks several blocks
    x, w, dy = _inputs((301, 24), torch.float32, False, seed=3)
    out = _run(rms_norm, x, w, dy, False, impl="triton")
    ref = _run(rms_norm_reference, x.double(), w.double(), dy.double(), False)
    tor = _run(rms_norm_reference, x, w, dy, False)
    for name, o, r, t in zip(("y", "dx", "dw"), out, ref, tor):
        _assert_close(o, r, t, torch.float32, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_is_transformers_exactly(dtype):
    x = (torch.randn(4, 6, 48) * 2).to(dtype)
    llama, gemma = LlamaRMSNorm(48, eps=1e-5).to(dtype), GemmaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        llama.weight.normal_(1.0, 0.2)
        gemma.weight.normal_(0.0, 0.2)
        assert torch.equal(rms_norm_reference(x, llama.weight, 1e-5), llama(x))
        assert torch.equal(rms_norm_reference(x, gemma.weight, 1e-5, gemma=True), gemma(x))


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_transformers_modules(dtype):
    x = (torch.randn(5, 3, 200) * 2).to(dtype)
    for mod, gemma in ((LlamaRMSNorm(200, eps=1e-6), False), (GemmaRMSNorm(200, eps=1e-6), True)):
        mod = mod.to(dtype)
        with torch.no_grad():
            mod.weight.normal_(0.0 if gemma else 1.0, 0.2)
            hf, ours = mod(x), rms_norm(x, mod.weight, 1e-6, gemma=gemma, impl="triton")
        assert ours.dtype == hf.dtype
        # a few units in the last place of the output dtype apart (rsqrt / summation order / fp16 rounding)
        err = float((ours.double() - hf.double()).abs().max())
        assert err <= 4 * EPS[dtype] * float(hf.abs().max()), err
        if dtype == torch.float16:  # same rounding steps as transformers: nearly every element is bitwise equal
            assert float((ours == hf).float().mean()) >= 0.995


@needs_interpreter
def test_a_strided_weight_is_read_at_its_stride():
    x, _, dy = _inputs((7, 24), torch.float32, False, seed=4)
    base = torch.randn(48, generator=torch.Generator().manual_seed(5)).requires_grad_()
    x = x.requires_grad_()
    w = base[::2]  # stride 2 (a clone would make it contiguous)
    assert w.stride() == (2,)
    y = rms_norm(x, w, 1e-6, impl="triton")
    y.backward(dy)
    xd, wd = x.detach().double().requires_grad_(), base.detach()[::2].double().requires_grad_()
    ref = rms_norm_reference(xd, wd, 1e-6)
    ref.backward(dy.double())
    tor = _run(rms_norm_reference, x, w, dy, False)
    for name, o, r, t in zip(("y", "dx", "dw"), (y.detach(), x.grad, base.grad[::2]), (ref.detach(), xd.grad, wd.grad),
                             tor):
        _assert_close(o, r, t, torch.float32, name)
    assert torch.all(base.grad[1::2] == 0)


@needs_interpreter
def test_mixed_weight_dtype_follows_torch_promotion():
    # an fp32 weight on fp16 activations (Llama form): the output is fp32, as in LlamaRMSNorm
    x, w, dy = _inputs((4, 64), torch.float16, False)
    out = _run(rms_norm, x, w.float(), dy, False, impl="triton")
    tor = _run(rms_norm_reference, x, w.float(), dy, False)
    ref = _run(rms_norm_reference, x.double(), w.double(), dy.double(), False)
    assert out[0].dtype == torch.float32 and out[2].dtype == torch.float32
    for name, o, r, t in zip(("y", "dx", "dw"), out, ref, tor):
        _assert_close(o, r, t, torch.float16, name)


@needs_interpreter
def test_weight_read_at_backward_time_like_zero3():
    x, w, dy = _inputs((6, 32), torch.float32, False)
    expected = _run(rms_norm, x, w, dy, False, impl="triton")
    xx, ww = x.clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = rms_norm(xx, ww, 1e-6, impl="triton")
    ww.data = torch.empty(0)  # partitioned after forward
    with pytest.raises(RuntimeError, match="ZeRO-3"):
        y.backward(dy, retain_graph=True)
    ww.data = w.detach().clone()  # gathered again, new storage
    y.backward(dy)
    assert torch.equal(xx.grad, expected[1]) and torch.equal(ww.grad, expected[2])


def test_validation():
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(3, 8), torch.ones(7), 1e-6)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):  # the kernel's dtypes; the reference takes fp64
        rms_norm(torch.randn(3, 8).double(), torch.ones(8), 1e-6, impl="triton")
    with pytest.raises(ValueError, match="limit"):
        rms_norm(torch.randn(1, rn.MAX_H + 1), torch.ones(rn.MAX_H + 1), 1e-6, impl="triton")
    with pytest.raises(ValueError, match="impl"):
        rms_norm(torch.randn(3, 8), torch.ones(8), 1e-6, impl="cuda")


@needs_interpreter
def test_auto_takes_the_reference_past_the_kernels_width_and_triton_within_it(monkeypatch):
    """"auto" on a CUDA tensor (a CPU one read as CUDA here) sends a row wider than MAX_H to the reference, not to
    the kernel's refusal; an explicit "triton" is still refused in one line, and a row within MAX_H launches."""
    from llm2vec_kernels import _backend

    monkeypatch.setattr(_backend, "_on_cuda", lambda t: True)
    seen, launch = [], rn._forward
    monkeypatch.setattr(rn, "_forward", lambda *a: seen.append(a[0].shape) or launch(*a))
    H = rn.MAX_H + 1
    x, w = torch.randn(2, H), torch.rand(H) + 0.5
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    assert seen == []
    with pytest.raises(ValueError, match="limit"):
        rms_norm(x, w, 1e-6, impl="triton")
    x, w = torch.randn(2, 64), torch.rand(64) + 0.5
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    assert seen  # the kernel ran


@needs_interpreter
def test_benchmark_tiny_mode(tmp_path):
    from benchmarks import bench_rms_norm

    check_bench_tiny(bench_rms_norm, tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_gpu_bf16_matches_fp64(gemma):
    torch.manual_seed(0)
    x = (torch.randn(4096, 4096, device="cuda") * 2).bfloat16()
    w = (torch.randn(4096, device="cuda") * 0.3 + (0.0 if gemma else 1.0)).bfloat16().requires_grad_()
    dy = torch.randn(4096, 4096, device="cuda").bfloat16()
    out = _run(rms_norm, x, w, dy, gemma, impl="triton")
    ref = _run(rms_norm_reference, x.double(), w.double(), dy.double(), gemma)
    tor = _run(rms_norm_reference, x, w, dy, gemma)
    for name, o, r, t in zip(("y", "dx", "dw"), out, ref, tor):
        err, terr = float((o.double() - r).abs().max()), float((t.double() - r).abs().max())
        assert err <= 2 * terr + 4 * 2.0 ** -8 * float(r.abs().max()), (name, err, terr)


# ------------------------------------------------------------------------------------------------
# every launch variant compiles for sm_90 and sm_80 without spills
# ------------------------------------------------------------------------------------------------
def _variants():
    out = []
    # one per launch-config bucket (4 / 8 / 16 warps), both forms, the widest fp32 row
    for dt, H, gemma in [("bf16", 128, False), ("bf16", 4096, False), ("bf16", 8192, False), ("bf16", 2304, True),
                         ("fp32", 8192, True)]:
        P = "*" + dt
        BLOCK_M, BLOCK_H, nw = rn.launch_config(H)
        div = ["H", "stride_xm", "stride_ym"] if H % 16 == 0 else []
        c = dict(GEMMA=gemma, BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_H)
        out.append((f"fwd {dt} H={H} gemma={gemma}", "_rms_norm_fwd_kernel",
                    dict(x_ptr=P, w_ptr=P, y_ptr=P, rstd_ptr="*fp32", M="i32", H="i32", stride_xm="i32",
                         stride_ym="i32", eps="fp32"), c, ["x_ptr", "w_ptr", "y_ptr", "rstd_ptr"] + div, nw))
        for has_dw in (False, True):
            out.append((f"bwd {dt} H={H} gemma={gemma} dw={has_dw}", "_rms_norm_bwd_kernel",
                        dict(dy_ptr=P, x_ptr=P, w_ptr=P, rstd_ptr="*fp32", dx_ptr=P, dw_part_ptr="*fp32", M="i32",
                             H="i32", num_blocks="i32", stride_dym="i32", stride_xm="i32", stride_dxm="i32",
                             stride_dwp="i32"), dict(c, HAS_DW=has_dw),
                        ["dy_ptr", "x_ptr", "w_ptr", "rstd_ptr", "dx_ptr", "dw_part_ptr"]
                        + (["H", "stride_dym", "stride_xm", "stride_dxm", "stride_dwp"] if H % 16 == 0 else []), nw))
    return out


VARIANTS = _variants()


@pytest.mark.compile_check("rms_norm")
def test_all_kernel_variants_compile_for_sm90_and_sm80():
    check_all_compile("rms_norm", "tests.test_rms_norm")
