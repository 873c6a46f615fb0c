"""Benchmark: fused RMSNorm (llm2vec_kernels/rms_norm.py) against transformers' eager RMSNorm, forward + backward.

Implementations: triton (llm2vec_kernels.rms_norm, impl="triton"), torch (the reference = LlamaRMSNorm / GemmaRMSNorm
code: fp32 upcast, pow, mean, rsqrt, casts). The weight is frozen (LoRA), so only dx is computed.
Columns: ms = median fwd+bwd time; tflops holds GB/s instead (the op is memory-bound): the bytes the fused
kernels must move (moved_bytes) over the time; peak_mb = peak CUDA memory above the inputs.
GPU shapes: Mistral-7B hidden (16384 tokens x 4096), Gemma-7B (x 3072, Gemma form), Qwen3 q-norm rows
(16384 x 32 heads, H 128).

    python -m benchmarks.bench_rms_norm                          # GPU
    TRITON_INTERPRET=1 python -m benchmarks.bench_rms_norm --tiny   # CPU, seconds
"""
import torch

from benchmarks.common import run_elementwise_bench

IMPLS = ("torch", "triton")
# name -> (rows, H, gemma)
GPU_SHAPES = {"mistral7b": (16384, 4096, False), "gemma7b": (16384, 3072, True), "qwen3_qnorm": (16384 * 32, 128, False)}
TINY_SHAPES = {"tiny": (64, 96, False), "tiny_gemma": (33, 64, True)}


def moved_bytes(M, H, b):
    """Bytes a fwd+bwd of RMSNorm over M rows of width H (element size b, frozen weight) must move. The forward
    reads x and writes y (2 M H b), reads the weight (H b) and writes rstd (M fp32: 4 M). n is not kept: the
    backward reads dy and re-reads x to recompute n = x * rstd (2 M H b), writes dx (M H b), reads rstd (4 M) and
    the weight (H b). In all 5 M H b + 2 H b + 8 M."""
    return 5 * M * H * b + 2 * H * b + 8 * M


def _case(name, spec, device, dtype):
    from llm2vec_kernels import rms_norm

    M, H, gemma = spec
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, H, device=device, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(H, device=device, generator=g) * 0.1 + (0.0 if gemma else 1.0)).to(dtype)
    dy = torch.randn(M, H, device=device, generator=g).to(dtype)

    def step(impl):
        return torch.autograd.grad(rms_norm(x, w, 1e-6, gemma=gemma, impl=impl), x, dy)[0]

    return f"{name} M{M} H{H}{' gemma' if gemma else ''}", moved_bytes(M, H, x.element_size()), step


def main(argv=None):
    return run_elementwise_bench("rms_norm", __doc__, argv, TINY_SHAPES, GPU_SHAPES, _case, IMPLS)


if __name__ == "__main__":
    main()
