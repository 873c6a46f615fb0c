"""Triton ops for llm2vec-engine.

Each op lives in its own module with a pure-torch ``*_reference`` beside it:

* :func:`flash_attention` -- non-causal (bidirectional) attention, dense or packed varlen, GQA, dropout.
* :func:`masked_cross_entropy` -- LM head + cross-entropy over labelled rows, logits never materialised.
* :func:`contrastive_loss` -- in-batch InfoNCE with hard and cross-rank negatives.
* :func:`rms_norm`, :func:`rope`, :func:`glu` -- the decoder layer's elementwise ops (RMSNorm in the
  Llama and Gemma forms, rotary embedding on q and k, SwiGLU / GeGLU), fused forward and backward.
* :func:`lora_group` -- frozen-base LoRA projections sharing one input (q/k/v, gate/up), fused.

This package imports only torch and triton.
"""
from ._backend import get_default_impl, set_default_impl
from .attention import flash_attention, flash_attention_dropout_mask, flash_attention_reference
from .contrastive import all_gather_with_grad, contrastive_loss, contrastive_loss_reference
from .glu import glu, glu_reference
from .lora import lora_group, lora_group_reference
from .masked_ce import masked_cross_entropy, masked_cross_entropy_reference
from .rms_norm import rms_norm, rms_norm_reference
from .rope import rope, rope_reference

__all__ = [
    "flash_attention",
    "flash_attention_reference",
    "flash_attention_dropout_mask",
    "masked_cross_entropy",
    "masked_cross_entropy_reference",
    "contrastive_loss",
    "contrastive_loss_reference",
    "all_gather_with_grad",
    "rms_norm",
    "rms_norm_reference",
    "rope",
    "rope_reference",
    "glu",
    "glu_reference",
    "lora_group",
    "lora_group_reference",
    "set_default_impl",
    "get_default_impl",
]
