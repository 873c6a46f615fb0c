"""The three MNTP step paths of the CPU proxy (benchmarks/bench_step_ops.py), built on real tiny-width tensors
(counting, host time) or on meta tensors at full size (costing); bench_train_step's engine-auto row builds the
"engine" path too.

  * reference        llm2vec's one-GPU recipe (benchmarks.harness.build_hf_reference): HF model + PEFT LoRA,
                     no DeepSpeed, clip 1.0 + foreach torch AdamW; SDPA, or eager attention where transformers
                     refuses SDPA (Gemma2's soft-capped scores);
  * reference-bf16   the same with PEFT's adapters cast to bf16 (PEFT keeps them fp32 by default);
  * reference-zero3  the engine's model under DeepSpeed ZeRO-3 with PEFT's LoRA, SDPA given a dense (B, 1, S, S)
                     mask, full logits, full recompute;
  * engine           the engine's own setup: engine.config (configs/mistral-7b/mntp.yaml + overrides),
                     engine.modeling.load_model, engine.trainer.setup_model (fused LoRA, the memory plan's ZeRO
                     stage and recompute policy: for the card's own memory on CUDA, for an H200 on meta / CPU,
                     see memory_budget_set), engine.stages.mntp, DeepSpeed from engine.config.deepspeed_config
                     and the trainer's optimizer-step tuning;
  * engine-as-profiled  the engine as the 2026-11-26 H200 profile ran it (ZeRO-3, PEFT LoRA, full recompute,
                     no fused decoder ops): the calibration path.
"""
import json
import os
import sys

import torch

import llm2vec_kernels
from benchmarks.harness import (DEEPSPEED_ERROR, GPU_MODEL, LORA, ROOT, SyntheticTokenizer, build_hf_reference, hf_reference_forward,
                                deepspeed, make_stages, make_train_config, set_attention_path,
                                unshift_labels)
from engine.bidirectional import set_deterministic_attention
from engine.config import deepspeed_config, load_config
from engine.distributed import init_distributed
from engine.memory import choose_recompute
from engine.modeling import add_lora, load_model, shipped_architecture
from engine.optim import tune_optimizer_step
from engine.stages.mntp import MNTPStage
from engine.trainer import EngineModule, setup_model

CONFIG = os.path.join(ROOT, "configs", "mistral-7b", "mntp.yaml")
FULL = GPU_MODEL  # the Mistral-7B structure, costed at full size on meta tensors
# what a shipped architecture file holds beyond the model's structure (ids come from the harness's model builder)
_NOT_STRUCTURE = ("architectures", "_source", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype")


def _shipped(hub_id):
    with open(shipped_architecture(hub_id)) as f:
        return {k: v for k, v in json.load(f).items() if k not in _NOT_STRUCTURE}


# --arch of bench_step_ops: the structures the proxy can cost. The MNTP recipe (configs/mistral-7b/mntp.yaml) runs
# on each; the calibration is always the Mistral-7B step the H200 profiled.
ARCHS = {"mistral-7b": FULL, "gemma2-9b": _shipped("google/gemma-2-9b-it"), "qwen3-8b": _shipped("Qwen/Qwen3-8B"),
         "phi3-mini": _shipped("microsoft/Phi-3-mini-4k-instruct")}


def tiny_of(spec):
    """Counted and timed at tiny width: the same layers, heads and op sequence, and the synthetic tokenizer's token
    ids (harness.SyntheticTokenizer): a config class's defaults can lie beyond the tiny vocabulary (SmolLM3's pad
    128004), which the embedding refuses."""
    return dict(spec, vocab_size=1024, hidden_size=64, intermediate_size=224, head_dim=2, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)


TINY = tiny_of(FULL)


def eager_bidirectional_mask(model, input_ids, dtype):
    """Eager attention adds a dense (B, 1, S, S) mask to the scores, and transformers builds a causal one unless it
    is handed masks: all zeros (every token sees every token; the batch has no padding), one per layer type, as
    llm2vec's bidirectional models pass them. The same size and cost as the causal mask."""
    B, S = input_ids.shape
    zeros = torch.zeros(B, 1, S, S, dtype=dtype, device=input_ids.device)
    return {t: zeros for t in set(model.config.layer_types)}


def hf_attention(spec):
    """The attention llm2vec's HF path runs: SDPA, except where transformers refuses it (Gemma2 soft-caps its
    scores, which SDPA cannot; transformers' Gemma2 runs eager attention)."""
    return "eager" if spec.get("attn_logit_softcapping") else "sdpa"


# llm2vec's one-GPU recipe (HF + PEFT, no DeepSpeed): as llm2vec runs it (PEFT's fp32 adapters), and with bf16
# adapters (a stronger baseline: no fp32 LoRA GEMMs, no casts around them)
HF_PATHS = ("reference", "reference-bf16")


def log(*a):
    print("[step_ops]", *a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Batch and config
# ----------------------------------------------------------------------------------------------

class Batch:
    """Token ids (B, S) with no padding, the engine's MNTP collate (shifted labels), HF labels unshifted."""

    def __init__(self, B, S, vocab, mask_prob, scheme, seed=0):
        cfg = make_train_config(False, LORA)
        cfg.mntp.mask_prob, cfg.mntp.scheme = mask_prob, scheme
        stage = MNTPStage(cfg, SyntheticTokenizer(vocab))
        g = torch.Generator().manual_seed(seed)
        items = [[1] + torch.randint(3, vocab, (S - 1,), generator=g).tolist() for _ in range(B)]
        self.engine = stage.collate(items, torch.Generator().manual_seed(seed + 1))
        self.hf = {"input_ids": self.engine["input_ids"], "hf_labels": unshift_labels(self.engine["labels"])}
        self.masked = int((self.engine["labels"] != -100).sum())
        self.lens = self.engine["attention_mask"].sum(1).tolist()


# The memory the proxy's plan is sized for where no card is present (meta, CPU): the committed profile's H200,
# 139 GiB usable.
PROXY_BUDGET_GB = 139


def memory_budget_set(device_type):
    """The memory_budget_gb override of a path built on ``device_type``.

    On CUDA: 0, which engine.memory.budget_bytes reads as the card's total memory
    (torch.cuda.get_device_properties(device).total_memory), what `deepspeed engine/train.py` plans for with the
    config's default; an 80 GB H100 is planned for 80 GB, not the H200's 139. Elsewhere (the meta / CPU proxy,
    which models the committed H200 run): PROXY_BUDGET_GB."""
    return f"memory_budget_gb={0 if device_type == 'cuda' else PROXY_BUDGET_GB}"


def engine_config(sets, spec, micro, name="engine", device_type="meta"):
    """The engine's TrainConfig: configs/mistral-7b/mntp.yaml, the benchmark's settings, then --set overrides.
    The memory plan's budget is the one of a path built on ``device_type`` (memory_budget_set)."""
    ri = json.dumps({k: v for k, v in spec.items()} | {"seed": 0})
    base = [f"model.random_init={ri}", "model.dtype=bf16", "model.attention=triton", "model.loss=triton",
            "mntp.mask_token=eos", f"batch_size={micro}", f"micro_batch_size={micro}", "lora.r=16", "lora.alpha=32",
            "lora.dropout=0.05", "progress_bar=false",
            # the engine's own choices: fused ops and LoRA as on CUDA; the memory plan's budget (memory_budget_set)
            "model.fused_ops=triton", memory_budget_set(device_type)]
    if name != "engine":  # the older paths have no fused decoder ops (the H200 profile ran without them)
        base.append("model.fused_ops=torch")
    return load_config(CONFIG, base + list(sets))


class Path:
    """One path's model and step. device 'cpu' (real, tiny) or 'meta' (full size, costing only)."""

    def __init__(self, name, spec, device, sets, micro):
        self.name, self.device, self.engine, self.ds = name, torch.device(device), None, False
        self.cfg = engine_config(sets, spec, micro, name, self.device.type)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "auto": torch.bfloat16}[
            self.cfg.model.dtype]
        self.vocab = spec["vocab_size"]
        self.plan, self.zero_stage, self.recompute = None, 3, "full"
        self.hf = name in HF_PATHS
        self.hf_eager = self.hf and hf_attention(spec) == "eager"
        if self.hf:
            self.model = build_hf_reference(spec, self.dtype, self.device, LORA, attn=hf_attention(spec))
            if name == "reference-bf16":  # PEFT made the adapters fp32: keep them in the base's bf16 instead
                self.model.to(self.dtype)
            self.model.train()
            self.params = [p for p in self.model.parameters() if p.requires_grad]
            self.opt = torch.optim.AdamW(self.params, lr=1e-5, foreach=True)  # CUDA's default; CPU's is per tensor
            return
        cfg = self.cfg
        llm2vec_kernels.set_default_impl("attention", cfg.model.attention)
        llm2vec_kernels.set_default_impl("masked_ce", cfg.model.loss)
        set_deterministic_attention(cfg.model.deterministic_attention)
        tok = SyntheticTokenizer(self.vocab)
        if name in ("engine", "engine-as-profiled"):
            stage = MNTPStage(cfg, tok)
        else:  # the older reference's loss on the engine's model: SDPA + dense 4-D mask, full logits
            stage = make_stages(cfg, tok)[("mntp", "reference")]
        with torch.device(self.device):  # the same calls as engine.trainer.train
            model, _ = load_model(cfg.model, "cuda", tok)
        if name == "engine":  # the trainer's own setup: fused LoRA, memory plan -> ZeRO stage and recompute policy
            notes = []
            model, self.plan, self.zero_stage = setup_model(cfg, stage, model, 1, 1, torch.device("cuda"),
                                                            log=notes.append)
            self.recompute = choose_recompute(cfg, self.plan, self.zero_stage)[0]
        else:  # today's reference, or the engine as the H200 profiled it: the model under ZeRO-3, PEFT's LoRA,
            # full recompute, no fused decoder ops (engine_config sets model.fused_ops=torch for these)
            model = stage.prepare_model(model)
            model.config.use_cache = False
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model = add_lora(model, cfg.lora)
            if name == "reference-zero3":
                set_attention_path(model, "reference")
        self.model = model
        self.module = EngineModule(model, stage)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-5, foreach=True)
        self.module.train()

    def init_deepspeed(self):
        """ZeRO-3 in a world of one (gloo), configured by engine.config.deepspeed_config, as the trainer does."""
        if deepspeed is None:
            raise RuntimeError(f"deepspeed cannot be imported ({DEEPSPEED_ERROR})")
        init_distributed()
        extra = {} if self.plan is None else self.plan.deepspeed_sizes()
        ds_cfg = deepspeed_config(self.cfg, 1, use_bf16=self.dtype == torch.bfloat16,
                                  stage=self.zero_stage, **extra)
        self.engine, _, _, _ = deepspeed.initialize(model=self.module, optimizer=self.opt, config=ds_cfg)
        if self.name == "engine":  # the trainer's own adjustments
            log(tune_optimizer_step(self.engine))
        self.engine.train()
        self.ds = True

    def hf_loss(self, batch):
        """The HF reference's loss (forward only)."""
        hf = batch.hf
        if self.hf_eager:  # llm2vec's bidirectional eager attention: an all-zero additive mask per layer type
            hf = dict(hf, hf_mask=eager_bidirectional_mask(self.model, hf["input_ids"], self.dtype))
        return hf_reference_forward(self.model, hf)

    def forward_backward(self, batch):
        if self.hf:
            loss = self.hf_loss(batch)
            loss.backward()
            return loss
        if self.engine is not None:
            loss, _ = self.module.stage.train_micro_step(self.engine, batch.engine)
            return loss
        loss, _ = self.module(batch.engine)
        loss.backward()
        return loss

    def skipped_steps(self):
        """Optimizer steps DeepSpeed skipped for non-finite gradients (a skipped step is a smaller op stream)."""
        return 0 if self.engine is None else int(self.engine.skipped_steps)

    def optimizer_step(self):
        if self.engine is not None:
            self.engine.step()
            return
        # clip_grad_norm_(max_norm=1.0) as it runs on CUDA (foreach), which it refuses to do on CPU / meta
        grads = [p.grad for p in self.params if p.grad is not None]
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        torch._foreach_mul_(grads, torch.clamp(1.0 / (total + 1e-6), max=1.0))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step(self, batch):
        loss = self.forward_backward(batch)
        self.optimizer_step()
        return loss



def batch_for(shape, vocab, mask):
    B, S = shape
    return Batch(B, S, vocab, *mask)
