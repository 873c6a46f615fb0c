"""bf16 / fp16 check of :func:`llm2vec_kernels.glu` (the Triton path) on CUDA, forward and backward (dgate, dup), against
the fp64 reference on the same rounded inputs; HF's act_fn(gate) * up in the same dtype is the yardstick."""
import torch

from ..glu import glu, glu_reference
from . import accuracy_rows, require_cuda

# (case, rows M, intermediate size I, activation, dtype)
GPU_CHECK_CASES = [
    ("llama3-8b SwiGLU", 8192, 14336, "silu", torch.bfloat16),
    ("gemma2-2b GeGLU", 4096, 9216, "gelu_tanh", torch.bfloat16),
    ("odd size SwiGLU, fp16", 1000, 4865, "silu", torch.float16),
    ("odd size GeGLU, fp16", 999, 2049, "gelu_tanh", torch.float16),
]


def gpu_check(cases=None, device="cuda", factor=2.0):
    """Rows of :func:`llm2vec_kernels.gpu_check.accuracy_rows` per case: y, dgate, dup."""
    dev = require_cuda("glu", device)
    rows = []
    for case, M, inter, act, dtype in cases or GPU_CHECK_CASES:
        g = torch.Generator(device=dev).manual_seed(M + inter)
        gate = (torch.randn(M, inter, device=dev, generator=g) * 2.0).to(dtype)
        up = torch.randn(M, inter, device=dev, generator=g).to(dtype)
        rows += accuracy_rows("glu", case, ["y", "dgate", "dup"], lambda a, b: glu(a, b, act, impl="triton"),
                              lambda a, b: glu_reference(a, b, act), [gate, up], [True, True], factor)
    return rows
