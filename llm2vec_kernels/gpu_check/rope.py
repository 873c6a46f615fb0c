"""bf16 / fp16 check of :func:`llm2vec_kernels.rope` (the Triton path) on CUDA, forward and backward (dq, dk), against the
fp64 reference on the same rounded inputs; HF's apply_rotary_pos_emb in the same dtype is the yardstick."""
import torch

from ..rope import rope, rope_reference
from . import accuracy_rows, require_cuda

# (case, B, Hq, Hkv, S, D, dtype, q / k as (B, S, H, D) memory viewed as (B, H, S, D) like the models pass them)
GPU_CHECK_CASES = [
    ("llama3-8b strided", 2, 32, 8, 2048, 128, torch.bfloat16, True),
    ("llama3-8b contiguous", 2, 32, 8, 2048, 128, torch.bfloat16, False),
    ("gemma-2b D=256 MQA", 2, 8, 1, 1024, 256, torch.bfloat16, True),
    ("smollm2 D=64 odd S, fp16", 4, 9, 3, 257, 64, torch.float16, True),
]


def _rotary(B, S, D, dev, dtype):
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D))
    ang = torch.arange(S, device=dev, dtype=torch.float32)[:, None] * inv[None, :]
    emb = torch.cat((ang, ang), -1).expand(B, S, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def gpu_check(cases=None, device="cuda", factor=2.0):
    """Rows of :func:`llm2vec_kernels.gpu_check.accuracy_rows` per case: q_embed, k_embed, dq, dk."""
    dev = require_cuda("rope", device)
    rows = []
    for case, B, Hq, Hkv, S, D, dtype, strided in cases or GPU_CHECK_CASES:
        g = torch.Generator(device=dev).manual_seed(S + D)

        def make(h):
            t = torch.randn(B, S, h, D, device=dev, generator=g).to(dtype)
            return t.transpose(1, 2) if strided else t.transpose(1, 2).contiguous()

        q, k = make(Hq), make(Hkv)
        cos, sin = _rotary(B, S, D, dev, dtype)
        rows += accuracy_rows("rope", case, ["q_embed", "k_embed", "dq", "dk"],
                              lambda a, b, c, s: rope(a, b, c, s, impl="triton"), rope_reference,
                              [q, k, cos, sin], [True, True, False, False], factor)
    return rows
