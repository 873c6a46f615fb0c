"""Rotary position embedding on q and k in one launch, forward and backward.

Shapes as in transformers' ``apply_rotary_pos_emb`` (unsqueeze_dim=1): q (B, Hq, S, D), k (B, Hkv, S, D),
cos / sin (B, S, D) (the rotary module's output, already in q's dtype). With x = [x1, x2] split in halves
of D and cos = [c1, c2], sin = [s1, s2] likewise (HF repeats the frequencies, so c1 == c2, but nothing
here assumes it), rotate_half(x) = [-x2, x1] and

    out1 = x1 * c1 - x2 * s1,     out2 = x2 * c2 + x1 * s2

in fp32, rounded once to x's dtype (torch rounds each product and the sum). The backward is the
transpose of that map, i.e. the rotation by -sin:

    dx1 = do1 * c1 + do2 * s2,    dx2 = do2 * c2 - do1 * s1

One program handles BLOCK_S positions of one sequence for all heads of q and of k (a loop over heads),
so cos / sin are read once per position. q and k may be strided views (the models pass (B, S, H, D) memory viewed as (B, H, S, D));
outputs keep the input's memory layout (torch.empty_like), as torch's elementwise ops do. cos / sin get
no gradient (they are position buffers). Own kernels rather than Liger-Kernel's: see llm2vec_kernels/rms_norm.py.
"""
import torch
import triton
import triton.language as tl

from ._backend import KERNEL_DTYPES, on_device, resolve_impl

@triton.jit
def _rope_heads(x_ptr, o_ptr, c1, c2, s1, s2, b, offs_s, s_ok, NH, HALF, stride_xb, stride_xh, stride_xs,
                stride_ob, stride_oh, stride_os, BACKWARD: tl.constexpr, BLOCK_D: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    mask = s_ok[:, None] & (d[None, :] < HALF)
    x_h = x_ptr + b * stride_xb + offs_s[:, None] * stride_xs + d[None, :]  # 64-bit pointers, stepped per head
    o_h = o_ptr + b * stride_ob + offs_s[:, None] * stride_os + d[None, :]
    for _ in range(0, NH):
        x1 = tl.load(x_h, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_h + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        tl.store(o_h, o1.to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(o_h + HALF, o2.to(o_ptr.dtype.element_ty), mask=mask)
        x_h += stride_xh
        o_h += stride_oh


@triton.jit(do_not_specialize=["S", "num_sblocks"])
def _rope_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
    S, num_sblocks, HQ, HKV, HALF,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_qob, stride_qoh, stride_qos, stride_kob, stride_koh, stride_kos,
    stride_cb, stride_cs,
    BACKWARD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // num_sblocks
    offs_s = (pid % num_sblocks) * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    s_ok = offs_s < S
    d = tl.arange(0, BLOCK_D)
    cmask = s_ok[:, None] & (d[None, :] < HALF)
    cs = cos_ptr + b * stride_cb + offs_s[:, None] * stride_cs + d[None, :]
    sn = sin_ptr + b * stride_cb + offs_s[:, None] * stride_cs + d[None, :]
    c1 = tl.load(cs, mask=cmask, other=0.0).to(tl.float32)
    c2 = tl.load(cs + HALF, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.load(sn, mask=cmask, other=0.0).to(tl.float32)
    s2 = tl.load(sn + HALF, mask=cmask, other=0.0).to(tl.float32)
    _rope_heads(q_ptr, qo_ptr, c1, c2, s1, s2, b, offs_s, s_ok, HQ, HALF, stride_qb, stride_qh, stride_qs,
                stride_qob, stride_qoh, stride_qos, BACKWARD, BLOCK_D)
    _rope_heads(k_ptr, ko_ptr, c1, c2, s1, s2, b, offs_s, s_ok, HKV, HALF, stride_kb, stride_kh, stride_ks,
                stride_kob, stride_koh, stride_kos, BACKWARD, BLOCK_D)


def launch_config(D):
    """Fixed launch config for head dim D: (BLOCK_S positions per program, BLOCK_D = half of D padded, num_warps)."""
    BLOCK_D = triton.next_power_of_2(D // 2)
    BLOCK_S = max(1, min(16, 1024 // BLOCK_D))
    return BLOCK_S, BLOCK_D, 4


def _check(q, k, cos, sin, triton_path):
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        raise ValueError(f"rope: q (B, Hq, S, D), k (B, Hkv, S, D), cos / sin (B, S, D) expected, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(cos.shape)}, {tuple(sin.shape)}")
    B, Hq, S, D = q.shape
    if k.shape[0] != B or k.shape[2:] != (S, D) or cos.shape[1:] != (S, D) or cos.shape[0] not in (1, B):
        raise ValueError(f"rope: shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}")
    if D % 2:
        raise ValueError(f"rope: head dim must be even, got {D}")
    if q.dtype != k.dtype or (triton_path and q.dtype not in KERNEL_DTYPES):  # the reference: any float
        raise TypeError(f"rope: q and k must share one of fp16 / bf16 / fp32, got {q.dtype} and {k.dtype}")
    if cos.dtype != q.dtype or sin.dtype != q.dtype:
        raise TypeError(f"rope: cos / sin must have q's dtype {q.dtype} (HF's rotary module casts them), got "
                        f"{cos.dtype} / {sin.dtype}")
    if len({q.device, k.device, cos.device, sin.device}) != 1:
        raise ValueError("rope: q, k, cos and sin must be on one device")


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(q, k, cos, sin, backward):
    q, k = _unit_last(q), _unit_last(k)
    cos, sin = _unit_last(cos), _unit_last(sin)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    if B * S == 0:
        return qo, ko
    BLOCK_S, BLOCK_D, num_warps = launch_config(D)
    num_sblocks = triton.cdiv(S, BLOCK_S)
    stride_cb = cos.stride(0) if cos.shape[0] > 1 else 0  # a batch-1 cos / sin is broadcast
    with on_device(q):
        _rope_kernel[(B * num_sblocks,)](
            q, k, cos, sin, qo, ko, S, num_sblocks, Hq, Hkv, D // 2,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
            stride_cb, cos.stride(1),
            BACKWARD=backward, BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D, num_warps=num_warps)
    return qo, ko


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        qo, ko = _launch(q, k, cos, sin, False)
        ctx.save_for_backward(cos, sin)
        return qo, ko

    @staticmethod
    def backward(ctx, dqo, dko):
        cos, sin = ctx.saved_tensors
        dq, dk = _launch(dqo, dko, cos, sin, True)
        return dq, dk, None, None


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin, *, impl=None):
    """Pure torch, exactly transformers' apply_rotary_pos_emb(q, k, cos, sin) with unsqueeze_dim=1."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope(q, k, cos, sin, *, impl=None):
    """(q_embed, k_embed) for q (B, Hq, S, D), k (B, Hkv, S, D), cos / sin (B or 1, S, D), HF's convention.

    impl: "auto" | "triton" | "torch" (None: the process default for "fused_ops").
    """
    use_triton = resolve_impl("fused_ops", impl, q, auto_dtypes=KERNEL_DTYPES) == "triton"  # auto: fp64 -> torch
    _check(q, k, cos, sin, use_triton)
    if use_triton:
        return _RoPE.apply(q, k, cos.detach(), sin.detach())
    return rope_reference(q, k, cos, sin)
