"""Non-causal flash attention (Triton), one concern per module:

* ``flash``     the Triton kernels, their launchers, the autograd.Function, :func:`flash_attention`, the
                pure-torch :func:`flash_attention_reference` and :func:`flash_attention_dropout_mask`;
* ``configs``   fixed per-arch launch configs and the autotune candidate lists;
* ``tuning``    opt-in autotuning: timing per shape bucket and the per-GPU JSON cache;
* ``dispatch``  which backend runs an attention call (Triton, torch SDPA, flash-attn) by speed;
* ``gpu_check`` bf16/fp16 accuracy against the fp64 reference (tests and the GPU run); the package attribute
                ``gpu_check`` is that module's function, which benchmarks/gpu_run.sh calls.

Everything the tests, benchmarks and engine use is re-exported here (``import kernels.attention as A``).
Monkeypatch a name in the module that uses it (``kernels.attention.configs.fwd_config``,
``kernels.attention.flash._attn_bwd_dq``, ``kernels.attention.tuning._TUNED``): a patch here reaches nothing.
"""
# flake8: noqa: F401  (re-exports)
from .configs import (_PRE_BLOCK_M, _TUNE_CANDIDATES, _arch, _block_d, _device_arch, atomic_dq_form,
                      atomic_dq_supported, bwd_config, fwd_config, tune_candidates)
from .dispatch import AttentionCall, choose_backend, eligible, sdpa_attention, select_backend
from .flash import (_DROPOUT_BITS, _LOG2E, _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_pre, _attn_fwd,
                    _dropout_mask_kernel, _FlashAttention, _Layout, _precision, _upcast, flash_attention,
                    flash_attention_dropout_mask, flash_attention_reference)
from .gpu_check import ERR_FACTOR, ERR_FLOOR, GPU_CHECK_CASES, _eager_attention, accuracy_case, gpu_check
from .tuning import _tune_key, _tuned, set_autotune, tune_cache_path, tuned_configs

__all__ = [
    "flash_attention", "flash_attention_reference", "flash_attention_dropout_mask",
    "fwd_config", "bwd_config", "atomic_dq_supported", "atomic_dq_form", "tune_candidates",
    "set_autotune", "tuned_configs", "tune_cache_path",
    "accuracy_case", "gpu_check", "ERR_FACTOR", "ERR_FLOOR",
    "AttentionCall", "eligible", "choose_backend", "select_backend", "sdpa_attention",
]
