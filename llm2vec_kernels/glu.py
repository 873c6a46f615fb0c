"""Gated MLP activation act(gate) * up, forward and backward in one elementwise pass each.

Two activations, the ones the supported families use:

    "silu"       SwiGLU (Llama, Mistral, Qwen2, Qwen3):   a(g) = g * sigmoid(g)
    "gelu_tanh"  GeGLU (Gemma, Gemma2; HF's gelu_pytorch_tanh):
                 a(g) = 0.5 * g * (1 + tanh(c * (g + 0.044715 * g^3))),  c = sqrt(2 / pi)

Forward: y = a(g) * u, computed in fp32 and rounded once to the input dtype (torch rounds a(g) first,
then the product: one rounding more). Backward recomputes a(g) from the saved inputs:

    dgate = dy * u * a'(g),   dup = dy * a(g)
    silu'(g)      = s * (1 + g * (1 - s)),  s = sigmoid(g)
    gelu_tanh'(g) = 0.5 * (1 + t) + 0.5 * g * (1 - t^2) * c * (1 + 3 * 0.044715 * g^2),  t = tanh(...)

gate and up are (..., I) tensors of one shape and dtype; they are flattened (copied first only if not
contiguous). Own kernels rather than Liger-Kernel's: see llm2vec_kernels/rms_norm.py.
"""
import torch
import triton
import triton.language as tl

from ._backend import KERNEL_DTYPES, on_device, resolve_impl

ACTIVATIONS = ("silu", "gelu_tanh")
_ACT_ID = {"silu": 0, "gelu_tanh": 1}
_SQRT_2_OVER_PI = 0.7978845608028654


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr, NEED_GRAD: tl.constexpr):
    if ACT == 0:
        s = 1.0 / (1.0 + tl.exp2(-g * 1.4426950408889634))  # exp2 -> inf for g << 0 gives s = 0
        a = g * s
        if NEED_GRAD:
            da = s * (1.0 + g * (1.0 - s))
        else:
            da = a
    else:
        # tanh(z) from e = exp(2z), r = 1 / (e + 1): 1 + t = 2er and 1 - t^2 = 4er^2 without cancellation;
        # |z| <= 20 keeps e finite (tanh(20) is 1 in fp32)
        z = tl.minimum(tl.maximum(0.7978845608028654 * (g + 0.044715 * g * g * g), -20.0), 20.0)
        e = tl.exp2(z * (2.0 * 1.4426950408889634))
        r = 1.0 / (e + 1.0)
        one_plus_t = 2.0 * e * r
        a = 0.5 * g * one_plus_t
        if NEED_GRAD:
            da = 0.5 * one_plus_t + 2.0 * g * e * r * r * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
        else:
            da = a
    return a, da


@triton.jit(do_not_specialize=["N"])
def _glu_fwd_kernel(gate_ptr, up_ptr, y_ptr, N, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < N
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT, False)
    tl.store(y_ptr + offs, (a * u).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N"])
def _glu_bwd_kernel(dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, N, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < N
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT, True)
    tl.store(dgate_ptr + offs, (dy * u * da).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, (dy * a).to(dup_ptr.dtype.element_ty), mask=mask)


def _check(gate, up, activation, triton_path):
    if activation not in ACTIVATIONS:
        raise ValueError(f"glu: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"glu: gate and up must match in shape, dtype and device, got {tuple(gate.shape)} "
                         f"{gate.dtype} {gate.device} and {tuple(up.shape)} {up.dtype} {up.device}")
    if triton_path and gate.dtype not in KERNEL_DTYPES:  # the reference takes any float (fp64 for checks)
        raise TypeError(f"glu: fp16, bf16 or fp32 expected, got {gate.dtype}")


def launch_config(n):
    """Fixed launch config for n elements: (BLOCK elements per program, num_warps)."""
    return 1024, 4


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, act):
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        N = gate.numel()
        if N:
            block, warps = launch_config(N)
            with on_device(gate):
                _glu_fwd_kernel[(triton.cdiv(N, block),)](gate, up, y, N, ACT=act, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        N = gate.numel()
        if N:
            block, warps = launch_config(N)
            with on_device(gate):
                _glu_bwd_kernel[(triton.cdiv(N, block),)](dy, gate, up, dgate, dup, N, ACT=ctx.act, BLOCK=block,
                                                          num_warps=warps)
        return (dgate if ctx.needs_input_grad[0] else None), (dup if ctx.needs_input_grad[1] else None), None


def glu_reference(gate, up, activation="silu", *, impl=None):
    """Pure torch, exactly an HF gated MLP's ``act_fn(gate_proj(x)) * up_proj(x)``."""
    if activation == "silu":
        return torch.nn.functional.silu(gate) * up
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(gate, approximate="tanh") * up
    raise ValueError(f"glu: unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def glu(gate, up, activation="silu", *, impl=None):
    """act(gate) * up for activation "silu" (SwiGLU) or "gelu_tanh" (GeGLU); same shape and dtype as gate.

    impl: "auto" | "triton" | "torch" (None: the process default for "fused_ops").
    """
    use_triton = resolve_impl("fused_ops", impl, gate, auto_dtypes=KERNEL_DTYPES) == "triton"  # auto: fp64 -> torch
    _check(gate, up, activation, use_triton)
    if use_triton:
        return _GLU.apply(gate, up, _ACT_ID[activation])
    return glu_reference(gate, up, activation)
