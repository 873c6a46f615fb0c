"""What every op in this package shares: backend choice, device and precision rules, the dropout RNG.

Layout of the package (one op per module, this module for what they share):

* ``llm2vec_kernels/<op>.py`` (``llm2vec_kernels/attention/`` for attention): the Triton kernels, their launchers, the
  autograd.Function, the public op and its pure-torch ``*_reference``;
* ``llm2vec_kernels/gpu_check/<op>.py``: the op's bf16 check on CUDA against its reference (``gpu_check()``), listed
  in the registry ``llm2vec_kernels/gpu_check/__init__.py`` (``python -m llm2vec_kernels.gpu_check``);
* this module: :func:`resolve_impl`, :func:`on_device` (:func:`on_input_device` for launchers), :func:`dot_precision`, the Philox keep function
  :func:`philox_keep` and the keep-mask kernel :func:`keep_mask_kernel`.

Backend. Every public op takes ``impl`` in {"auto", "triton", "torch"}:
  * "auto"   -> the Triton kernel on CUDA tensors of GPUs from sm_80 (of the dtypes the op lists; see
    :data:`MIN_AUTO_ARCH`), the pure-torch reference elsewhere;
  * "triton" -> always the Triton kernel (on CPU this needs ``TRITON_INTERPRET=1``);
  * "torch"  -> always the reference.
``set_default_impl`` changes what "auto" resolves to for one op family, so a config key can force an
implementation process-wide without threading arguments through models.

Launch configuration. Every op takes its fixed launch parameters from one function named ``launch_config``
in its own module (``llm2vec_kernels.attention.configs.launch_config`` for attention), returning the block sizes,
``num_warps`` and (where the op pipelines) ``num_stages`` for the kernel and shape at hand; nothing else in
an op chooses a tile. Kernel signatures: pointers end in ``_ptr``, strides are explicit ``stride_*``
arguments, compile-time constants are UPPERCASE ``tl.constexpr``, offsets that can pass 2**31 are int64,
and accumulators are fp32.

Dropout RNG. A keep decision is a pure function of a seed and the element's position: Philox-4x32 with 7
rounds (passes BigCrush, Salmon et al. 2011), keyed by the seed, on a 4-word counter that names the element
(or a group of elements). No mask is stored; a backward regenerates it. Two forms:

* :func:`philox_keep` (attention): one Philox call per element, counter (c0, c1, c2, c3); the top 24 bits of
  output word 0, as an integer, against ``round(p * 2**24)``: keep iff ``bits >= threshold``;
* :func:`philox_keep8` (LoRA, where the mask covers every input element): one Philox call per eight
  consecutive columns, counter (column // 8, row, c2, c3); its four 32-bit output words give eight 16-bit
  draws (word w's low half for column 8 g + 2 w, its high half for column 8 g + 2 w + 1),
  each against ``round(p * 2**16)``. An eighth of the Philox calls of :func:`philox_keep`, at a
  drop probability quantised to 2**-16 (p = 0.1 runs as 6554 / 65536 = 0.100006).

:func:`keep_mask_kernel` writes either mask out (tests rebuild a kernel's mask with it).
"""
import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

_VALID = ("auto", "triton", "torch")
_DEFAULTS = {"attention": "auto", "masked_ce": "auto", "contrastive": "auto", "fused_ops": "auto", "lora": "auto"}
DROPOUT_BITS = 24  # philox_keep
PACKED_DROPOUT_BITS = 16  # philox_keep8


def set_default_impl(op: str, impl: str) -> None:
    if op not in _DEFAULTS:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(_DEFAULTS)}")
    if impl not in _VALID:
        raise ValueError(f"unknown impl {impl!r} for {op}; expected one of {_VALID}")
    _DEFAULTS[op] = impl


def get_default_impl(op: str) -> str:
    return _DEFAULTS[op]


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# "auto" takes a Triton kernel on GPUs of compute capability 8.0 and later: every fixed launch config is
# compile-checked for sm_80 and sm_90 (sm_86 / sm_89 take sm_80's, within their 99 KB of shared memory). Older GPUs
# (V100, T4) run the torch references under "auto": on sm_75 the attention configs ask for 80-96 KB of shared memory
# (the card has 64 KB) and spill, and masked CE's spill. An explicit impl="triton" still runs the kernel.
MIN_AUTO_ARCH = 80


@functools.lru_cache(maxsize=None)
def cuda_arch(index):
    """Compute capability x 10 of CUDA device ``index`` (86 for an A10)."""
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def _on_cuda(tensor):  # what "auto" asks of the device (tests make a CPU tensor pass for a CUDA one here)
    if not tensor.is_cuda:
        return False
    index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    return cuda_arch(index) >= MIN_AUTO_ARCH


# The dtypes every Triton kernel here takes (fp64 and the rest run an op's reference): resolve_impl's auto_dtypes
# for the ops that accept them all, and each op's check on its Triton path.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_impl(op: str, impl, tensor: torch.Tensor, auto_dtypes=None, fits=True) -> str:
    """Return "triton" or "torch" for this call. ``op``: a family of ``_DEFAULTS`` (a new op joins one, or adds its
    own there). "auto" sends to Triton the CUDA tensors whose dtype is in ``auto_dtypes`` (None: all) when ``fits``
    (the op's kernel limits hold for this call: a width, a rank); an explicit "triton" is returned as asked, and the
    op refuses a call that does not fit in one line."""
    impl = impl or "auto"
    if impl not in _VALID:
        raise ValueError(f"unknown impl {impl!r} for {op}; expected one of {_VALID}")
    if op not in _DEFAULTS:
        raise ValueError(f"resolve_impl: unknown op family {op!r}; expected one of {sorted(_DEFAULTS)} (a new op "
                         f"joins one, or adds its own to _DEFAULTS)")
    if impl == "auto":
        impl = _DEFAULTS[op]
    if impl == "auto":
        return "triton" if (_on_cuda(tensor) and fits and (auto_dtypes is None or tensor.dtype in auto_dtypes)) \
            else "torch"
    if impl == "triton" and not tensor.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            f"{op}: impl='triton' on a CPU tensor needs TRITON_INTERPRET=1 (set before importing triton)"
        )
    return impl


def on_device(t: torch.Tensor):
    """Context for a launch on t's GPU (Triton launches on the current device); nothing on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def on_input_device(launcher):
    """Decorator for a launcher whose first argument is a tensor: its launches go to that tensor's GPU
    (:func:`on_device`). The current device need not be the tensors': a multi-device encode worker holds its model
    on cuda:1 in a process whose current device is cuda:0."""
    @functools.wraps(launcher)
    def on_its_device(t, *args, **kwargs):
        with on_device(t):
            return launcher(t, *args, **kwargs)
    return on_its_device


def dot_precision(dtype) -> str:
    """``input_precision`` of ``tl.dot``: fp32 operands run on TF32 tensor cores (~1e-3 relative error; the IEEE
    fp32 FMA path spills registers at any useful tile size), 16-bit operands ignore it. impl="torch" is the
    exact fp32 path."""
    return "tf32"


def dropout_threshold(p: float, packed: bool = False) -> int:
    """The integer threshold of :func:`philox_keep` (``packed``: :func:`philox_keep8`) for drop probability p."""
    return int(round(p * (1 << (PACKED_DROPOUT_BITS if packed else DROPOUT_BITS))))


@triton.jit
def philox_keep(seed, c0, c1, c2, c3, drop_thresh):
    """Keep-mask of the elements with Philox counters (c0, c1, c2, c3), broadcast to one tile shape."""
    zero = (c0 + c1) * 0
    r, _, _, _ = tl.philox(seed, c0 + zero, c1 + zero, c2 + zero, c3 + zero, 7)
    return (r >> (32 - 24)).to(tl.int32) >= drop_thresh


@triton.jit
def philox_keep8(seed, rows, k0, c2, c3, drop_thresh, BLOCK_K: tl.constexpr):
    """Keep-mask of the (len(rows), BLOCK_K) tile at columns k0 + [0, BLOCK_K), k0 % 8 == 0 (BLOCK_K % 8 == 0):
    one Philox call per eight columns, 16 bits per element (``drop_thresh`` = round(p * 2**16))."""
    groups = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    zero = (rows[:, None] + groups[None, :]) * 0
    r0, r1, r2, r3 = tl.philox(seed, groups[None, :] + zero, rows[:, None] + zero, zero + c2, zero + c3, 7)
    # interleave(interleave(r0, r2), interleave(r1, r3)) puts word w at column 4 g' + w; then each word splits
    # into its low and high 16 bits at columns 2 j and 2 j + 1: column 8 g + 2 w + h takes half h of word w
    words = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    halves = tl.interleave(words & 0xFFFF, words >> 16)
    return halves.to(tl.int32) >= drop_thresh


@triton.jit
def keep_mask_kernel(
    out_ptr, seed_ptr, len_ptr,
    n_rows, n_cols, n_blocks_n, stride_ob, stride_oh, stride_om, stride_on, drop_thresh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LENS: tl.constexpr, PACKED: tl.constexpr,
):
    """out[c3, c2, m, n] = philox_keep(seed, n, m, c2, c3) (PACKED: philox_keep8 at row m, column n) as int8,
    c2 = program_id(1), c3 = program_id(2).

    Axis 0 walks the (m, n) blocks, row-major. HAS_LENS: slice c3 covers len[c3] x len[c3] (a packed batch's
    sequences); otherwise n_rows x n_cols. Elements outside are not written."""
    pid = tl.program_id(0)
    c2 = tl.program_id(1)
    c3 = tl.program_id(2)
    if HAS_LENS:
        m_hi = tl.load(len_ptr + c3)
        n_hi = m_hi
    else:
        m_hi = n_rows
        n_hi = n_cols
    offs_m = (pid // n_blocks_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % n_blocks_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    if PACKED:
        keep = philox_keep8(tl.load(seed_ptr), offs_m, (pid % n_blocks_n) * BLOCK_N, c2, c3, drop_thresh, BLOCK_N)
    else:
        keep = philox_keep(tl.load(seed_ptr), offs_n[None, :], offs_m[:, None], c2, c3, drop_thresh)
    ptrs = (out_ptr + c3.to(tl.int64) * stride_ob + c2.to(tl.int64) * stride_oh
            + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :].to(tl.int64) * stride_on)
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < m_hi) & (offs_n[None, :] < n_hi))


def keep_mask(seed: torch.Tensor, shape, dropout_p: float, lens=None, packed=False) -> torch.Tensor:
    """The keep-mask (bool) :func:`philox_keep` (``packed``: :func:`philox_keep8`) gives for an int32 seed tensor
    of one element.

    ``shape`` = (C3, C2, M, N): element [c3, c2, m, n] has counter (n, m, c2, c3) (packed: row m, column n of
    slice (c2, c3)). ``lens`` (C3,) int32: slice c3 is filled only on its leading len[c3] x len[c3] block (zeros
    elsewhere)."""
    C3, C2, M, N = shape
    out = torch.zeros(shape, dtype=torch.int8, device=seed.device)
    if out.numel():
        BM, BN = 32, 32
        n_blocks_n = triton.cdiv(N, BN)
        with on_device(seed):
            keep_mask_kernel[(triton.cdiv(M, BM) * n_blocks_n, C2, C3)](
                out, seed, seed if lens is None else lens, M, N, n_blocks_n, out.stride(0), out.stride(1),
                out.stride(2), out.stride(3), dropout_threshold(dropout_p, packed), BLOCK_M=BM, BLOCK_N=BN,
                HAS_LENS=lens is not None, PACKED=packed)
    return out.bool()
