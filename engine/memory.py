"""A simple memory plan per rank: it picks the recompute policy and the ZeRO stage.

    plan = plan_memory(cfg, model, world, local_world, device)
    stage, why = choose_zero_stage(cfg, plan)          # zero_stage: auto
    policy, why = choose_recompute(cfg, plan, stage)   # model.gradient_checkpointing: auto

Terms (bytes, per rank):

* weights: every parameter in its dtype (bf16 on GPU): replicated under stages 0-2, / world under ZeRO-3;
* training state of the trainable (LoRA) parameters: fp32 master copy + grads + two Adam moments,
  16 B per trainable parameter (divided by world from stage 1 on);
* activations: tokens per micro-batch x layers x bytes per token per layer, by recompute policy
  (H hidden, I MLP width, KV = kv heads x head dim, b = bytes per element):
  none      b (9H + 4KV + 4I) + 16H  every saved tensor of a decoder layer (norm outputs, q/k/v, RoPE'd and
            rotated q/k, attention output, o, gate, up, act(gate), product) plus the two RMSNorms' fp32 internals;
  selective b (5H + 2KV + 2I)  layer input, the GEMM outputs (q/k/v, o, gate/up, down) and attention output;
  full      b H                only each layer's input; plus one layer's "none" activations while it is recomputed;
* workspace: 5% of the budget + 256 MiB (loss chunks, allocator slack, communication buffers).

The budget is ``memory_budget_gb`` when set (> 0); otherwise the GPU's total memory, or on CPU the host
RAM divided by the ranks on this host (``os.sysconf``). ZeRO stage rule: a replicated base (data parallel
through DeepSpeed) when weights + training state + full-recompute activations fit the budget, else ZeRO-3.
The replicated base is stage 0 in fp32 (DeepSpeed steps the plain torch optimizer) and stage 1 in bf16:
DeepSpeed's bf16 optimizer at stage 1 (with fp32 gradient accumulation, see ``engine.config``) keeps the LoRA
master weights and gradients flat in fp32, one norm and one inf/NaN check per step, and shards the fp32 state
over the ranks. At stage 0 a bf16 model gets DeepSpeed's per-tensor mixed-precision optimizer instead: per
trainable tensor an inf/NaN check that reads a bool back to the host, a norm and fp32 copies, about 20
launches and one host sync per LoRA tensor (448 tensors in a 7B model; ``benchmarks/bench_step_ops.py``
counts the step both ways). Recompute rule: on CPU "full" (the plan is for device memory; host RAM is not what
limits a CPU run); on GPU the least recompute (none, then selective, then full) that fits.
"""
import dataclasses
import os

import torch

GIB = 1 << 30
POLICY_ORDER = ("none", "selective", "full")


@dataclasses.dataclass
class MemoryPlan:
    weights_bytes: int
    trainable_params: int
    tokens: int  # per micro-batch on this rank (upper bound: padded length x texts)
    layers: int
    hidden: int
    per_token_layer: dict  # policy -> activation bytes per token per layer
    budget_bytes: int
    world: int
    device_type: str
    layer_numel: int = 0  # parameters of one decoder layer (ZeRO-3 prefetch bucket)
    lora_max_numel: int = 0  # largest trainable tensor (ZeRO-3 persistence threshold)
    dtype: str = "float32"  # the parameters' dtype: bfloat16 picks stage 1 for a replicated base

    def activations(self, policy):
        if policy == "full":
            return self.tokens * (self.layers * self.per_token_layer["full"] + self.per_token_layer["none"])
        return self.tokens * self.layers * self.per_token_layer[policy]

    def workspace(self):
        return int(0.05 * self.budget_bytes) + (256 << 20)

    def total(self, policy, stage):
        weights = self.weights_bytes / (self.world if stage == 3 else 1)
        state = 16 * self.trainable_params / (self.world if stage >= 1 else 1)
        return int(weights + state + self.activations(policy) + self.workspace())

    def fits(self, policy, stage):
        return self.total(policy, stage) <= self.budget_bytes

    def describe(self, policy, stage):
        return (f"planned {self.total(policy, stage) / GIB:.2f} GiB of {self.budget_bytes / GIB:.2f} GiB "
                f"(weights {self.weights_bytes / (self.world if stage == 3 else 1) / GIB:.2f}, activations "
                f"{self.activations(policy) / GIB:.2f} for {self.tokens} tokens x {self.layers} layers)")


def tokens_per_micro_batch(cfg):
    c = cfg.contrastive
    mb = cfg.micro_batch_size
    if cfg.stage == "mntp":
        return mb * cfg.max_seq_len
    if cfg.stage == "simcse":
        texts, lens = 2 * mb, [c.max_len] * (2 * mb)
    else:
        doc = c.doc_max_len or c.max_len
        lens = [c.max_len] * mb + [doc] * (mb * (1 + c.num_hard_negatives))
        texts = len(lens)
    if c.grad_cache_chunk > 0:  # one chunk of texts is alive at a time
        return max(lens) * min(c.grad_cache_chunk, texts)
    return sum(lens)


def _text_config(model):
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


def budget_bytes(cfg, device, local_world):
    if cfg.memory_budget_gb > 0:
        return int(cfg.memory_budget_gb * GIB)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(local_world, 1))


def plan_memory(cfg, model, world, local_world, device, dtype=None):
    """The plan for ``model`` (LoRA already added) with run config ``cfg`` on ``device``."""
    tc = _text_config(model)
    H = tc.hidden_size
    inter = getattr(tc, "intermediate_size", 4 * H)
    head_dim = getattr(tc, "head_dim", None) or H // tc.num_attention_heads
    kv = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    KV = kv * head_dim
    params = list(model.parameters())
    dtype = dtype or params[0].dtype
    b = torch.empty((), dtype=dtype).element_size()
    train = [p for p in params if p.requires_grad]
    layers_mod = None
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == tc.num_hidden_layers:
            layers_mod = m
            break
    layer_numel = sum(p.numel() for p in layers_mod[0].parameters()) if layers_mod is not None else 0
    return MemoryPlan(
        weights_bytes=sum(p.numel() for p in params) * b,
        trainable_params=sum(p.numel() for p in train),
        tokens=tokens_per_micro_batch(cfg),
        layers=tc.num_hidden_layers,
        hidden=H,
        per_token_layer={"none": b * (9 * H + 4 * KV + 4 * inter) + 16 * H, "selective": b * (5 * H + 2 * KV + 2 * inter),
                         "full": b * H},
        budget_bytes=budget_bytes(cfg, device, local_world),
        world=world,
        device_type=device.type,
        layer_numel=layer_numel,
        lora_max_numel=max((p.numel() for p in train), default=0),
        dtype=str(dtype).replace("torch.", ""),
    )


def choose_zero_stage(cfg, plan):
    """(stage, reason). zero_stage: auto -> a replicated base when it fits with full recompute (stage 0, or 1 in
    bf16: see the module docstring), else 3."""
    if str(cfg.zero_stage) != "auto":
        return int(cfg.zero_stage), f"zero_stage={cfg.zero_stage} set in the config"
    if plan.fits("full", 0):
        stage, how = (1, " (stage 1: DeepSpeed's flat bf16 optimizer, fp32 master weights sharded over the ranks)"
                      ) if plan.dtype == "bfloat16" else (0, "")
        return stage, (f"the replicated {plan.weights_bytes / GIB:.2f} GiB base + activations fit one rank's "
                       f"budget{how}: " + plan.describe("full", stage))
    return 3, ("the replicated base + activations do not fit one rank's budget ("
               + plan.describe("full", 0) + "); ZeRO-3 shards the base over " + f"{plan.world} ranks")


def choose_recompute(cfg, plan, stage):
    """(policy, reason). model.gradient_checkpointing: auto -> full on CPU, else the least recompute that fits."""
    policy = cfg.model.gradient_checkpointing
    if policy != "auto":
        return policy, f"model.gradient_checkpointing={policy} set in the config; " + plan.describe(policy, stage)
    if plan.device_type != "cuda":
        return "full", "auto on CPU means full recompute; " + plan.describe("full", stage)
    for p in POLICY_ORDER:
        if plan.fits(p, stage):
            return p, f"least recompute that fits: {plan.describe(p, stage)}"
    return "full", "nothing fits the plan, full recompute is the least memory: " + plan.describe("full", stage)


# ----------------------------------------------------------------------------------------------
# Selective recompute
# ----------------------------------------------------------------------------------------------

def _saved_ops():
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_flash_attention_forward", "_efficient_attention_forward")
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


def selective_context_fn():
    """torch.utils.checkpoint ``context_fn``: keep GEMM and attention outputs, recompute everything else.

    Ops run inside a Triton kernel (our attention, the fused LoRA's low-rank kernel) are not aten ops, so the
    policy cannot see them: they are re-run in the recompute like the elementwise ops.
    """
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = _saved_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def enable_recompute(model, policy):
    """Apply a recompute policy to a transformers model (before PEFT wraps it)."""
    if policy == "none":
        return
    kwargs = {"use_reentrant": False}
    if policy == "selective":
        kwargs["context_fn"] = selective_context_fn
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
