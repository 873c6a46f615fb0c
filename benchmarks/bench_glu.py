"""Benchmark: fused gated activation (kernels/glu.py) against the eager act(gate) * up, forward + backward.

Implementations: triton (kernels.glu, impl="triton"), torch (the reference = HF's ACT2FN[act](gate) * up).
Columns: ms = median fwd+bwd time; tflops holds GB/s (bytes of gate, up, y, dy, dgate, dup in the activation
dtype over the time). GPU shapes: Mistral-7B SwiGLU (16384 tokens x 14336), Gemma-7B GeGLU (x 24576).

    python -m benchmarks.bench_glu                          # GPU
    TRITON_INTERPRET=1 python -m benchmarks.bench_glu --tiny   # CPU, seconds
"""
import argparse
import os

import torch

from benchmarks.common import CsvWriter, peak_memory_mb, timeit

IMPLS = ("torch", "triton")
# name -> (rows, intermediate size, activation)
GPU_SHAPES = {"mistral7b": (16384, 14336, "silu"), "gemma7b": (16384, 24576, "gelu_tanh")}
TINY_SHAPES = {"tiny": (32, 96, "silu"), "tiny_gelu": (16, 80, "gelu_tanh")}


def main(argv=None):
    from kernels import glu

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/bench_glu.csv")
    ap.add_argument("--tiny", action="store_true", help="CPU mode: tiny shapes, interpreter for the kernel")
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args(argv)
    tiny = args.tiny or not torch.cuda.is_available()
    device, dtype = ("cpu", torch.float32) if tiny else ("cuda", torch.bfloat16)
    can_triton = not tiny or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    warmup, iters = (1, args.iters or 2) if tiny else (3, args.iters or 20)
    writer, rows = CsvWriter(args.out, "glu"), []
    for name, (M, inter, act) in (TINY_SHAPES if tiny else GPU_SHAPES).items():
        g = torch.Generator(device=device).manual_seed(0)
        gate = torch.randn(M, inter, device=device, generator=g).to(dtype).requires_grad_()
        up = torch.randn(M, inter, device=device, generator=g).to(dtype).requires_grad_()
        dy = torch.randn(M, inter, device=device, generator=g).to(dtype)
        shape = f"{name} M{M} I{inter} {act}"
        nbytes = 6 * gate.numel() * gate.element_size()
        for impl in IMPLS:
            if impl == "triton" and not can_triton:
                rows.append(writer.add(shape, impl, "fwd+bwd", float("nan"), status="skipped (CPU without "
                                                                                     "TRITON_INTERPRET=1)"))
                continue

            def step(impl=impl):
                return torch.autograd.grad(glu(gate, up, act, impl=impl), (gate, up), dy)

            ms = timeit(step, warmup=warmup, iters=iters, device=device)
            rows.append(writer.add(shape, impl, "fwd+bwd", ms, tflops=nbytes / ms / 1e6,
                                   peak_mb=peak_memory_mb(step, device=device), status="ok",
                                   dtype=str(dtype).replace("torch.", ""), tflops_column="GB/s"))
    return rows


if __name__ == "__main__":
    main()
