"""Which backend runs one attention call: the Triton kernel, torch SDPA, or flash-attn varlen, by speed.

The Triton kernel does everything (dense, packed varlen, right-padded in place, GQA, dropout, deterministic
backward), but where another backend at hand is faster for a case it runs that case instead:

* ``sdpa``        torch.nn.functional.scaled_dot_product_attention (cuDNN, then flash, then memory-efficient;
                  never the math backend), for dense unpadded (B, S, H, D) batches;
* ``flash_attn``  flash_attn.flash_attn_varlen_func, when the package is installed, for packed varlen batches
                  (the caller supplies it: this package imports only torch and triton);
* ``triton``      everything else: dropout (our Philox mask, replayed under activation checkpointing and
                  gradient caching), padded batches in place (``seqlens=``), fp32, other GPUs.

Fixed rule (autotuning off), from the H200 bf16 figures in benchmarks/results/2026-11-26-h200/bench_attention.csv:
on sm_90 with fp16/bf16 and no dropout, a dense batch goes to SDPA and a packed one to flash-attn (when
installed), unless the call needs a deterministic backward (training with ``deterministic=True``, the default):
SDPA's cuDNN / flash backward and flash-attn's default backward add dQ with atomics. There SDPA (cuDNN) took
0.29-0.69x the Triton kernel's fwd+bwd time and 0.50-0.64x its forward time on every dense shape (Mistral 32/8
heads x D=128 at S=128-8192, SmolLM2 9/3 x D=64 at S=512-2048); SDPA's flash backend (the FlashAttention-2 code
that flash-attn ships) 0.55-0.82x its fwd+bwd time. Those were per-call synchronised timings (host overhead
included), of the kernel as of that commit. Not measured: flash-attn's own varlen entry point (the rule takes it
to match SDPA's flash backend, the same code), its deterministic backward,
the in-place padded mode against SDPA with a padding mask (0.84x the old unpad/repad path there), and every GPU
but sm_90 (sm_80, sm_100, sm_120): those keep Triton under the fixed rule, and autotuning decides.

With autotuning on (``llm2vec_kernels.attention.set_autotune(True)`` / LLM2VEC_ATTN_AUTOTUNE=1) every eligible backend,
including flash-attn with its deterministic backward, is timed once per bucket (forward, plus backward when the
call needs gradients) on the real inputs, and the fastest is recorded in the same per-GPU cache as the launch
configs (``llm2vec_kernels.attention.tune_cache_path()``), under a "backend" key. ``model.attention=triton`` (or
``impl="triton"``) always runs Triton; ``torch`` the reference; ``auto`` on CPU is the reference, as before.
"""
import contextlib
from dataclasses import dataclass

import torch
import triton

from .._backend import MIN_AUTO_ARCH
from . import tuning
from .configs import _arch


@dataclass(frozen=True)
class AttentionCall:
    """What the dispatch needs to know about one call (all of it known on the host: no device sync)."""
    impl: str                    # "auto" | "triton" | "torch": the caller's (or the config's) setting
    device_type: str             # "cuda" | "cpu" | ...
    arch: int                    # compute capability x 10 (90 for sm_90); ignored off CUDA
    dtype: torch.dtype
    head_dim: int
    layout: str                  # "dense" (unpadded B, S, H, D) | "varlen" (packed, cu_seqlens) | "padded" (seqlens=)
    dropout: float = 0.0
    needs_grad: bool = False     # a backward will follow (grad mode on and an input requires grad)
    deterministic: bool = True   # the backward must be bitwise reproducible
    softcap: bool = False        # Gemma2 logit soft-capping
    window: bool = False         # a sliding window shorter than the longest sequence
    flash_attn: bool = False     # flash-attn is installed and the caller passes it


def device_arch(t):
    """Compute capability x 10 of a CUDA tensor's device (cached per device), 0 off CUDA."""
    return _arch(t) if t.is_cuda else 0


def eligible(call):
    """Every backend that computes this call exactly as asked (same maths, and the determinism it needs),
    Triton always among them; ["torch"] where only the reference can (sliding windows) or the setting asks for
    it. Soft-capped scores (Gemma2) are Triton's alone: SDPA cannot soft-cap, and flash-attn's soft-capping (2.6 and
    later) is not wired here or measured against the kernels."""
    if call.window or call.impl == "torch" or (call.impl == "auto" and (call.device_type != "cuda"
                                                                       or call.arch < MIN_AUTO_ARCH)):
        return ["torch"]  # (below sm_80 the kernels' configs do not fit: llm2vec_kernels._backend.MIN_AUTO_ARCH)
    if call.impl == "auto" and call.head_dim > 256:  # past the kernels' limit: the reference, not a refusal
        return ["torch"]
    if call.impl == "triton" or call.device_type != "cuda" or call.softcap:
        return ["triton"]
    if call.dropout > 0 or call.dtype not in (torch.float16, torch.bfloat16) or call.arch < 80 \
            or call.head_dim > 256 or call.head_dim % 8:
        return ["triton"]
    out = []
    if call.layout == "dense" and not (call.needs_grad and call.deterministic):
        out.append("sdpa")  # no deterministic backward in SDPA's fast backends here
    if call.layout == "varlen" and call.flash_attn:
        out.append("flash_attn")  # its backward takes deterministic=
    return out + ["triton"]


def choose_backend(call):
    """The fixed rule (see the module docstring): the first eligible backend on sm_90, where it was measured
    faster; Triton (or the reference) elsewhere."""
    cands = eligible(call)
    if cands[0] in ("torch", "triton"):
        return cands[0]
    if call.arch != 90:  # measured on sm_90 only (flash-attn 2 may have no kernels for sm_100 / sm_120)
        return "triton"
    if cands[0] == "flash_attn" and call.needs_grad and call.deterministic:
        return "triton"  # flash-attn's deterministic backward has no figure: autotuning decides
    return cands[0]


def _bucket(call, n_heads, n_kv_heads, max_seqlen, tokens):
    pow2 = lambda n: min(max(triton.next_power_of_2(max(int(n), 1)), 64), 1 << 20)  # noqa: E731
    return ("backend", call.arch, call.dtype, call.head_dim, call.layout, n_heads // max(n_kv_heads, 1), n_kv_heads,
            call.needs_grad, call.deterministic, pow2(max_seqlen), pow2(tokens))


def select_backend(call, runners, q, k, v, max_seqlen):
    """The backend to run: ``choose_backend(call)``, or with autotuning on (CUDA) the fastest of ``eligible(call)``
    timed once per bucket. ``runners`` maps each eligible backend to ``fn(q, k, v) -> out``; only the timing
    calls them (on detached copies, so the caller's graph is untouched)."""
    cands = [c for c in eligible(call) if c in runners or c in ("torch", "triton")]
    default = choose_backend(call)
    if len(cands) < 2 or not (tuning._AUTOTUNE["on"] and call.device_type == "cuda"):
        return default
    tokens = q.shape[0] * (q.shape[1] if call.layout != "varlen" else 1)
    key = _bucket(call, q.shape[-2], k.shape[-2], max_seqlen, tokens)

    def launch(name):
        # A graph of its own: identity saved-tensor hooks shadow activation checkpointing's (which would otherwise
        # take the timing's saved tensors for the checkpointed region's and fail its recompute check).
        leaves = [t.detach().requires_grad_(call.needs_grad) for t in (q, k, v)]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), \
                (torch.enable_grad() if call.needs_grad else torch.no_grad()):
            out = runners[name](*leaves)
            if call.needs_grad:
                torch.autograd.grad(out, leaves, torch.ones_like(out))
    return tuning._tuned_choice(key, default, cands, q, launch)


def sdpa_attention(q, k, v, scale=None):
    """Dense attention through torch SDPA, in the Triton kernel's layout: q (B, S, Hq, D), k/v (B, S, Hkv, D) ->
    (B, S, Hq, D), non-causal, GQA via ``enable_gqa``. On CUDA the backends are cuDNN, flash and memory-efficient in
    that order (the H200 order of speed; memory-efficient takes no GQA there); the math backend is left out, so a
    shape none of them takes raises instead of silently materialising the scores."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D) views, no copies
    with _fast_sdpa_backends() if q.is_cuda else contextlib.nullcontext():
        o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, scale=scale,
                                                             enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def _fast_sdpa_backends():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
                       set_priority=True)
