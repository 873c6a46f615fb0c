"""bf16 / fp16 check of :func:`llm2vec_kernels.rms_norm` (the Triton path) on CUDA, forward and backward (dx, dweight),
against the fp64 reference on the same rounded inputs; HF's RMSNorm in the same dtype is the yardstick."""
import torch

from ..rms_norm import rms_norm, rms_norm_reference
from . import accuracy_rows, require_cuda

# (case, rows M, width H, gemma form, weight trainable, dtype)
GPU_CHECK_CASES = [
    ("llama3-8b frozen weight", 8192, 4096, False, False, torch.bfloat16),
    ("llama3-8b trained weight", 8192, 4096, False, True, torch.bfloat16),
    ("gemma2-2b gemma form", 4096, 2304, True, True, torch.bfloat16),
    ("llama3-70b H=MAX_H", 2048, 8192, False, True, torch.bfloat16),
    ("qwen2-0.5b odd M, fp16", 1000, 896, False, True, torch.float16),
]


def gpu_check(cases=None, device="cuda", factor=2.0):
    """Rows of :func:`llm2vec_kernels.gpu_check.accuracy_rows` per case: y, dx and (weight trainable) dweight."""
    dev = require_cuda("rms_norm", device)
    rows = []
    for case, M, H, gemma, train_w, dtype in cases or GPU_CHECK_CASES:
        g = torch.Generator(device=dev).manual_seed(M + H)
        x = (torch.randn(M, H, device=dev, generator=g) * 3.0).to(dtype)
        w = (1.0 + 0.1 * torch.randn(H, device=dev, generator=g)).to(dtype)
        names = ["y", "dx"] + (["dweight"] if train_w else [])
        rows += accuracy_rows("rms_norm", case, names,
                              lambda a, b: rms_norm(a, b, 1e-6, gemma=gemma, impl="triton"),
                              lambda a, b: rms_norm_reference(a, b, 1e-6, gemma=gemma), [x, w], [True, train_w],
                              factor)
    return rows
