"""Compile Triton kernels for GPUs that are not here (sm_90, sm_80) and read their resource usage.

Every kernel variant is compiled this way in the tests, so a kernel that only runs in the CPU
interpreter cannot land. Usage:

    res = compile_for_gpu(_my_kernel, signature={"x_ptr": "*fp16", "n": "i32"},
                          constexprs={"BLOCK": 128}, arch=90, num_warps=4, num_stages=3)
    assert res.spills == 0

``signature`` maps every non-constexpr argument to a Triton type string ("*fp16", "*bf16", "*fp32",
"*i64", "i32", "i64", "fp32"); ``constexprs`` maps every tl.constexpr argument to its value.
``divisible`` names the arguments the runtime would specialise as divisible by 16 (16-byte aligned
pointers, strides that are multiples of 16): without those hints loads are not vectorised and the
register/spill figures do not match what runs on the GPU.

Call it with the interpreter off (``TRITON_INTERPRET`` unset, e.g. in a subprocess): under the
interpreter, kernels that call @triton.jit helpers or tl.sum/tl.max cannot be compiled.
"""
import dataclasses
import os
import re
import subprocess

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction


@dataclasses.dataclass
class CompiledKernel:
    arch: int
    registers: int
    spills: int  # bytes spilled (stores + loads)
    shared_bytes: int  # what the launch needs: Triton's dynamic shared memory, or cuobjdump's static figure
    ptx: str
    cubin: bytes = b""


def _cuobjdump():
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _as_jit_function(fn):
    # Under TRITON_INTERPRET=1 @triton.jit yields an InterpretedFunction; rebuild the compilable form.
    if isinstance(fn, JITFunction):
        return fn
    return JITFunction(fn.fn)


def compile_for_gpu(fn, signature, constexprs=None, arch=90, num_warps=4, num_stages=3, divisible=()):
    fn = _as_jit_function(fn)
    constexprs = dict(constexprs or {})
    full_sig = dict(signature)
    for name in constexprs:
        full_sig.setdefault(name, "constexpr")
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn=fn, signature=full_sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    cubin = compiled.asm["cubin"]
    path = f"/tmp/_tc_{os.getpid()}_{fn.__name__}_{arch}.cubin"
    with open(path, "wb") as f:
        f.write(cubin)
    try:
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.remove(path)
    reg = int(re.search(r"REG:(\d+)", out).group(1))
    shared = int(re.search(r"SHARED:(\d+)", out).group(1))
    stack = re.search(r"STACK:(\d+)", out)
    spill_st = re.search(r"spill stores? *[:=]? *(\d+)", out, re.I)
    spill_ld = re.search(r"spill loads? *[:=]? *(\d+)", out, re.I)
    spills = (int(spill_st.group(1)) if spill_st else 0) + (int(spill_ld.group(1)) if spill_ld else 0)
    if stack and int(stack.group(1)) > 0 and spills == 0:
        spills = int(stack.group(1))  # a stack frame on these kernels means local-memory spilling
    # cuobjdump's SHARED is static shared memory only; the pipelining buffers are Triton's dynamic share.
    shared = max(shared, int(getattr(compiled.metadata, "shared", 0) or 0))
    return CompiledKernel(arch=arch, registers=reg, spills=spills, shared_bytes=shared, ptx=compiled.asm["ptx"],
                          cubin=cubin)


def sass_instructions(res):
    """The SASS instruction mnemonics of a compiled kernel, in order (``cuobjdump -sass`` of its cubin)."""
    path = f"/tmp/_tc_{os.getpid()}_sass_{res.arch}.cubin"
    with open(path, "wb") as f:
        f.write(res.cubin)
    try:
        out = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(path)
    # lines like "        /*0120*/                   IMAD.WIDE R2, R0, 0x4, R2 ;" ; predicates "@P0" come first
    ops = []
    for line in out.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            ops.append(m.group(1))
    return ops
