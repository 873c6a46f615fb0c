"""Benchmark: fused gated activation (llm2vec_kernels/glu.py) against the eager act(gate) * up, forward + backward.

Implementations: triton (llm2vec_kernels.glu, impl="triton"), torch (the reference = HF's ACT2FN[act](gate) * up).
Columns: ms = median fwd+bwd time; tflops holds GB/s (moved_bytes, the bytes the fused kernels must move, over
the time). GPU shapes: Mistral-7B SwiGLU (16384 tokens x 14336), Gemma-7B GeGLU (x 24576).

    python -m benchmarks.bench_glu                          # GPU
    TRITON_INTERPRET=1 python -m benchmarks.bench_glu --tiny   # CPU, seconds
"""
import torch

from benchmarks.common import run_elementwise_bench

IMPLS = ("torch", "triton")
# name -> (rows, intermediate size, activation)
GPU_SHAPES = {"mistral7b": (16384, 14336, "silu"), "gemma7b": (16384, 24576, "gelu_tanh")}
TINY_SHAPES = {"tiny": (32, 96, "silu"), "tiny_gelu": (16, 80, "gelu_tanh")}


def moved_bytes(M, inter, b):
    """Bytes a fwd+bwd of act(gate) * up over (M, inter) tensors of element size b must move: the forward reads
    gate and up and writes y (3); the backward reads dy and re-reads the saved gate and up (a(gate) is not kept:
    it and a'(gate) are recomputed) (3) and writes dgate and dup (2). 8 tensors: 8 M inter b."""
    return 8 * M * inter * b


def _case(name, spec, device, dtype):
    from llm2vec_kernels import glu

    M, inter, act = spec
    g = torch.Generator(device=device).manual_seed(0)
    gate = torch.randn(M, inter, device=device, generator=g).to(dtype).requires_grad_()
    up = torch.randn(M, inter, device=device, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(M, inter, device=device, generator=g).to(dtype)

    def step(impl):
        return torch.autograd.grad(glu(gate, up, act, impl=impl), (gate, up), dy)

    return f"{name} M{M} I{inter} {act}", moved_bytes(M, inter, gate.element_size()), step


def main(argv=None):
    return run_elementwise_bench("glu", __doc__, argv, TINY_SHAPES, GPU_SHAPES, _case, IMPLS)


if __name__ == "__main__":
    main()
