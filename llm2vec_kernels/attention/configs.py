"""Launch configurations of the attention kernels (llm2vec_kernels/attention/flash.py).

Fixed per-arch configs used by default (:func:`launch_config`, the package-wide name; it reads the per-kernel
tables ``fwd_config`` / ``bwd_config``, which a benchmark sweep may monkeypatch), the atomic-dQ switches, and the
pruned candidate lists that opt-in autotuning (llm2vec_kernels/attention/tuning.py) times. Every entry compiles
without register spills on its arch under both Triton versions CI checks (tests/test_attention.py).
"""

import torch
import triton

from .._backend import cuda_arch

_PRE_BLOCK_M = 64


def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def launch_config(kind, block_d, dtype, dropout=False, arch=90, interpret=False, atomic_dq=False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of kernel ``kind`` in "fwd" / "dkdv" / "dq" (see the tables)."""
    if kind == "fwd":
        return fwd_config(block_d, dtype, dropout, arch, interpret)
    dkdv, dq = bwd_config(block_d, dtype, dropout, arch, interpret, atomic_dq)
    if kind == "dkdv":
        return dkdv
    if kind == "dq":
        return dq
    raise ValueError(f"unknown attention kernel {kind!r}; expected fwd, dkdv or dq")


def fwd_config(block_d, dtype, dropout=False, arch=90, interpret=False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward kernel.

    Every choice compiles without register spills and fits shared memory on its arch, with the newest Triton
    and with Triton 3.6 (what torch 2.11 pins; `.ci/run` checks both; tests/test_attention.py::
    test_kernels_compile_without_spills); ``python -m benchmarks.bench_attention
    --sweep`` times the sm_90 candidates. sm_80 (mma.sync, 163 KB shared) gets narrower tiles at D=128.
    """
    if interpret:
        return 32, 32, 4, 1
    if dtype == torch.float32:  # TF32 operands take twice the registers and shared memory of bf16
        return (64, 32, 4, 2) if arch >= 90 else (32, 32, 4, 2)
    if block_d <= 64:
        return 128, 64, 8, 3
    if block_d <= 128:
        return (128, 64, 8, 3) if arch >= 90 else (128, 32, 8, 3)
    return 64, 32, 8, 2


def atomic_dq_supported(block_d, dtype, interpret=False):
    """deterministic=False takes the atomic-dQ path only where its dK/dV kernel compiles without spills: fp16 /
    bf16 with head dims <= 128 (and anything in the CPU interpreter). Elsewhere it quietly stays deterministic."""
    return interpret or (dtype in (torch.float16, torch.bfloat16) and block_d <= 128)


def atomic_dq_form(arch, dropout):
    """ATOMIC_DQ for the dK/dV kernel in atomic-dQ mode: 2 forms the per-step dQ tile transposed, (D, M), so on
    sm_90 its MMA has >= 64 rows and runs as wgmma (as (M, D) with the 16-32 row query tile it fell back to
    mma.sync); 1 keeps (M, D) where the transposed form buys nothing (sm_80: mma.sync either way) or spills
    (under dropout, the Philox registers leave no room for it at D = 96/128)."""
    return 2 if arch >= 90 and not dropout else 1


def bwd_config(block_d, dtype, dropout=False, arch=90, interpret=False, atomic_dq=False):
    """((BLOCK_M, BLOCK_N, num_warps, num_stages) for dK/dV, the same for dQ).

    dK/dV programs hold two fp32 (BLOCK_N, D) accumulators plus K and V, so BLOCK_N shrinks with D. With
    ``atomic_dq`` the dK/dV kernel also forms a (BLOCK_M, D) dQ tile per step, so its query tile is smaller
    (the dQ config is then unused).
    """
    if interpret:
        return (16, 32, 4, 1), (32, 16, 4, 1)
    if atomic_dq:
        if arch >= 90:
            dkdv = (32, 128, 8, 3) if block_d <= 64 else (16, 64 if dropout else 128, 8, 3)
        else:
            dkdv = (16, 128, 8, 3) if block_d <= 64 else (16, 64, 8, 3)
        return dkdv, None
    if dtype == torch.float32:
        return (16, 32, 8, 2), (32, 32, 4, 2)
    if arch >= 90:
        if block_d <= 64:
            return (32, 128, 8, 3), (128, 32, 8, 3)
        if block_d <= 128:  # the Philox mask needs registers: a narrower query tile under dropout
            return ((16, 128, 8, 3) if dropout else (32, 64, 8, 2)), (128, 32, 8, 3)
        return (16 if dropout else 32, 32, 8, 2), (32, 32, 4, 2)
    if block_d <= 64:
        return (16, 64, 8, 3), (128, 32, 8, 3)
    if block_d <= 128:
        return (32, 32, 8, 2), (64, 32, 8, 3)
    return (16, 32, 8, 2), (32, 32, 4, 2)




# Opt-in autotuning (``set_autotune(True)`` or LLM2VEC_ATTN_AUTOTUNE=1). The fixed configs above were chosen
# from compile reports, not timings; on a new GPU the first call per bucket (kernel, arch, dtype, head-dim
# block, dropout, causal, varlen, GQA group, sequence-length bucket) times each candidate on the real inputs
# and keeps the fastest for the process. The lists are pruned offline: every entry compiles for its arch
# without register spills under both Triton versions CI checks (tests/test_attention.py::
# test_autotune_candidates_compile_without_spills), with dropout too unless marked nodrop. bf16/fp16 with head
# dims <= 128 only; everything else keeps its fixed config. Tuning synchronises the device, so do not enable it
# under CUDA-graph capture. Choices persist per GPU name in a JSON file (tune_cache_path()), so later runs skip
# the timing.
_ND = "nodrop"
_TUNE_CANDIDATES = {
    # (hopper, block_d) -> {kernel: [(BLOCK_M, BLOCK_N, num_warps, num_stages[, "nodrop"]), ...]}
    (True, 64): {
        "dkdv-atomicdq": [(32, 128, 8, 3), (16, 128, 8, 3), (16, 64, 8, 3), (32, 64, 8, 2)],
        "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3, _ND)],
        "dkdv": [(32, 128, 8, 3), (32, 64, 4, 3)],
        "dq": [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
    },
    (True, 128): {
        "dkdv-atomicdq": [(16, 128, 8, 3, _ND), (16, 128, 8, 2, _ND), (16, 64, 8, 3), (16, 64, 8, 2, _ND)],
        "fwd": [(128, 64, 8, 3), (128, 128, 8, 2, _ND), (128, 128, 8, 3, _ND), (64, 64, 4, 3, _ND), (128, 32, 8, 3)],
        "dkdv": [(32, 64, 8, 2, _ND), (32, 128, 8, 2, _ND), (16, 128, 8, 3), (16, 64, 8, 3),
                 (16, 64, 4, 3, _ND)],
        "dq": [(128, 32, 8, 3), (64, 32, 4, 3), (128, 64, 8, 3), (64, 64, 8, 3, _ND), (128, 64, 8, 2)],
    },
    (False, 64): {
        "dkdv-atomicdq": [(16, 128, 8, 3), (16, 64, 8, 3), (32, 32, 8, 3)],
        "fwd": [(128, 64, 8, 3), (128, 128, 8, 3, _ND), (64, 64, 4, 3), (128, 64, 4, 3, _ND)],
        "dkdv": [(16, 64, 8, 3)],
        "dq": [(128, 32, 8, 3), (64, 32, 4, 3)],
    },
    (False, 128): {
        "dkdv-atomicdq": [(16, 64, 8, 3), (32, 32, 8, 3)],
        "fwd": [(128, 32, 8, 3)],
        "dkdv": [(32, 32, 8, 2), (16, 128, 8, 3, _ND), (16, 64, 4, 3, _ND), (32, 64, 8, 3, _ND)],
        "dq": [(64, 32, 8, 3), (64, 32, 4, 3), (64, 64, 8, 3)],
    },
}


def tune_candidates(kernel, block_d, dtype, dropout, arch):
    """Candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) configs for ``kernel`` in "fwd" / "dkdv" / "dq" /
    "dkdv-atomicdq"."""
    if dtype not in (torch.float16, torch.bfloat16) or block_d > 128:
        return []
    table = _TUNE_CANDIDATES[(arch >= 90, 64 if block_d <= 64 else 128)][kernel]
    return [tuple(c[:4]) for c in table if not (dropout and _ND in c[4:])]


def _arch(t):
    return cuda_arch(t.device.index if t.device.index is not None else torch.cuda.current_device()) \
        if t.is_cuda else 90
