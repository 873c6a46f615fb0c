"""Compile a list of kernel variants for sm_90 and sm_80 in subprocesses and check resources.

Used by the fused elementwise ops' tests (rms_norm, rope, glu). A test module defines ``VARIANTS``:
a list of (label, kernel name in the kernels module, signature, constexprs, divisible args, num_warps),
and calls ``check_all_compile(test_module_name, kernels_module_name)``. Triton decides between
interpreting and compiling at import time, so the compiling runs in fresh processes with the
interpreter off, one per arch, in parallel.
"""
import importlib
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def compile_main(test_module, kernels_module, arch):
    """Subprocess entry: compile every variant of ``test_module.VARIANTS`` for one arch, one JSON line each."""
    import tests.triton_compile as tc

    variants = importlib.import_module(test_module).VARIANTS
    mod = importlib.import_module(kernels_module)
    for label, fn_name, sig, constexprs, div, num_warps in variants:
        row = dict(label=label, kernel=fn_name, arch=arch, num_warps=num_warps)
        try:
            res = tc.compile_for_gpu(getattr(mod, fn_name), sig, constexprs, arch=arch, num_warps=num_warps,
                                     num_stages=1, divisible=div)
            row.update(ok=True, registers=res.registers, spills=res.spills, shared=res.shared_bytes)
        except Exception as exc:  # reported, then asserted on in the parent
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:400]}")
        print("VARIANT " + json.dumps(row), flush=True)


def rows_per_arch(code, archs=(90, 80)):
    """Run ``code.format(arch=...)`` in one fresh process per arch (in parallel) with the interpreter off, and
    return the JSON rows the processes printed as ``VARIANT {...}`` lines."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, "-c", code.format(arch=arch)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for arch in archs]
    rows = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        rows += [json.loads(line[8:]) for line in stdout.splitlines() if line.startswith("VARIANT ")]
    return rows


def print_rows(report):
    """For the compile reports that return a list of rows: one ``VARIANT`` line each (see rows_per_arch)."""
    for row in report:
        print("VARIANT " + json.dumps(row), flush=True)


def check_all_compile(test_module, kernels_module):
    n = len(importlib.import_module(test_module).VARIANTS)
    rows = rows_per_arch(f"import tests.compile_variants as c; c.compile_main({test_module!r}, {kernels_module!r}, "
                         "{arch})")
    assert len(rows) == 2 * n, rows
    for r in rows:
        print(r)  # shown with -s: registers / spills / shared per variant
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    for r in rows:
        assert r["spills"] == 0, r
        assert r["shared"] <= SMEM_LIMIT[r["arch"]], r
    return rows
