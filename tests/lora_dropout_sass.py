"""SASS cost of LoRA's dropout mask per element on sm_90, read from the compiled kernels. Run as a script:

    python -m tests.lora_dropout_sass            # prints one JSON row per measurement

Two measurements, both static instruction counts of ``cuobjdump -sass`` (tests/triton_compile.py):

* ``keep_cost``: the keep function alone. A kernel computes the keep-mask of one (64, 64) tile and stores it as
  int8; the same kernel with a position function instead of the RNG is the baseline. (count - baseline) /
  (elements per thread) is the per-element cost of ``philox_keep`` (one Philox call per element, what LoRA
  used before and attention uses) and of ``philox_keep8`` (one call per eight elements, LoRA's now).
* ``kernel_cost``: each LoRA kernel compiled with and without dropout at the dropout launch config (exactly as
  tests/test_lora.py's compile check compiles it); the extra instructions per masked element per thread.
  The integer share counts the integer / logic / predicate mnemonics among the extra ones.
"""
import collections
import json
import os
import sys

import torch
import triton
import triton.language as tl

from llm2vec_kernels._backend import philox_keep, philox_keep8

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INT_PREFIXES = ("IMAD", "IADD", "IMUL", "LOP", "SHF", "SHL", "SHR", "ISETP", "SEL", "LEA", "IABS", "PRMT", "I2F",
                 "F2I", "IMNMX", "POPC", "FLO", "BMSK", "SGXT", "VIADD", "P2R", "R2P", "PLOP")


@triton.jit
def _tile_keep(out_ptr, seed_ptr, drop_thresh, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    seed = tl.load(seed_ptr)
    if MODE == 0:  # no RNG: a position function of the same shape (the baseline)
        keep = (offs_k[None, :] * 7 + offs_m[:, None] + seed) >= drop_thresh
    elif MODE == 1:
        keep = philox_keep(seed, offs_k[None, :], offs_m[:, None], 0, 0, drop_thresh)
    else:
        keep = philox_keep8(seed, offs_m, tl.program_id(1) * BLOCK_K, 0, 0, drop_thresh, BLOCK_K)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * 4096 + offs_k[None, :], keep.to(tl.int8))


def keep_cost(arch=90, block_m=64, block_k=64, warps=4):
    """SASS instructions per element of the two keep functions on one (block_m, block_k) tile."""
    import tests.triton_compile as tc

    n = {}
    for mode in (0, 1, 2):
        res = tc.compile_for_gpu(_tile_keep, dict(out_ptr="*i8", seed_ptr="*i32", drop_thresh="i32"),
                                 dict(BLOCK_M=block_m, BLOCK_K=block_k, MODE=mode), arch=arch, num_warps=warps,
                                 num_stages=1, divisible=["out_ptr"])
        n[mode] = len(tc.sass_instructions(res))
    per_thread = block_m * block_k / (32 * warps)
    return dict(what="keep function", arch=arch, tile=[block_m, block_k], warps=warps, sass_baseline=n[0],
                per_element_philox_keep=round((n[1] - n[0]) / per_thread, 2),
                per_element_philox_keep8=round((n[2] - n[0]) / per_thread, 2))


def kernel_cost(kernel, n=48, dt=torch.bfloat16, arch=90):
    """Extra SASS per masked element of LoRA kernel ``kernel`` ("down", "grad_a", "grad_x") at sum of ranks n."""
    import tests.test_lora as t
    import tests.triton_compile as tc

    out = {}
    for fn, sig, ce, warps, stages, tag in t._variants():
        name, tdt, tn, tdrop = tag.split()
        if name != kernel or tdt != str(dt) or tn != f"N{n}" or tdrop != "dTrue":
            continue
        ce = {**ce, **{a: 1 for a in sig if a in t._UNIT_STRIDES}}
        sig = {a: ty for a, ty in sig.items() if a not in t._UNIT_STRIDES}
        divisible = [a for a in sig if a not in t._NOT_DIVISIBLE and sig[a] != "fp32"]
        for drop in (False, True):  # the dropout launch config both times: only the mask differs
            res = tc.compile_for_gpu(fn, sig, dict(ce, HAS_DROPOUT=drop), arch=arch, num_warps=warps,
                                     num_stages=stages, divisible=divisible)
            out[drop] = (tc.sass_instructions(res), res, ce["BLOCK_M"], ce["BLOCK_K"], warps)
    (base, _, _, _, _), (drop, rd, bm, bk, warps) = out[False], out[True]
    extra = collections.Counter(drop) - collections.Counter(base)
    per_thread = bm * bk // (32 * warps)  # elements a thread masks per tile
    ints = sum(v for k, v in extra.items() if k.startswith(_INT_PREFIXES))
    return dict(what=f"{kernel} kernel", dtype=str(dt).replace("torch.", ""), arch=arch, tile=[bm, bk],
                warps=warps, sass_no_dropout=len(base), sass_dropout=len(drop),
                per_element=round((len(drop) - len(base)) / per_thread, 2),
                int_share=round(ints / max(sum(extra.values()), 1), 2), registers=rd.registers, spills=rd.spills)


def main(arch=90):
    rows = [keep_cost(arch)] + [kernel_cost(k, arch=arch) for k in ("down", "grad_a", "grad_x")]
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # compiling needs the interpreter off
        env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=REPO)
        os.execve(sys.executable, [sys.executable, "-m", "tests.lora_dropout_sass"], env)
    main()
