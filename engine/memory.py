"""A simple memory plan per rank: it picks the recompute policy and the ZeRO stage.

    plan = plan_memory(cfg, model, world, local_world, device)
    stage, why = choose_zero_stage(cfg, plan)          # zero_stage: auto
    policy, why = choose_recompute(cfg, plan, stage)   # model.gradient_checkpointing: auto

Terms (bytes, per rank):

* weights: every parameter in its dtype (bf16 on GPU): replicated under stages 0-2; under ZeRO-3 the base / world
  and the LoRA tensors whole (each under the persistence threshold); without LoRA (full fine-tuning) everything
  / world (the threshold is then the plain 1e4, which only norms' weights fall under);
* training state of the trainable (LoRA) parameters: fp32 master copy + grads + two Adam moments,
  16 B per trainable parameter: replicated at stage 0, the gradients replicated and the rest divided by world
  at stage 1 (4 + 12 / world), all divided by world at stages 2 and 3 (``MemoryPlan.state_bytes``);
* activations: tokens per micro-batch x bytes per token per layer, by recompute policy and by the path the decoder
  layer runs (:func:`activation_bytes`, whose docstring has the terms; tests/test_memory_plan.py measures them
  with saved-tensor hooks and holds these formulas to within 10%). Under "none" every layer keeps its saved set;
  under "selective" and "full" each layer keeps its cached set and, while one layer is recomputed in the
  backward, that layer holds its "none" set instead: tokens x ((layers - 1) x policy + none);
* DeepSpeed's buffers (``MemoryPlan.zero_buffers``): the contiguous gradient buffer of one reduce bucket
  (``engine.config.zero_reduce_bucket``: the trainable parameters rounded up, at most 5e8 elements, 5e7 at stage
  3) that DeepSpeed 0.19 allocates whole on its ZeRO optimizers: stage 1 when it is not the flat bf16 optimizer
  (fp16, fp32, or bf16 with ``offload_optimizer``; fp32 under bf16, which accumulates in fp32), stages 2 and 3
  in the parameters' dtype; under ZeRO-3 also the gathered base weights alive at once, the module being run and
  the prefetched bucket (two buckets of max(5e7, one decoder layer) parameters) and the largest single parameter
  (the embedding table, gathered whole), in the weights' dtype;
* the MNTP loss on the torch path (``model.loss=torch``, or auto off CUDA or before sm_80;
  ``mntp_torch_loss_bytes``): five fp32 tensors of the masked rows' logits at the backward's peak, plus the fp32
  copy of the LM head's weight that the matmul keeps (measured: ``masked_ce_reference_peak``); the Triton kernel
  makes no logits (the workspace covers it);
* attention on the exact torch path (``flash_attention_reference``, fp32 L x L scores per head; see
  :func:`activation_bytes`): in the layers whose sliding window cuts the sequence, and in every layer where the
  attention dispatch sends no call to a kernel (:func:`attention_torch_reason`: ``model.attention=torch``; auto off
  CUDA, on GPUs before sm_80 and past head dim 256). The dry run plans a GPU it does not have as an sm_80+ one;
* workspace: 5% of the budget + 256 MiB (loss chunks, allocator slack);
* not modelled, on the safe side: ``offload_optimizer`` and ``offload_params`` (the plan keeps the optimizer state
  and the ZeRO-3 shard of the base on the GPU);
* the start: the trainer places the whole model on each GPU before ``deepspeed.initialize`` (and DeepSpeed would
  itself: the engine does not build the model under ``deepspeed.zero.Init``), so ZeRO-3 shards a base that was
  first whole on every GPU. A plan fits only when that start fits too (``MemoryPlan.startup``): ZeRO-3 makes room
  for activations next to a base that fits one GPU, it does not run a base larger than one GPU.

The budget is ``memory_budget_gb`` when set (> 0); otherwise the GPU's total memory, or on CPU the host
RAM divided by the ranks on this host (``os.sysconf``). ZeRO stage rule: a replicated base (data parallel
through DeepSpeed) when weights + training state + full-recompute activations fit the budget, else ZeRO-3.
The replicated base is stage 0 in fp32 (DeepSpeed steps the plain torch optimizer) and stage 1 in bf16 and fp16
(fp16 at stage 0 is refused: DeepSpeed's non-ZeRO fp16 optimizer unscales gradients that its engine.backward
never scaled, ``engine.config.FP16_STAGE0``). In bf16:
DeepSpeed's bf16 optimizer at stage 1 (with fp32 gradient accumulation, see ``engine.config``) keeps the LoRA
master weights and gradients flat in fp32, one norm and one inf/NaN check per step, and shards the fp32 state
over the ranks. At stage 0 a bf16 model gets DeepSpeed's per-tensor mixed-precision optimizer instead: per
trainable tensor an inf/NaN check that reads a bool back to the host, a norm and fp32 copies, about 20
launches and one host sync per LoRA tensor (448 tensors in a 7B model; ``benchmarks/bench_step_ops.py``
counts the step both ways). Recompute rule: on CPU "full" (the plan is for device memory; host RAM is not what
limits a CPU run); on GPU the least recompute (none, then selective, then full) that fits.

ZeRO-3 and the fused LoRA. Under ZeRO-3 each projection's base weight exists only while DeepSpeed gathers it
for that module's own forward, so the fused groups (q/k/v in one call) cannot run: every LoRA layer takes PEFT's
forward (``engine/lora.py``), and the plan costs stage 3 with PEFT's activations (``MemoryPlan.path``). Which
runs are affected depends on the model size and the GPU's memory, not on the GPU count: stage 3 is chosen when
the replicated bf16 base with full-recompute activations does not fit one GPU, and more GPUs shard the base but
do not bring the fused path back (:func:`fused_lora_limit` gives the largest base that keeps it).


Under ZeRO-3 DeepSpeed replaces ``torch.nn.functional.linear`` process-wide with its memory-efficient linear
(``zero_optimization.memory_efficient_linear``, on by default, and the engine does not turn it off). That
autograd Function saves every GEMM's input, the frozen base GEMMs' too, which torch's linear does not keep; the
ZeRO-3 plan costs it (:func:`activation_bytes`, ``zero3_linear``): b (2H + I) more per token and layer with
no recompute, +44 KiB at the Mistral-7B and Llama-3-8B shapes (+16% on "peft", +13% on "peft-torch"), nothing under
selective or full recompute, whose checkpoints drop what the forward saved."""
import dataclasses
import functools
import math
import os

import torch

from .config import zero3_prefetch_bucket, zero_reduce_bucket

GIB = 1 << 30
POLICY_ORDER = ("none", "selective", "full")


@dataclasses.dataclass
class MemoryPlan:
    weights_bytes: int
    trainable_params: int
    tokens: int  # per micro-batch on this rank: each text at its longest (packed), texts x the longest (padded)
    layers: int
    hidden: int
    per_token_layer: dict  # policy -> activation bytes per token per layer, the path run at stages 0-2
    budget_bytes: int
    world: int
    device_type: str
    layer_numel: int = 0  # parameters of one decoder layer (ZeRO-3 prefetch bucket)
    lora_max_numel: int = 0  # largest LoRA tensor, 0 without LoRA (ZeRO-3 persistence threshold)
    dtype: str = "float32"  # the parameters' dtype: bfloat16 picks stage 1 for a replicated base
    per_token_layer_zero3: dict = None  # the same under ZeRO-3 (LoRA through PEFT's layers); None: as above
    paths: tuple = ("fused", "fused")  # (path at stages 0-2, path under ZeRO-3), see activation_bytes
    torch_attention: float = 0.0  # share of the layers whose attention takes the exact torch path (LayerShape)
    seq_len: int = 0  # the padded sequence length the plan is for
    torch_attention_why: str = ""  # why every layer takes it (attention_torch_reason); "": a sliding window
    max_param_numel: int = 0  # the largest parameter (ZeRO-3 gathers it whole: the embedding table)
    lora: bool = True  # the trainable tensors are LoRA's, whole on every rank under ZeRO-3 (else sharded)
    offload_optimizer: bool = False  # stage 1 then runs DeepSpeed's ZeRO-1 optimizer, not its flat bf16 one
    loss_bytes: int = 0  # the MNTP loss on the torch path (mntp_torch_loss_bytes), 0 on the Triton kernel

    def path(self, stage):
        return self.paths[stage == 3]

    def per_token(self, policy, stage=0):
        table = self.per_token_layer_zero3 if stage == 3 and self.per_token_layer_zero3 else self.per_token_layer
        return table[policy]

    def activations(self, policy, stage=0):
        if policy == "none":
            return self.tokens * self.layers * self.per_token("none", stage)
        return self.tokens * ((self.layers - 1) * self.per_token(policy, stage) + self.per_token("none", stage))

    def workspace(self):
        return int(0.05 * self.budget_bytes) + (256 << 20)

    def state_bytes(self, stage):
        """The optimizer side per rank for P trainable parameters over W ranks: fp32 master weights (4P), Adam's
        two moments (8P) and fp32 gradients (4P), as DeepSpeed lays them out.

        * stage 0: all replicated, 16P (a plain fp32 optimizer keeps no separate master copy, 12P: counted
          as 16P, on the safe side);
        * stage 1: the gradients whole on every rank (DeepSpeed's BF16_Optimizer keeps one flat fp32 buffer of
          them; ZeRO-1 in fp32 the parameters' own), master weights and moments sharded: 4P + 12P / W;
        * stages 2 and 3: everything sharded (fp32 gradient partitions, engine.config asks fp32 accumulation):
          16P / W.
        """
        p, w = self.trainable_params, self.world
        return {0: 16 * p, 1: 4 * p + 12 * p / w}.get(stage, 16 * p / w)

    def deepspeed_sizes(self):
        """The sizes engine.config.deepspeed_config takes from the plan (persistence, prefetch and reduce buckets)."""
        return {"lora_max_numel": self.lora_max_numel, "layer_numel": self.layer_numel,
                "trainable_numel": self.trainable_params}

    def _itemsize(self):
        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def flat_bf16_optimizer(self, stage):
        """Whether DeepSpeed steps the flat BF16_Optimizer (stage 1, bf16, no optimizer offload), else its ZeRO
        optimizer (DeepSpeed 0.19's engine._do_optimizer_sanity_check)."""
        return stage == 1 and self.dtype == "bfloat16" and not self.offload_optimizer

    def zero_buffers(self, stage):
        """DeepSpeed's buffers per rank: the contiguous gradient buffer of one reduce bucket on its ZeRO optimizers
        (not on the flat bf16 one, whose fp32 gradients are the state's 4P), fp32 at stage 1 under bf16, else in
        the parameters' dtype; under ZeRO-3 also the gathered weights alive at once."""
        out = self.reduce_buffer_bytes(stage)
        if stage == 3:
            out += self._itemsize() * (2 * zero3_prefetch_bucket(self.layer_numel) + self.max_param_numel)
        return int(out)

    def reduce_buffer_bytes(self, stage):
        """The contiguous gradient buffer: one reduce bucket (engine.config.zero_reduce_bucket) on DeepSpeed's ZeRO
        optimizers, fp32 at stage 1 under bf16 (its gradients accumulate in fp32), else the parameters' dtype."""
        if stage == 0 or self.flat_bf16_optimizer(stage):
            return 0
        b = 4 if stage == 1 and self.dtype == "bfloat16" else self._itemsize()
        return zero_reduce_bucket(stage, self.trainable_params) * b

    def weights(self, stage):
        """The weights per rank. Under ZeRO-3 the base is sharded and the LoRA tensors are not (each is under the
        persistence threshold, engine.config: whole on every rank); without LoRA everything is sharded."""
        if stage != 3:
            return self.weights_bytes
        whole = self.trainable_params * self._itemsize() if self.lora else 0
        return (self.weights_bytes - whole) / self.world + whole

    def total(self, policy, stage):
        """Bytes per rank while training (the start aside: :meth:`startup`)."""
        return int(self.weights(stage) + self.state_bytes(stage) + self.activations(policy, stage)
                   + self.zero_buffers(stage) + self.loss_bytes + self.workspace())

    def startup(self):
        """Bytes per rank at the start, at every stage: the whole model on the GPU before DeepSpeed shards it."""
        return int(self.weights_bytes + self.workspace())

    def fits(self, policy, stage):
        return max(self.total(policy, stage), self.startup()) <= self.budget_bytes

    def describe(self, policy, stage):
        start = self.startup()
        if stage == 3 and start > self.total(policy, stage):
            start_s = (f"; at the start {start / GIB:.2f} GiB: the whole base is placed on each GPU before ZeRO-3 "
                       f"shards it" + (", which does not fit" if start > self.budget_bytes else ""))
        else:
            start_s = ""
        buffers = self.zero_buffers(stage)
        return (f"planned {self.total(policy, stage) / GIB:.2f} GiB of {self.budget_bytes / GIB:.2f} GiB "
                f"(weights {self.weights(stage) / GIB:.2f}, "
                + (f"DeepSpeed buffers {buffers / GIB:.2f}, " if buffers else "")
                + (f"MNTP loss on the torch path {self.loss_bytes / GIB:.2f}, " if self.loss_bytes else "")
                + "activations "
                f"{self.activations(policy, stage) / GIB:.2f} for {self.tokens} tokens x {self.layers} layers, "
                f"{self.per_token(policy, stage) / 1024:.1f} KiB per token per layer on the {self.path(stage)} path"
                + (f"; attention on the exact torch path in {self.torch_attention:.0%} of the layers ("
                   + (self.torch_attention_why or f"a sliding window under {self.seq_len} tokens")
                   + "), with fp32 L x L scores per head" if self.torch_attention else "") + ")" + start_s)


def text_lengths(cfg):
    """The padded length of every text (MNTP: every row) of one micro-batch."""
    c, mb = cfg.contrastive, cfg.micro_batch_size
    if cfg.stage == "mntp":
        return [cfg.max_seq_len] * mb
    if cfg.stage == "simcse":
        return [c.max_len] * (2 * mb)
    if c.loss != "infonce":  # scored pairs (cosent, angle): a query and one document each, no negatives
        return [c.max_len] * mb + [c.doc_max_len or c.max_len] * mb
    return [c.max_len] * mb + [c.doc_max_len or c.max_len] * (mb * (1 + c.num_hard_negatives))


def tokens_per_micro_batch(cfg):
    """Tokens alive in one forward: a bidirectional model packs its texts (each at most its own length); a causal
    one runs the batch padded to its longest text (``engine.modeling.packed_hidden_states``)."""
    lens = text_lengths(cfg)
    if cfg.stage != "mntp" and cfg.contrastive.grad_cache_chunk > 0:  # one chunk of texts is alive at a time
        return max(lens) * min(cfg.contrastive.grad_cache_chunk, len(lens))
    return sum(lens) if cfg.model.bidirectional else len(lens) * max(lens)


def fit_warning(plan, policy, stage):
    """One line when the plan does not fit the budget (None when it does): the run would go out of memory."""
    if plan.fits(policy, stage):
        return None
    return (f"the memory plan does not fit: {plan.describe(policy, stage)}; lower micro_batch_size, set "
            f"contrastive.grad_cache_chunk (contrastive stages) or use GPUs with more memory")


def sequence_length(cfg):
    """The longest padded sequence of a micro-batch (what one text's attention spans)."""
    return max(text_lengths(cfg))


def context_warning(cfg, arch):
    """One line (or None) when the run's longest text (:func:`sequence_length`) exceeds ``arch``'s context window
    (``max_position_embeddings`` of its text config): the positions past it were never trained (RoPE extrapolates
    them; quality degrades), which a run otherwise does silently. A warning, not a refusal: extending the context
    on purpose is the user's call."""
    arch = getattr(arch, "text_config", None) or arch
    limit, length = getattr(arch, "max_position_embeddings", None), sequence_length(cfg)
    if not isinstance(limit, int) or length <= limit:
        return None
    knob = "max_seq_len" if cfg.stage == "mntp" else "contrastive.max_len / contrastive.doc_max_len"
    return (f"texts of up to {length} tokens exceed the model's context window of {limit} positions "
            f"(max_position_embeddings): positions past {limit} were never trained; set {knob} <= {limit} unless "
            f"extending the context is the point")


def _text_config(model):
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


def budget_bytes(cfg, device, local_world):
    if cfg.memory_budget_gb > 0:
        return int(cfg.memory_budget_gb * GIB)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(local_world, 1))


def base_too_big(weights_bytes, device_bytes, dtype):
    """One line when the base's weights alone (``weights_bytes`` in ``dtype``) exceed a GPU's memory
    (``device_bytes``), else None. The engine places the whole base on each GPU before DeepSpeed (ZeRO-3 included)
    shards it (:meth:`MemoryPlan.startup`), so such a run can only go out of memory at its start, after every rank
    has read the whole model into host RAM: the trainer refuses it before any weight loads."""
    if weights_bytes <= device_bytes:
        return None
    return (f"the base model's weights ({weights_bytes / GIB:.1f} GiB in {dtype}) do not fit one GPU "
            f"({device_bytes / GIB:.1f} GiB): the engine places the whole base on each GPU before ZeRO-3 shards it "
            f"(it does not load under deepspeed.zero.Init), so it trains bases that fit one GPU; use GPUs with "
            f"more memory")


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """What a decoder layer's saved activations depend on (per token): widths, element sizes, LoRA."""
    hidden: int  # H
    kv: int  # KV = kv heads x head dim
    inter: int  # I, the gated MLP's width
    heads: int  # attention heads (one fp32 log-sum-exp each)
    b: int  # activation element bytes (2 in bf16)
    lora_in: int = 0  # sum over the layer's LoRA projections of their input width (6H + I with the 7 defaults)
    lora_rank: int = 0  # sum over the layer's LoRA projections of their rank (7r)
    adapter_b: int = 0  # PEFT adapter element bytes (PEFT keeps adapters in fp32 over a bf16 base)
    dropout: bool = False  # LoRA dropout p > 0
    q_width: int = 0  # Q = query heads x head dim (the attention output's width too); 0: the hidden size
    norms: tuple = ()  # (width, rows) per RMSNorm a token passes in a layer; (): two of (H, 1), as in Llama
    torch_attention: float = 0.0  # share of the layers whose attention takes the exact torch path (see below)
    seq_len: int = 0  # L, the padded sequence length (the torch path's scores are L per head per token)
    softcap: bool = False  # attention logits soft-capped (Gemma2): one more L x L tensor on the torch path
    attn_dropout: bool = False  # attention-probability dropout p > 0: two more on the torch path
    max_rank: int = 0  # the largest LoRA rank: selective recompute keeps GEMM outputs whose K exceeds it
    v_width: int = 0  # width of the tensor v is a view of: Q + 2KV where one Linear makes [q | k | v] (Phi3); 0: KV
    # the gated MLP keeps transformers' forward on the fused paths too: no GLU kernel has its activation
    # (engine.fused_ops.glu_activation is None, e.g. exact GELU)
    torch_glu: bool = False


# path: (decoder elementwise ops, LoRA): "fused" = Triton RMSNorm / RoPE / GLU + fused LoRA groups with the Triton
# low-rank kernel (GPU default); "fused-torch" = model.fused_ops=torch (HF's elementwise code, fused LoRA groups
# in torch); "peft" = Triton elementwise ops + PEFT's LoRA layers (ZeRO-3); "peft-torch" = both in torch;
# "full-ft" = no LoRA (every weight trains).
PATHS = ("fused", "fused-torch", "peft", "peft-torch", "full-ft")


def activation_bytes(s, path, zero3_linear=False):
    """{policy: bytes saved per token per decoder layer} for LayerShape ``s`` on ``path`` (see PATHS).

    b = activation bytes, a = PEFT adapter bytes, R = sum of LoRA ranks, X = sum of LoRA input widths,
    Q = query heads x head dim (H for Llama, Mistral, Qwen; 4096 against H = 3584 for Gemma2-9B), n = heads,
    V = the width of the tensor v is a view of: KV where v_proj makes v, Q + 2KV where one Linear makes [q | k | v]
    (Phi3's qkv_proj; RoPE makes new q and k, v stays a view, and a saved view keeps its whole storage).
    Shared by every path under "none" (what backward reads):
      attention  b (2Q + KV + V) + 4 n   the kernels (Triton, SDPA, flash-attn): RoPE'd q and k, v, the output
                                (which o_proj reads), fp32 LSE;
                 (b + 4) Q + 4 KV + 4 V' + 4 n L c   the exact torch path (``flash_attention_reference``), which a
                                layer takes when its sliding window is shorter than the sequence (the kernels
                                soft-cap, but have no band mask): the output, fp32 q, k and v (V' = KV for 16-bit
                                activations, whose fp32 v is a copy; V in fp32, where it is v itself), and c fp32
                                L x L score tensors per head, c = 1 (softmax) + 1 with soft-capping (tanh) + 2 with
                                attention dropout (the fp32 keep-mask and the dropped probabilities). Per token it
                                grows with L, the padded sequence length. ``torch_attention`` is the share of the
                                layers that take it. A sliding window's bool band mask (L bytes) is left out;
      RMSNorm    sum over the layer's norms of rows (b w + 4)   Triton: each norm's input and fp32 1/rms per row;
                                (4 w + 4) rows in torch: HF keeps the fp32 copy of the input instead. Two (H, 1) in
                                Llama; four in Gemma2 (pre- and post-norms); Qwen3 adds q_norm (D, n) and k_norm
                                (D, kv heads) per head;
      GLU        2 b I        Triton: gate and up;  3 b I in torch: also act(gate). torch on the fused paths too
                                where no kernel computes the model's activation (``torch_glu``).
    LoRA, "none":
      fused      b (2H + I) + b R   the groups' inputs (both norms' outputs, act(gate) * up; the attention output
                                    is already counted) and h = s drop(x) A^T; in torch with dropout also one bool
                                    keep-mask per group, 3H + I (Triton regenerates it);
      peft       (a + 1) X + a R    per projection its dropped input in the adapter dtype and a bool mask (p > 0;
                                    p = 0: the input cast to the adapter dtype, a X, or b (2H + I) when a = b),
                                    and h; the frozen base GEMM keeps nothing;
      full-ft    b (2H + I)         the GEMM inputs (weight gradients).
    "selective" (``selective_policy``): the layer input and every GEMM output with K > r: b (3H + Q + 2KV + 2I)
      (layer input, q/k/v, o, gate/up, down), plus h where an aten GEMM makes it: b R (fused-torch), a R (peft), 0
      (Triton). Triton attention / norm / RoPE / GLU outputs are recomputed (not aten ops). The torch attention path's
      two batched GEMMs are kept too when their K exceeds the LoRA rank: the fp32 scores (4 n L; K = head dim)
      and p V (4 Q; K = L).
    "full": the layer input, b H.
    ``zero3_linear`` (ZeRO-3's memory-efficient linear in place of torch's, on the PEFT paths): the frozen base
    GEMMs keep their inputs too, b (2H + I) more under "none" (both norms' outputs, act(gate) * up), unless the
    adapters already keep those very tensors (p = 0 and a = b). Selective and full recompute are unchanged.
    """
    H, KV, I, b, a = s.hidden, s.kv, s.inter, s.b, s.adapter_b or s.b
    Q, n, L = s.q_width or H, s.heads, s.seq_len
    V = s.v_width or KV
    elementwise = "torch" if path.endswith("torch") else "triton"
    scores = 4 * n * L * (1 + s.softcap + 2 * s.attn_dropout)
    kernel, exact = b * (2 * Q + KV + V) + 4 * n, (b + 4) * Q + 4 * KV + 4 * (V if b == 4 else KV) + scores
    attention = (1 - s.torch_attention) * kernel + s.torch_attention * exact
    norms = sum(rows * ((4 if elementwise == "torch" else b) * w + 4) for w, rows in (s.norms or ((H, 1), (H, 1))))
    glu = (3 if elementwise == "torch" or s.torch_glu else 2) * b * I
    inputs = b * (2 * H + I)
    if path.startswith("fused"):
        lora = inputs + b * s.lora_rank + ((3 * H + I) if elementwise == "torch" and s.dropout else 0)
        cached_h = b * s.lora_rank if elementwise == "torch" else 0
    elif path.startswith("peft"):
        if s.dropout:
            lora = (a + 1) * s.lora_in
        else:
            lora = inputs if a == b else a * s.lora_in
        if zero3_linear and (s.dropout or a != b):
            lora += inputs  # the base GEMMs' own inputs, kept by DeepSpeed's LinearFunctionForZeroStage3
        lora += a * s.lora_rank
        cached_h = a * s.lora_rank
    elif path == "full-ft":
        lora, cached_h = inputs, 0
    else:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    kept = 4 * n * L * (Q // n > s.max_rank) + 4 * Q * (L > s.max_rank)  # q k^T (K = head dim), p v (K = L)
    selective = b * (3 * H + Q + 2 * KV + 2 * I) + cached_h + s.torch_attention * kept
    return {"none": round(attention + norms + glu + lora), "selective": round(selective), "full": b * H}


def layer_shape(model, dtype=None, dropout=None, seq_len=0, attn_dropout=False):
    """The LayerShape of ``model``'s decoder layers (LoRA read from its first layer's PEFT layers) on sequences of
    ``seq_len`` tokens, with attention dropout or not."""
    tc = _text_config(model)
    H = tc.hidden_size
    head_dim = getattr(tc, "head_dim", None) or H // tc.num_attention_heads
    kv = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    params = list(model.parameters())
    dtype = dtype or params[0].dtype
    layer = _decoder_layers(model, tc)
    lora_in = lora_rank = adapter_b = max_rank = 0
    drop = False
    for m in (layer[0].modules() if layer is not None else ()):
        if isinstance(getattr(m, "r", None), dict) and hasattr(m, "lora_A") and len(m.lora_A):
            adapter = next(iter(m.lora_A))
            a = m.lora_A[adapter].weight
            lora_in += a.shape[1]
            lora_rank += a.shape[0]
            max_rank = max(max_rank, a.shape[0])
            adapter_b = a.element_size()
            d = m.lora_dropout[adapter]
            drop = drop or float(getattr(d, "p", 0.0)) > 0
    softcap = getattr(tc, "attn_logit_softcapping", None) is not None
    Q, KV = tc.num_attention_heads * head_dim, kv * head_dim
    widths = {"q_proj": Q, "k_proj": KV, "v_proj": KV}
    v_width = next((sum(widths[p] for p in parts) for parts in _family(tc).get("fused_projections", {}).values()
                    if "v_proj" in parts), 0)
    from .fused_ops import glu_activation  # what apply_fused_ops fuses the MLP with, if anything

    return LayerShape(hidden=H, kv=KV, inter=getattr(tc, "intermediate_size", 4 * H),
                      heads=tc.num_attention_heads, b=torch.empty((), dtype=dtype).element_size(), lora_in=lora_in,
                      lora_rank=lora_rank, adapter_b=adapter_b, dropout=drop if dropout is None else dropout,
                      q_width=Q, v_width=v_width,
                      norms=_layer_norms(tc, layer[0] if layer is not None else None, kv),
                      torch_attention=_torch_attention_share(tc, layer, seq_len), seq_len=seq_len,
                      softcap=softcap, attn_dropout=bool(attn_dropout), max_rank=max_rank,
                      torch_glu=glu_activation(tc) is None)


def _family(tc):
    """The family's entry in engine.bidirectional's table ({} for a model type it does not know)."""
    from .bidirectional import SUPPORTED_ARCHITECTURES

    return SUPPORTED_ARCHITECTURES.get(getattr(tc, "model_type", None), {})


def _layer_norms(tc, layer, kv_heads):
    """(width, rows per token) of each RMSNorm in a decoder layer: the family's ``layer_norms``; a norm narrower
    than the hidden size is per head (Qwen3's q_norm, k_norm) and runs once per query or key head."""
    names = _family(tc).get("fused_ops", {}).get("layer_norms")
    if layer is None or not names:
        return ()
    out = []
    for name in names:
        width = layer.get_submodule(name).weight.numel()
        heads = tc.num_attention_heads if name.endswith("q_norm") else kv_heads
        out.append((width, 1 if width == tc.hidden_size else heads))
    return tuple(out)


def _torch_attention_share(tc, layers, seq_len):
    """The share of decoder layers whose attention takes the exact torch path (engine.bidirectional._attend):
    those whose sliding window cuts a ``seq_len``-token sequence."""
    if layers is None or not seq_len or not _family(tc).get("sliding_window"):
        return 0.0
    from .bidirectional import window_binds  # the rule _attend takes the torch path by

    # per layer where the module says (Qwen2/3, Gemma2 alternate), else the config's one window (Mistral)
    windows = [getattr(m.self_attn, "sliding_window", getattr(tc, "sliding_window", None)) for m in layers]
    return sum(1 for w in windows if window_binds(w, seq_len)) / len(windows)


# The compute capability a plan assumes for a CUDA device it cannot query (the dry run, on a machine without the GPU):
# sm_80 or later, where auto runs the kernels (H100, A100)
PLANNED_ARCH = 90


def device_arch(device):
    """Compute capability x 10 of ``device``: 0 off CUDA, :data:`PLANNED_ARCH` for a CUDA device this machine lacks."""
    if device.type != "cuda":
        return 0
    if not torch.cuda.is_available():
        return PLANNED_ARCH
    from llm2vec_kernels._backend import cuda_arch

    return cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


def kernel_arch_error(cfg, device):
    """One line (or None) when the run asks for kernels ``device`` cannot run, each of which would otherwise fail at
    the first forward, after the model has loaded: ``model.attention`` / ``loss`` / ``fused_ops=triton`` off CUDA
    without Triton's interpreter, or ``model.attention=triton`` on a GPU before sm_80 (the attention's fixed launch
    configs need 80-96 KB of shared memory per block and sm_75, a T4, has 64 KB). auto runs the torch paths there."""
    from llm2vec_kernels._backend import MIN_AUTO_ARCH, interpreter_enabled

    if device.type != "cuda":  # the kernels need a GPU, or Triton's interpreter (TRITON_INTERPRET=1: tests, slow)
        asked = [f"model.{key}=triton" for key in ("attention", "loss", "fused_ops")
                 if getattr(cfg.model, key) == "triton"]
        if asked and not interpreter_enabled():
            return (f"{', '.join(asked)} runs Triton kernels, which need a CUDA GPU (this run is on the {device.type}; "
                    f"TRITON_INTERPRET=1 runs them in Triton's interpreter, for tests); use auto, which takes the "
                    f"torch path here")
        return None
    arch = device_arch(device)
    if cfg.model.attention != "triton" or arch >= MIN_AUTO_ARCH:
        return None
    return (f"model.attention=triton needs a GPU of compute capability {MIN_AUTO_ARCH / 10:.1f} or later (this one "
            f"is sm_{arch}: the attention kernels' tiles do not fit its shared memory); use model.attention=auto, "
            f"which takes the exact torch path here")


def attention_torch_reason(cfg, tc, device, dtype):
    """Why every layer's attention takes the exact torch path on ``device`` (one phrase), or "" where the kernels
    run: the attention dispatch's own rule (``llm2vec_kernels.attention.dispatch.eligible``) asked about a training
    call of this run -- model.attention=torch, or auto off CUDA, before sm_80 (the kernels' launch configs do not fit
    there) or past head dim 256."""
    from llm2vec_kernels.attention import dispatch

    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    arch = device_arch(device)
    call = dispatch.AttentionCall(
        impl=cfg.model.attention, device_type=device.type, arch=arch, dtype=dtype, head_dim=head_dim,
        layout="padded", dropout=cfg.model.attention_dropout, needs_grad=True,
        deterministic=cfg.model.deterministic_attention,
        softcap=getattr(tc, "attn_logit_softcapping", None) is not None)
    if dispatch.eligible(call) != ["torch"]:
        return ""
    if cfg.model.attention == "torch":
        return "model.attention=torch"
    if device.type != "cuda":
        return f"model.attention=auto on {device.type}"
    if arch < dispatch.MIN_AUTO_ARCH:
        return f"model.attention=auto on sm_{arch}, before sm_{dispatch.MIN_AUTO_ARCH}"
    return f"model.attention=auto at head dim {head_dim}, past the kernels' 256"


def _decoder_layers(model, tc):
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == tc.num_hidden_layers:
            return m
    return None


def model_paths(cfg):
    """(path at stages 0-2, path under ZeRO-3) for run config ``cfg`` on a GPU (see PATHS)."""
    torch_ops = cfg.model.fused_ops == "torch"
    if not cfg.lora.enabled:
        return ("full-ft", "full-ft")
    return ("fused-torch" if torch_ops else "fused", "peft-torch" if torch_ops else "peft")


def plan_memory(cfg, model, world, local_world, device, dtype=None):
    """The plan for ``model`` (LoRA already added) with run config ``cfg`` on ``device``."""
    tc = _text_config(model)
    params = list(model.parameters())
    dtype = dtype or params[0].dtype
    b = torch.empty((), dtype=dtype).element_size()
    train = [p for p in params if p.requires_grad]
    layers_mod = _decoder_layers(model, tc)
    layer_numel = sum(p.numel() for p in layers_mod[0].parameters()) if layers_mod is not None else 0
    shape = layer_shape(model, dtype, seq_len=sequence_length(cfg), attn_dropout=cfg.model.attention_dropout > 0)
    if shape.adapter_b and b < 4:
        # DeepSpeed casts every parameter to the run's 16-bit dtype at initialize (PEFT's fp32 adapters included;
        # the fp32 master copies live in the optimizer), so the PEFT layers under ZeRO-3 keep 16-bit inputs
        shape = dataclasses.replace(shape, adapter_b=b)
    why_torch = attention_torch_reason(cfg, tc, device, dtype)
    if why_torch:
        shape = dataclasses.replace(shape, torch_attention=1.0)
    paths = model_paths(cfg)
    return MemoryPlan(
        weights_bytes=sum(p.numel() for p in params) * b,
        trainable_params=sum(p.numel() for p in train),
        tokens=tokens_per_micro_batch(cfg),
        layers=tc.num_hidden_layers,
        hidden=tc.hidden_size,
        per_token_layer=activation_bytes(shape, paths[0]),
        per_token_layer_zero3=activation_bytes(shape, paths[1], zero3_linear=True),
        paths=paths,
        torch_attention=shape.torch_attention,
        seq_len=shape.seq_len,
        torch_attention_why=why_torch,
        budget_bytes=budget_bytes(cfg, device, local_world),
        world=world,
        device_type=device.type,
        layer_numel=layer_numel,
        lora_max_numel=max((p.numel() for p in train), default=0) if cfg.lora.enabled else 0,
        max_param_numel=max((p.numel() for p in params), default=0),
        dtype=str(dtype).replace("torch.", ""),
        lora=bool(cfg.lora.enabled),
        offload_optimizer=bool(cfg.offload_optimizer),
        loss_bytes=mntp_torch_loss_bytes(cfg, tc, dtype, device),
    )


def mntp_torch_loss_bytes(cfg, text_config, dtype, device):
    """Peak bytes of the MNTP loss when it takes the torch path (``model.loss=torch``, or auto off CUDA or before
    sm_80, as ``llm2vec_kernels._backend.resolve_impl`` sends it), else 0:
    :func:`masked_ce_reference_peak` over R = mask_prob x tokens rows. Llama-3-8B at 4 x 512 tokens and mask_prob
    0.2: 410 rows x 128256 x 4 x 5 = 1.0 GiB + 2.0 GiB of fp32 head weight. The Triton kernel makes no logits."""
    from llm2vec_kernels._backend import MIN_AUTO_ARCH

    impl = cfg.model.loss
    if cfg.stage != "mntp" or impl == "triton" or (impl == "auto" and device_arch(device) >= MIN_AUTO_ARCH):
        return 0
    rows = math.ceil(cfg.mntp.mask_prob * tokens_per_micro_batch(cfg))
    return masked_ce_reference_peak(rows, text_config.vocab_size, text_config.hidden_size,
                                    torch.empty((), dtype=dtype).element_size())


def masked_ce_reference_peak(rows, vocab, hidden, itemsize):
    """Peak bytes of ``masked_cross_entropy_reference``'s forward and backward over ``rows`` labelled rows: five
    fp32 rows x vocab tensors alive at once in the backward (the logits autograd keeps, gather's scattered gradient,
    logsumexp's softmax and its product, their sum; a soft-cap adds none to the peak) and a few fp32 values a row,
    plus, for a 16-bit head, the fp32 copy of its weight that the matmul keeps. tests/test_memory_plan.py measures
    it."""
    return rows * (5 * vocab + 4) * 4 + (vocab * hidden * 4 if itemsize < 4 else 0)


def fused_lora_limit(plan):
    """The largest base (bytes, in the plan's dtype) whose replicated copy still fits one GPU next to its LoRA
    state and full-recompute activations, i.e. the largest model that keeps the fused LoRA (stage < 3); the
    LoRA state is scaled with the base (the torch MNTP loss's bytes are not). Independent of the GPU count."""
    free = plan.budget_bytes - plan.workspace() - plan.activations("full", 0) - plan.loss_bytes
    per_weight_byte = 1 + 16 * plan.trainable_params / max(plan.weights_bytes, 1)
    return max(int(free / per_weight_byte), 0)


def choose_zero_stage(cfg, plan):
    """(stage, reason). zero_stage: auto -> a replicated base when it fits with full recompute (stage 0, or 1 in
    bf16 and fp16: see the module docstring), else 3."""
    if str(cfg.zero_stage) != "auto":
        return int(cfg.zero_stage), f"zero_stage={cfg.zero_stage} set in the config"
    replicated = 1 if plan.dtype in ("bfloat16", "float16") else 0
    if plan.fits("full", replicated):
        how = ("" if replicated == 0
               else " (stage 1: DeepSpeed's flat bf16 optimizer, fp32 master weights sharded over the ranks)"
               if plan.flat_bf16_optimizer(1)
               else " (stage 1: DeepSpeed's ZeRO-1 optimizer, its state offloaded to the CPU)" if plan.dtype == "bfloat16"
               else " (stage 1: at stage 0 DeepSpeed's fp16 optimizer unscales gradients it never scaled)")
        return replicated, (f"the replicated {plan.weights_bytes / GIB:.2f} GiB base + activations fit one rank's "
                            f"budget{how}: " + plan.describe("full", replicated))
    return 3, ("the replicated base + activations do not fit one rank's budget ("
               + plan.describe("full", replicated) + "); ZeRO-3 shards the base over " + f"{plan.world} ranks"
               + (", and LoRA runs through PEFT's layers (the fused groups need whole base weights; a base up to "
                  f"{fused_lora_limit(plan) / GIB:.1f} GiB would keep them)" if plan.path(3) != plan.path(0) else "")
               + ("" if plan.fits("full", 3) else "; NOTHING FITS, not even ZeRO-3 with full recompute: "
                  + plan.describe("full", 3)))


def selective_recompute_supported():
    """Whether this torch hands a selective-checkpoint policy the op's output (``SelectiveCheckpointContext``'s
    ``op_output``, torch 2.12 and later). :func:`selective_policy` reads it to keep the in-place writes into what it
    saved; earlier releases ask the policy before the op runs, and again in the recompute."""
    import inspect

    from torch.utils.checkpoint import SelectiveCheckpointContext

    return "op_output" in inspect.signature(SelectiveCheckpointContext.__init__).parameters


def selective_recompute_error(cfg):
    """One line (or None) when the config asks for selective recompute and this torch cannot run it: said before
    the model loads, rather than as an AttributeError at the first forward."""
    if cfg.model.gradient_checkpointing != "selective" or selective_recompute_supported():
        return None
    return (f"model.gradient_checkpointing=selective needs torch 2.12 or later (its policy reads each op's output; "
            f"torch {torch.__version__} gives none); use auto (full recompute where selective cannot run), full or "
            f"none")


def choose_recompute(cfg, plan, stage):
    """(policy, reason). model.gradient_checkpointing: auto -> full on CPU, else the least recompute that fits
    (selective only on a torch that can run it: :func:`selective_recompute_supported`)."""
    policy = cfg.model.gradient_checkpointing
    refused = selective_recompute_error(cfg)
    if refused:
        from .config import ConfigError

        raise ConfigError(refused)
    if policy != "auto":
        return policy, f"model.gradient_checkpointing={policy} set in the config; " + plan.describe(policy, stage)
    if plan.device_type != "cuda":
        return "full", "auto on CPU means full recompute; " + plan.describe("full", stage)
    selective = selective_recompute_supported()
    for p in POLICY_ORDER:
        if p == "selective" and not selective:
            continue
        if plan.fits(p, stage):
            why = "" if selective or p != "full" else f" (selective needs torch 2.12+, this is {torch.__version__})"
            return p, f"least recompute that fits{why}: {plan.describe(p, stage)}"
    return "full", "nothing fits the plan, full recompute is the least memory: " + plan.describe("full", stage)


# ----------------------------------------------------------------------------------------------
# Selective recompute
# ----------------------------------------------------------------------------------------------

_GEMMS = ("mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_")
_ATTENTION = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward")


def _overloads(names):
    aten = torch.ops.aten
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


def _inner_dim(op, args):
    """The contraction length K of a GEMM op: mm(a, b) / bmm(a, b) read a (..., K); addmm(c, a, b) and the
    in-place / batched forms read their second argument."""
    a = args[0] if op.overloadpacket.__name__ in ("mm", "bmm") else args[1]
    return a.shape[-1]


def _storage_key(t):
    return t.untyped_storage()._cdata


def _written(op, args):
    """The tensors an op writes in place (``Tensor(a!)`` in its schema)."""
    return [args[i] for i, a in enumerate(op._schema.arguments)
            if i < len(args) and a.alias_info is not None and a.alias_info.is_write and isinstance(args[i], torch.Tensor)]


def selective_policy(low_rank=0):
    """The selective policy as a function ``(ctx, op, *args) -> CheckpointPolicy``, with its own record of what
    it saved (one per checkpointed region).

    Saved (MUST_SAVE): the output of every GEMM whose contraction length K exceeds ``low_rank`` (the base
    projections x W^T and LoRA's down product x A^T, all that would be costly to recompute), the outputs of the
    aten attention ops, and every in-place op that writes into a saved tensor. Everything else is recomputed,
    including the rank-r products (h B^T: K = r, r / K_base of the base GEMM's work) that the fused and the
    PEFT LoRA add onto the base output: backward never reads them (it reads h, the input x and the weights), and
    keeping them next to the output they are added to doubled the saved bytes of every projection.

    In-place writes: when the base GEMM's output is saved and the low-rank product is then added into it in
    place (``out.addmm_(h, B^T)``), the cache entry already holds the sum. The write is saved too, so the
    recompute returns the cached sum for both ops instead of adding the product a second time; the entry's
    version check is therefore off (``allow_cache_entry_mutation``), which is safe because no saved tensor is
    written without that write being replayed from the cache.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    gemms, attention = _overloads(_GEMMS), _overloads(_ATTENTION)
    saved = set()

    def policy(ctx, op, *args, **kwargs):
        keep = (op in attention or (op in gemms and _inner_dim(op, args) > low_rank)
                or any(_storage_key(t) in saved for t in _written(op, args)))
        if not keep:
            return CheckpointPolicy.PREFER_RECOMPUTE
        for t in torch.utils._pytree.tree_leaves(ctx.op_output):
            if isinstance(t, torch.Tensor):
                saved.add(_storage_key(t))
        return CheckpointPolicy.MUST_SAVE

    return policy


def selective_context_fn(low_rank=0):
    """torch.utils.checkpoint ``context_fn``: :func:`selective_policy` (keep GEMM and attention outputs,
    recompute everything else and the rank-``low_rank`` products).

    Ops run inside a Triton kernel (our attention, RMSNorm, RoPE, GLU, the fused LoRA's low-rank kernel) are not
    aten ops, so the policy cannot see them: they are re-run in the recompute like the elementwise ops.
    """
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(selective_policy(low_rank), allow_cache_entry_mutation=True)


def lora_rank(model):
    """The largest LoRA rank in ``model`` (PEFT layers keep ``r`` as {adapter: rank}); 0 without LoRA."""
    ranks = [r for m in model.modules() if isinstance(getattr(m, "r", None), dict) for r in m.r.values()]
    return max(ranks, default=0)


def enable_recompute(model, policy):
    """Apply a recompute policy to a transformers model (bare or wrapped by PEFT; read for its LoRA rank)."""
    if policy == "none":
        return
    kwargs = {"use_reentrant": False}
    if policy == "selective":
        kwargs["context_fn"] = functools.partial(selective_context_fn, lora_rank(model))
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers then hooks the input embeddings to make their output require grad, which only the reentrant
    # checkpoint needs (it passes no gradient to parameters unless an input requires one). The non-reentrant one
    # does not, and with the hook autograd would also compute the gradient of the first layer's input from frozen
    # embeddings (its q/k/v grad-x GEMMs and its RMSNorm backward), for nothing.
    model.disable_input_require_grads()
