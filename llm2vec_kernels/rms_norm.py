"""RMSNorm, forward and backward in one pass each, with HF's casting rules for both families.

Shapes: x (..., H), weight (H,). Rows are x viewed as (M, H); every row is normalised in fp32:

    n = x_f32 * rstd,   rstd = 1 / sqrt(mean(x_f32^2) + eps)
    Llama / Mistral / Qwen2 / Qwen3:  y = weight * n.to(x.dtype)        (dtype: promote(weight, x))
    Gemma / Gemma2 (gemma=True):      y = (n * (1 + weight_f32)).to(x.dtype)

which is what transformers' ``LlamaRMSNorm`` / ``GemmaRMSNorm`` compute, rounding included (the
Llama form rounds n to the input dtype before the weight multiply; Gemma rounds once at the end).

Backward, with g = dy * weight (Llama) or dy * (1 + weight) (Gemma), all in fp32:

    dx = rstd * (g - n * mean(g * n))
    dweight = sum over rows of dy * n       (n rounded to x.dtype in the Llama form, as torch sees it)

The forward saves rstd (M,) fp32 only; the backward recomputes n from x. dweight is computed only
when the weight requires a gradient (under LoRA it is frozen and the kernel skips that work). It is
reduced without atomics: a fixed number of programs each walks a strided set of row blocks, keeps an
fp32 (H,) partial in registers and writes it to its own row of a (programs, H) buffer, which torch sums.

Why our own kernels (not Liger-Kernel's): a few dozen lines we control, one casting rule per family
checked against transformers' own modules, the frozen-weight shortcut and fixed launch configs
compile-checked for sm_80/sm_90 like the other ops here, and no extra dependency in the CPU tests.
"""
import torch
import triton
import triton.language as tl

from ._backend import KERNEL_DTYPES, on_device, resolve_impl

# One row lives in registers: up to 8192 wide (Llama-3-70B, Qwen2-72B) the backward with dweight compiles
# without spills at 16 warps; wider rows would spill, so they are refused (the engine keeps torch there).
MAX_H = 8192


@triton.jit(do_not_specialize=["M", "eps"])
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,
    M, H, stride_xm, stride_ym, eps,
    GEMMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < M
    col_ok = cols < H
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / H + eps)
    n = x * rstd[:, None]
    if GEMMA:
        y = n * (1.0 + w[None, :])
    else:
        y = w[None, :] * n.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit(do_not_specialize=["M", "num_blocks"])
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr,
    M, H, num_blocks, stride_dym, stride_xm, stride_dxm, stride_dwp,
    GEMMA: tl.constexpr, HAS_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < H
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if GEMMA:
        w = w + 1.0
    dw_acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for blk in range(pid, num_blocks, nprog):
        rows = tl.arange(0, BLOCK_M).to(tl.int64) + blk * BLOCK_M  # blk * BLOCK_M < M + BLOCK_M fits int32
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        n = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * n, axis=1) / H
        dx = rstd[:, None] * (g - n * c[:, None])
        tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_DW:
            if GEMMA:
                dw_acc += tl.sum(dy * n, axis=0)
            else:
                dw_acc += tl.sum(dy * n.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)
    if HAS_DW:
        tl.store(dw_part_ptr + pid.to(tl.int64) * stride_dwp + cols, dw_acc, mask=col_ok)


def launch_config(H):
    """Fixed launch config for a row width H: (BLOCK_M rows per program, BLOCK_H, num_warps)."""
    BLOCK_H = triton.next_power_of_2(H)
    BLOCK_M = max(1, min(16, 2048 // BLOCK_H))  # ~2k elements per tile: many rows per program for small H
    num_warps = 4 if BLOCK_H * BLOCK_M <= 2048 else 8 if BLOCK_H <= 4096 else 16
    return BLOCK_M, BLOCK_H, num_warps


def _bwd_programs(num_blocks, device):
    if device.type == "cuda":
        return max(1, min(num_blocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(num_blocks, 8))


def _check(x, weight, triton_path):
    if x.dim() < 1 or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: x (..., H) and weight (H,) expected, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if triton_path and x.dtype not in KERNEL_DTYPES:  # the reference takes any float (fp64 for checks)
        raise TypeError(f"rms_norm: x must be fp16, bf16 or fp32, got {x.dtype}")
    if triton_path and weight.dtype not in KERNEL_DTYPES:
        raise TypeError(f"rms_norm: weight must be fp16, bf16 or fp32, got {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x on {x.device}, weight on {weight.device}")
    if triton_path and x.shape[-1] > MAX_H:
        raise ValueError(f"rms_norm: H={x.shape[-1]} exceeds the kernel's limit {MAX_H}")


def _out_dtype(x, weight, gemma):
    return x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)


def _forward(x2, weight, eps, gemma, out_dtype, shape=None):
    # shape: the output's own (x's) shape, allocated as such: an op output that is a view of a tensor made inside the
    # autograd Function cannot be modified in place (a hook or a caller's y.mul_), where transformers' norm's can
    M, H = x2.shape
    weight = weight.contiguous()  # the kernels read it at unit stride (a no-op for a model's weight)
    out = torch.empty(shape if shape is not None else (M, H), dtype=out_dtype, device=x2.device)
    y = out.view(M, H)
    rstd = torch.empty((M,), dtype=torch.float32, device=x2.device)
    if M == 0:
        return out, rstd
    BLOCK_M, BLOCK_H, num_warps = launch_config(H)
    with on_device(x2):
        _rms_norm_fwd_kernel[(triton.cdiv(M, BLOCK_M),)](
            x2, weight, y, rstd, M, H, x2.stride(0), y.stride(0), float(eps),
            GEMMA=gemma, BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_H, num_warps=num_warps)
    return out, rstd


def _backward(dy2, x2, weight, rstd, gemma, need_dw):
    M, H = x2.shape
    weight = weight.contiguous()
    dx = torch.empty_like(x2)
    if M == 0:
        return dx, (torch.zeros(H, dtype=torch.float32, device=x2.device) if need_dw else None)
    BLOCK_M, BLOCK_H, num_warps = launch_config(H)
    num_blocks = triton.cdiv(M, BLOCK_M)
    G = _bwd_programs(num_blocks, x2.device) if need_dw else num_blocks
    part = torch.empty((G, H) if need_dw else (1, 1), dtype=torch.float32, device=x2.device)
    with on_device(x2):
        _rms_norm_bwd_kernel[(G,)](
            dy2, x2, weight, rstd, dx, part, M, H, num_blocks, dy2.stride(0), x2.stride(0), dx.stride(0),
            part.stride(0), GEMMA=gemma, HAS_DW=need_dw, BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_H, num_warps=num_warps)
    return dx, (part.sum(0) if need_dw else None)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, gemma):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y, rstd = _forward(x2, weight, eps, gemma, _out_dtype(x, weight, gemma), shape)
        # the weight is read back from saved_tensors in backward (ZeRO-3 gathers it again there)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.gemma, ctx.shape, ctx.weight_shape = gemma, shape, tuple(weight.shape)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        if tuple(weight.shape) != ctx.weight_shape:
            raise RuntimeError(f"rms_norm backward: weight is {tuple(weight.shape)}, was {ctx.weight_shape} in "
                               "forward (a ZeRO-3 partitioned weight must be gathered again for backward)")
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dx or need_dw):
            return None, None, None, None
        dy2 = dy.reshape(-1, x2.shape[1])
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx, dw = _backward(dy2, x2, weight, rstd, ctx.gemma, need_dw)
        return (dx.view(ctx.shape) if need_dx else None), (dw.to(weight.dtype) if need_dw else None), None, None


def rms_norm_reference(x, weight, eps, *, gemma=False, impl=None):
    """Pure torch, exactly transformers' LlamaRMSNorm (gemma=False) / GemmaRMSNorm (gemma=True)."""
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (n * (1.0 + weight.float())).type_as(x)
    return weight * n.to(x.dtype)


def rms_norm(x, weight, eps, *, gemma=False, impl=None):
    """RMSNorm of x (..., H) with weight (H,), in HF's Llama form or Gemma's (1 + weight) form.

    Output dtype: promote(weight, x) for the Llama form, x.dtype for Gemma (as in transformers).
    impl: "auto" | "triton" | "torch" (None: the process default for "fused_ops").
    """
    use_triton = resolve_impl("fused_ops", impl, x, auto_dtypes=KERNEL_DTYPES,  # auto: wider or fp64 -> torch
                              fits=x.shape[-1] <= MAX_H and weight.dtype in KERNEL_DTYPES) == "triton"
    _check(x, weight, use_triton)
    if use_triton:
        return _RMSNorm.apply(x, weight, float(eps), bool(gemma))
    return rms_norm_reference(x, weight, eps, gemma=gemma)
