"""A run's plan without its weights: ``engine/train.py --config X.yaml --dry-run``.

The model named by the config is built at full size on the meta device (module tree and shapes, no memory):
its architecture comes from a local folder, the hub cache, or the config.json values shipped in
``configs/architectures/`` (offline, no tokenizer: token ids are synthetic, up to the config's vocab size).
LoRA is added as training adds it, the memory plan picks the ZeRO stage and the recompute policy
(``engine.memory``), and one micro-batch of the stage's shape runs through the decoder on the meta device:

    MNTP        ids (micro, max_seq_len)                       -> hidden (micro, max_seq_len, H) -> head rows
    SimCSE      ids (2 micro, max_len)                         -> embeddings (2 micro, H) -> scores (micro, micro x world)
    supervised  ids (micro (2 + hard negatives), L)            -> embeddings -> scores (micro, micro (1 + n) x world)
    scored      ids (2 micro, L)  (cosent, angle)              -> embeddings -> scores (micro,)

(L: the longer of max_len and doc_max_len; the meta forward pads the texts to the longest. The memory plan counts
each text at its own length where the model packs them, bidirectional, and texts x L where it runs them padded,
causal.) The model is made as training
makes it: bidirectional, LoRA fused per ``model.fused_ops``, pooled per ``contrastive.pooling``; the head rows and
the score shapes are computed from the batch, not run.

The plan is for the GPU the run will have: ``world`` ranks (default: the most of 8, 4, 2, 1 that divides the
global batch), each with ``memory_budget_gb`` or ``--gpu-memory-gb`` GiB of memory (default 79.65, what an 80 GB
H100 reports), bf16 unless the config sets a dtype. Data files are not read (they need not be present).
"""
import copy
import functools
import json
import math

import torch

from . import config as config_mod
from .bidirectional import check_architecture
from .bidirectional import make_bidirectional, shapes_only_attention
from .lora import fuse_lora, set_fused_impl
from .memory import choose_recompute, choose_zero_stage, context_warning, fit_warning, plan_memory, text_lengths
from .modeling import add_lora, architecture_config, check_lora_targets, describe_lora_targets, meta_model
from .optim import schedule_warnings

GPU_MEMORY_GB = 79.65  # GiB: what an 80 GB H100 reports as its total memory, and so what a run there plans for


def default_world(cfg):
    """The most of 8, 4, 2, 1 ranks that the global batch divides into whole micro-batches."""
    world = next((w for w in (8, 4, 2, 1) if cfg.batch_size % (cfg.micro_batch_size * w) == 0), None)
    if world is None:
        raise config_mod.ConfigError(f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size "
                                     f"{cfg.micro_batch_size}: no number of ranks divides it into whole micro-batches")
    return world


@functools.lru_cache(maxsize=4)
def _cached_meta(config_json, dtype):
    from transformers import AutoConfig

    values = json.loads(config_json)
    return meta_model(AutoConfig.for_model(values.pop("model_type"), **values), dtype)


def build_meta(cfg, dtype):
    """(meta causal LM made as training makes it, its config, where the architecture came from): bidirectional
    per ``model.bidirectional``, LoRA added and fused per ``model.fused_ops`` (engine.trainer.setup_model)."""
    arch, source = architecture_config(cfg.model)
    check_architecture(arch)
    model = copy.deepcopy(_cached_meta(arch.to_json_string(use_diff=False), dtype))  # one build per architecture
    if cfg.model.bidirectional:
        make_bidirectional(model)
    check_lora_targets(cfg.lora, model)
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora)
        fuse_lora(model, cfg.model.fused_ops)  # as the run fuses (triton: the kernels' rank limit checked)
        set_fused_impl(model, "auto")  # the meta forward launches nothing: auto gives meta tensors the torch path
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model, arch, source


def micro_batch_shapes(cfg, world):
    """{name: shape} of one micro-batch's token ids, and the similarity matrix of a contrastive stage."""
    c, mb = cfg.contrastive, cfg.micro_batch_size
    lens = text_lengths(cfg)  # what the memory plan counts
    if cfg.stage == "mntp":
        return {"input_ids": (len(lens), max(lens))}
    if cfg.stage == "supervised" and c.loss != "infonce":  # scored pairs: one cosine per pair
        return {"input_ids": (len(lens), max(lens)), "scores": (mb,)}
    candidates = mb if cfg.stage == "simcse" else mb * (1 + c.num_hard_negatives)
    if c.gather_across_ranks:
        candidates *= world
    return {"input_ids": (len(lens), max(lens)), "scores": (mb, candidates)}


@torch.no_grad()
def meta_step(model, cfg, shapes, arch):
    """One micro-batch through the decoder on the meta device; returns the output shapes."""
    from .modeling import decoder_of, lm_head_of

    from .pooling import pool

    ids = torch.randint(0, arch.vocab_size, shapes["input_ids"], device="meta")
    with shapes_only_attention():
        hidden = decoder_of(model)(input_ids=ids).last_hidden_state
    out = {"hidden": tuple(hidden.shape)}
    if cfg.stage == "mntp":
        rows = max(1, int(cfg.mntp.mask_prob * ids.numel()))  # the expected number of masked tokens
        out["head_rows"] = (rows, lm_head_of(model).out_features)
    else:
        mask = torch.ones(ids.shape, dtype=torch.long, device="meta")
        emb = pool(hidden, mask, cfg.contrastive.pooling, check=False)
        out["embeddings"] = tuple(emb.shape)
    return out


def dry_run(cfg, world=None, gpu_memory_gb=None, out=print):
    """Build, plan and shape-check the run of ``cfg``; print the plan through ``out``. Raises on bad input."""
    if world is not None and world < 1:
        raise config_mod.ConfigError(f"--world must be >= 1, got {world}")
    if gpu_memory_gb is None:
        gpu_memory_gb = GPU_MEMORY_GB
    if not (gpu_memory_gb > 0 and math.isfinite(gpu_memory_gb)):
        raise config_mod.ConfigError(f"--gpu-memory-gb must be a finite number > 0, got {gpu_memory_gb}")
    world = world or default_world(cfg)
    accum = config_mod.grad_accum_steps(cfg, world)
    if cfg.memory_budget_gb <= 0:
        cfg.memory_budget_gb = gpu_memory_gb
    dtype = {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16,
             "fp32": torch.float32}[cfg.model.dtype]
    model, arch, source = build_meta(cfg, dtype)
    plan = plan_memory(cfg, model, world, world, torch.device("cuda"), dtype)
    stage, why_stage = choose_zero_stage(cfg, plan)
    recompute, why_recompute = choose_recompute(cfg, plan, stage)
    shapes = micro_batch_shapes(cfg, world)
    outs = meta_step(model, cfg, shapes, arch)
    n_all = sum(p.numel() for p in model.parameters())
    ds = config_mod.deepspeed_config(cfg, world, use_bf16=dtype == torch.bfloat16, use_fp16=dtype == torch.float16,
                                     stage=stage, **plan.deepspeed_sizes())
    out(f"dry run: stage {cfg.stage}, model {cfg.model.name_or_path or 'random_init'} "
        f"({arch.model_type}, architecture from {source})")
    out(f"  architecture: hidden {arch.hidden_size}, layers {arch.num_hidden_layers}, heads "
        f"{arch.num_attention_heads}, kv heads {getattr(arch, 'num_key_value_heads', arch.num_attention_heads)}, "
        f"intermediate {arch.intermediate_size}, vocab {arch.vocab_size}; {(n_all - plan.trainable_params if cfg.lora.enabled else n_all) / 1e9:.3f}B "
        f"base parameters ({dtype})")
    out(f"  LoRA: {plan.trainable_params:,} trainable parameters (r {cfg.lora.r}, alpha {cfg.lora.alpha}, "
        f"targets {describe_lora_targets(cfg.lora.target_modules, arch.model_type)})"
        if cfg.lora.enabled else f"  full fine-tuning: {plan.trainable_params:,} trainable parameters")
    if cfg.model.adapters:
        out(f"  merged first (not loaded in a dry run): {', '.join(cfg.model.adapters)}")
    out(f"  batch: global {cfg.batch_size} = micro {cfg.micro_batch_size} x accum {accum} x world {world}")
    out("  micro-batch: " + ", ".join(f"{k} {v}" for k, v in shapes.items()) + "; meta forward: "
        + ", ".join(f"{k} {v}" for k, v in outs.items()))
    out(f"  zero stage {stage}: {why_stage}")
    out(f"  recompute {recompute}: {why_recompute}")
    out(f"  deepspeed: zero_optimization {ds['zero_optimization']['stage']}, bf16 {ds['bf16']['enabled']}, "
        f"gradient_accumulation_steps {ds['gradient_accumulation_steps']}")
    horizon = (f"{cfg.lr_decay_epochs:g} epochs of the data (in steps once the data is read)" if cfg.lr_decay_epochs
               else cfg.lr_decay_steps or cfg.max_steps)
    decay = f"decay horizon {horizon}" if cfg.lr_schedule in ("linear", "cosine") else "no decay"
    out(f"  schedule: {cfg.lr_schedule}, peak {cfg.learning_rate:g}, warmup {cfg.warmup_steps}, {decay}, "
        f"stop at {cfg.max_steps}")
    # the warnings the run gives, here before the GPUs are taken: the schedule, SimCSE without dropout, evaluation
    for warning in [*schedule_warnings(cfg), config_mod.dropout_warning(cfg), config_mod.eval_warning(cfg)]:
        if warning:
            out("  WARNING: " + warning)
    if cfg.stage != "mntp" and cfg.contrastive.grad_cache_chunk:
        out(f"  gradient caching: {cfg.contrastive.grad_cache_chunk} texts per chunk")
    if cfg.stage != "mntp" and cfg.contrastive.mask_false_negatives:
        out("  false negatives masked: a candidate with the pooled token ids of a query's positive is no negative of "
            "that query (contrastive.mask_false_negatives)")
    offload = config_mod.offload_warning(cfg, stage)
    if offload:
        out("  WARNING: " + offload)
    context = context_warning(cfg, arch)
    if context:
        out("  WARNING: " + context)
    warning = config_mod.negatives_warning(cfg, world)
    if warning:
        out("  WARNING: " + warning)
    too_big = fit_warning(plan, recompute, stage)
    if too_big:
        out("  WARNING: " + too_big)
    return {"world": world, "zero_stage": stage, "recompute": recompute, "plan": plan, "shapes": shapes,
            "outputs": outs, "warning": warning, "fits": too_big is None}
