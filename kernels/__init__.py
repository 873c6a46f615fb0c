"""Triton ops for llm2vec-engine.

Each op lives in its own module with a pure-torch ``*_reference`` beside it:

* :func:`flash_attention` -- non-causal (bidirectional) attention, dense or packed varlen, GQA, dropout.
* :func:`masked_cross_entropy` -- LM head + cross-entropy over labelled rows, logits never materialised.
* :func:`contrastive_loss` -- in-batch InfoNCE with hard and cross-rank negatives.
* :func:`lora_group` -- frozen-base LoRA projections sharing one input (q/k/v, gate/up), fused.

This package imports only torch and triton.
"""
from ._backend import get_default_impl, set_default_impl
from .attention import flash_attention, flash_attention_dropout_mask, flash_attention_reference
from .contrastive import all_gather_with_grad, contrastive_loss, contrastive_loss_reference
from .lora import lora_group, lora_group_reference
from .masked_ce import masked_cross_entropy, masked_cross_entropy_reference

__all__ = [
    "flash_attention",
    "flash_attention_reference",
    "flash_attention_dropout_mask",
    "masked_cross_entropy",
    "masked_cross_entropy_reference",
    "contrastive_loss",
    "contrastive_loss_reference",
    "all_gather_with_grad",
    "lora_group",
    "lora_group_reference",
    "set_default_impl",
    "get_default_impl",
]
