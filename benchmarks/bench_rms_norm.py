"""Benchmark: fused RMSNorm (kernels/rms_norm.py) against transformers' eager RMSNorm, forward + backward.

Implementations: triton (kernels.rms_norm, impl="triton"), torch (the reference = LlamaRMSNorm / GemmaRMSNorm
code: fp32 upcast, pow, mean, rsqrt, casts). The weight is frozen (LoRA), so only dx is computed.
Columns: ms = median fwd+bwd time; tflops holds GB/s instead (the op is memory-bound): bytes of x, y, dy and
dx in the activation dtype over the time; peak_mb = peak CUDA memory above the inputs.
GPU shapes: Mistral-7B hidden (16384 tokens x 4096), Gemma-7B (x 3072, Gemma form), Qwen3 q-norm rows
(16384 x 32 heads, H 128).

    python -m benchmarks.bench_rms_norm                          # GPU
    TRITON_INTERPRET=1 python -m benchmarks.bench_rms_norm --tiny   # CPU, seconds
"""
import argparse
import os

import torch

from benchmarks.common import CsvWriter, peak_memory_mb, timeit

IMPLS = ("torch", "triton")
# name -> (rows, H, gemma)
GPU_SHAPES = {"mistral7b": (16384, 4096, False), "gemma7b": (16384, 3072, True), "qwen3_qnorm": (16384 * 32, 128, False)}
TINY_SHAPES = {"tiny": (64, 96, False), "tiny_gemma": (33, 64, True)}


def main(argv=None):
    from kernels import rms_norm

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/bench_rms_norm.csv")
    ap.add_argument("--tiny", action="store_true", help="CPU mode: tiny shapes, interpreter for the kernel")
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args(argv)
    tiny = args.tiny or not torch.cuda.is_available()
    device, dtype = ("cpu", torch.float32) if tiny else ("cuda", torch.bfloat16)
    can_triton = not tiny or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    warmup, iters = (1, args.iters or 2) if tiny else (3, args.iters or 20)
    writer, rows = CsvWriter(args.out, "rms_norm"), []
    for name, (M, H, gemma) in (TINY_SHAPES if tiny else GPU_SHAPES).items():
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(M, H, device=device, generator=g).to(dtype).requires_grad_()
        w = (torch.randn(H, device=device, generator=g) * 0.1 + (0.0 if gemma else 1.0)).to(dtype)
        dy = torch.randn(M, H, device=device, generator=g).to(dtype)
        shape = f"{name} M{M} H{H}{' gemma' if gemma else ''}"
        nbytes = 4 * M * H * x.element_size()
        for impl in IMPLS:
            if impl == "triton" and not can_triton:
                rows.append(writer.add(shape, impl, "fwd+bwd", float("nan"), status="skipped (CPU without "
                                                                                     "TRITON_INTERPRET=1)"))
                continue

            def step(impl=impl):
                return torch.autograd.grad(rms_norm(x, w, 1e-6, gemma=gemma, impl=impl), x, dy)[0]

            ms = timeit(step, warmup=warmup, iters=iters, device=device)
            rows.append(writer.add(shape, impl, "fwd+bwd", ms, tflops=nbytes / ms / 1e6,
                                   peak_mb=peak_memory_mb(step, device=device), status="ok",
                                   dtype=str(dtype).replace("torch.", ""), tflops_column="GB/s"))
    return rows


if __name__ == "__main__":
    main()
