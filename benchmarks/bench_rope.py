"""Benchmark: fused RoPE on q and k (llm2vec_kernels/rope.py) against transformers' apply_rotary_pos_emb, fwd + bwd.

Implementations: triton (llm2vec_kernels.rope, impl="triton", one launch for q and k), torch (the reference =
HF's q * cos + rotate_half(q) * sin, with its neg / cat copies). q and k are the models' strided views of
(B, S, H, D) memory. Columns: ms = median fwd+bwd time; tflops holds GB/s (bytes of q, k, their outputs and
gradients, in the activation dtype, over the time). GPU shapes: Mistral-7B (32 / 8 heads x 128, 16384 packed
tokens), Gemma-7B (16 / 16 heads x 256).

    python -m benchmarks.bench_rope                          # GPU
    TRITON_INTERPRET=1 python -m benchmarks.bench_rope --tiny   # CPU, seconds
"""
import torch

from benchmarks.common import run_elementwise_bench

IMPLS = ("torch", "triton")
# name -> (B, S, Hq, Hkv, D)
GPU_SHAPES = {"mistral7b": (1, 16384, 32, 8, 128), "gemma7b": (1, 16384, 16, 16, 256)}
TINY_SHAPES = {"tiny": (1, 40, 4, 2, 32)}


def _case(name, spec, device, dtype):
    from llm2vec_kernels import rope

    B, S, Hq, Hkv, D = spec
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, S, Hq, D, device=device, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, S, Hkv, D, device=device, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    ang = torch.rand(B, S, D // 2, device=device, generator=g) * 100
    ang = torch.cat([ang, ang], dim=-1)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    def step(impl):
        return torch.autograd.grad(rope(q, k, cos, sin, impl=impl), (q, k), (dq, dk))

    return f"{name} B{B} S{S} Hq{Hq} Hkv{Hkv} D{D}", 4 * (q.numel() + k.numel()) * q.element_size(), step


def main(argv=None):
    return run_elementwise_bench("rope", __doc__, argv, TINY_SHAPES, GPU_SHAPES, _case, IMPLS)


if __name__ == "__main__":
    main()
