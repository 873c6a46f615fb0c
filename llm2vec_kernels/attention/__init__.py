"""Non-causal flash attention (Triton), one concern per module:

* ``flash``     the Triton kernels, their launchers, the autograd.Function, :func:`flash_attention`, the
                pure-torch :func:`flash_attention_reference` and :func:`flash_attention_dropout_mask`;
* ``configs``   the fixed per-arch launch configs (``launch_config``) and the autotune candidate lists;
* ``tuning``    opt-in autotuning: timing per shape bucket and the per-GPU JSON cache;
* ``dispatch``  which backend runs an attention call (Triton, torch SDPA, flash-attn) by speed.

The bf16 accuracy check on CUDA is ``llm2vec_kernels/gpu_check/attention.py``. This package re-exports the public API
only; private names are imported from their module (``from llm2vec_kernels.attention import flash as F``).
Monkeypatch a name in the module that uses it (``llm2vec_kernels.attention.configs.fwd_config``,
``llm2vec_kernels.attention.flash._attn_bwd_dq``, ``llm2vec_kernels.attention.tuning._TUNED``): a patch here reaches nothing.
"""
from .configs import atomic_dq_form, atomic_dq_supported, bwd_config, fwd_config, launch_config, tune_candidates
from .dispatch import AttentionCall, choose_backend, eligible, sdpa_attention, select_backend
from .flash import flash_attention, flash_attention_dropout_mask, flash_attention_reference
from .tuning import set_autotune, tune_cache_path, tuned_configs

__all__ = [
    "flash_attention", "flash_attention_reference", "flash_attention_dropout_mask",
    "launch_config", "fwd_config", "bwd_config", "atomic_dq_supported", "atomic_dq_form", "tune_candidates",
    "set_autotune", "tuned_configs", "tune_cache_path",
    "AttentionCall", "eligible", "choose_backend", "select_backend", "sdpa_attention",
]
