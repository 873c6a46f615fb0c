"""Benchmark: fused RoPE on q and k (kernels/rope.py) against transformers' apply_rotary_pos_emb, fwd + bwd.

Implementations: triton (kernels.rope, impl="triton", one launch for q and k), torch (the reference =
HF's q * cos + rotate_half(q) * sin, with its neg / cat copies). q and k are the models' strided views of
(B, S, H, D) memory. Columns: ms = median fwd+bwd time; tflops holds GB/s (bytes of q, k, their outputs and
gradients, in the activation dtype, over the time). GPU shapes: Mistral-7B (32 / 8 heads x 128, 16384 packed
tokens), Gemma-7B (16 / 16 heads x 256).

    python -m benchmarks.bench_rope                          # GPU
    TRITON_INTERPRET=1 python -m benchmarks.bench_rope --tiny   # CPU, seconds
"""
import argparse
import os

import torch

from benchmarks.common import CsvWriter, peak_memory_mb, timeit

IMPLS = ("torch", "triton")
# name -> (B, S, Hq, Hkv, D)
GPU_SHAPES = {"mistral7b": (1, 16384, 32, 8, 128), "gemma7b": (1, 16384, 16, 16, 256)}
TINY_SHAPES = {"tiny": (1, 40, 4, 2, 32)}


def main(argv=None):
    from kernels import rope

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/bench_rope.csv")
    ap.add_argument("--tiny", action="store_true", help="CPU mode: tiny shapes, interpreter for the kernel")
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args(argv)
    tiny = args.tiny or not torch.cuda.is_available()
    device, dtype = ("cpu", torch.float32) if tiny else ("cuda", torch.bfloat16)
    can_triton = not tiny or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    warmup, iters = (1, args.iters or 2) if tiny else (3, args.iters or 20)
    writer, rows = CsvWriter(args.out, "rope"), []
    for name, (B, S, Hq, Hkv, D) in (TINY_SHAPES if tiny else GPU_SHAPES).items():
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(B, S, Hq, D, device=device, generator=g).to(dtype).transpose(1, 2).requires_grad_()
        k = torch.randn(B, S, Hkv, D, device=device, generator=g).to(dtype).transpose(1, 2).requires_grad_()
        ang = torch.rand(B, S, D // 2, device=device, generator=g) * 100
        ang = torch.cat([ang, ang], dim=-1)
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        shape = f"{name} B{B} S{S} Hq{Hq} Hkv{Hkv} D{D}"
        nbytes = 4 * (q.numel() + k.numel()) * q.element_size()
        for impl in IMPLS:
            if impl == "triton" and not can_triton:
                rows.append(writer.add(shape, impl, "fwd+bwd", float("nan"), status="skipped (CPU without "
                                                                                     "TRITON_INTERPRET=1)"))
                continue

            def step(impl=impl):
                return torch.autograd.grad(rope(q, k, cos, sin, impl=impl), (q, k), (dq, dk))

            ms = timeit(step, warmup=warmup, iters=iters, device=device)
            rows.append(writer.add(shape, impl, "fwd+bwd", ms, tflops=nbytes / ms / 1e6,
                                   peak_mb=peak_memory_mb(step, device=device), status="ok",
                                   dtype=str(dtype).replace("torch.", ""), tflops_column="GB/s"))
    return rows


if __name__ == "__main__":
    main()
