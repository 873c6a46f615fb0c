"""End-to-end train-step throughput: the engine path against what an LLM2Vec user runs instead.

The `reference` rows (llm2vec's one-GPU recipe, MNTP) build a model of their own without DeepSpeed. For the
other rows one model and one DeepSpeed engine are built once (building a 7B model is the expensive part); the
path and the kernel implementations are switched between them. For figures that do not disturb each other,
run each path in its own process (`--impls reference`, `--impls reference-zero3`, `--impls engine`), as
benchmarks/gpu_run.sh does.

Model (GPU mode): Mistral-7B-shaped (32 layers, hidden 4096, intermediate 14336, GQA 32/8 heads,
head_dim 128, vocab 32000), randomly initialised in bf16 directly on the GPU, bidirectional, LoRA r=16
(alpha 32, dropout 0.05) on q/k/v/o/gate/up/down, gradient checkpointing, DeepSpeed ZeRO-3 in a world
of one, torch AdamW as the client optimizer. Synthetic token ids (seeded); nothing is downloaded.

Stages (one micro-batch = one optimizer step):
  * mntp        32 x 512 tokens, unpadded, masked as llm2vec does for the model family (configs/mistral-7b:
                0.8, every masked token replaced; the tiny Llama: 0.2, BERT scheme; the shape name and the row
                state it), labels shifted as the MNTP stage does; the same batch on every path;
  * simcse      128 sentences, lengths uniform in [16, 128] (one of 128), two dropout views
                (attention-probability dropout 0.3 + LoRA dropout) -> 256 sequences;
  * supervised  64 queries (16-64 tokens incl. an 8-12 token instruction that is attended, not pooled)
                + 64 positives + 64 hard negatives (64-512 tokens, one of 512); mean pooling.

Implementations:
  * reference   llm2vec's own one-GPU recipe (MNTP): HF model + PEFT LoRA (r on all seven projections, dropout
                0.05, PEFT defaults), bf16, bidirectional SDPA with no mask on the unpadded batch, full
                gradient checkpointing, full logits for every position and the CE inside the HF loss (fp32
                upcast), clip 1.0 + plain torch AdamW; no DeepSpeed and no engine code (build_hf_reference).
  * reference-fa2   the same with attn_implementation="flash_attention_2" (a row with status=skipped when
                flash_attn is not installed).
  * reference-zero3   the older reference, an ablation inside the engine's harness: the engine's model under
                DeepSpeed ZeRO-3 running what LLM2Vec does on HF transformers + PEFT: SDPA given a dense additive (B, 1, S, S)
                bidirectional padding mask (so SDPA cannot use its flash backend, and HF repeats K/V for
                GQA because a mask is given), full logits for every
                position upcast to fp32 and F.cross_entropy(ignore_index=-100) as HF models do, and the
                torch contrastive loss; contrastive texts run as LLM2Vec runs them, one forward per text
                slot (SimCSE: view 1, view 2; supervised: queries, positives, negatives), each padded to
                its own longest sequence.
  * engine      the engine's own stages: packed varlen forward (no padding anywhere) through the Triton
                flash-attention kernel, fused masked cross-entropy over the masked rows only, fused
                contrastive loss; one forward for all texts of a step.
  * engine-torch-<op>   ablations: the engine path with one kernel switched to its torch reference
                (kernels.set_default_impl(op, "torch")), op in attention / masked_ce / contrastive.

Reported per (stage, impl), one CSV row (benchmarks/common.CsvWriter, bench="train_step", pass="step"):
  ms        median wall time of the timed steps (forward + backward + optimizer step, synchronised);
            extra min_ms, q1_ms, q3_ms, iqr_ms, warmup, timed_steps and every step's time (steps_ms);
  peak_mb   torch.cuda.max_memory_allocated over the timed steps (weights included; reset per run);
            extra act_peak_mb is the same minus what was allocated before the step;
  tflops    model FLOPs / step time; extra tokens_per_s, mfu, hfu, peak_tflops.

FLOPs (per step, T = real tokens, L_i = real sequence lengths, l = layers, Hq*D = query width):
  model = 4 * N_frozen * T                 frozen decoder weights: forward (2) + input gradient (2), no weight grad
        + 6 * N_lora * T                   LoRA weights: forward, input gradient and weight gradient
        + 12 * sum(L_i^2) * Hq * D * l     attention: forward 4*L^2*Hq*D per layer, backward 2x forward
        + 4 * R * V * H                    MNTP LM head over the R rows it actually computes (forward + input
                                           grad): the masked rows for the engine, every position for a
                                           full-logit reference
        + 6 * B * N * E                    contrastive scores (B queries x N candidates)
  hfu   = model + the forward recomputed under gradient checkpointing (2*N_frozen*T + 2*N_lora*T + the
          attention forward; engine-auto under selective recompute: the attention forward only, and nothing
          without recompute); the flash-style recompute inside the attention backward is not counted.
  Both count work on real tokens only; padding is never counted, and the LM head counts the rows the path
  computes, so a full-logit reference gets credit for its logits (MFU ratios then differ from throughput
  ratios; compare tokens_per_s for speed). extra model_tflop holds the FLOPs of the row. MFU = model
  FLOP/s over the card's dense bf16 peak (H100 SXM / H200: 989.4 TFLOP/s; see PEAK_TFLOPS, or pass
  --peak-tflops).

Each measurement: --warmup (5) warm-up steps, then --steps (20) timed steps (1 and 2 with --tiny); the row
reports the median, min and IQR. Timing stops early, after at least 5 steps, when the next steps would end
past --budget-s (the row says cut=budget and timed_steps how many ran). An OOM or error is recorded as a row with
ms=nan and extra status=oom/error, and the run goes on. Measurements run in priority order (reference and
engine for MNTP, supervised, SimCSE; then the ablations) and those that would end after --budget-s
(default 135 s from start on the GPU) are recorded as status=skipped_budget. Before timing, each stage's
reference and engine losses are compared in eval mode on the same batch (extra parity_rel). If DeepSpeed
cannot be imported or initialised, the same measurements run with a plain torch optimizer step and the
rows say zero=none (--no-deepspeed forces it).

--profile PATH: one more step, after and apart from the timed ones, under torch.profiler, of the engine, the
reference-zero3 and the reference MNTP step. On the GPU it records CUDA activity only (no CPU ops, no
record_shapes, which inflated the profiled step to 3.5 s in the 2026-11-26 run): kernel time by category from
kernel names (attention, all GEMMs, loss, collectives, other) and GPU busy time (union of kernel intervals)
against wall time. On CPU (--tiny) CPU self time is grouped by op: attention, linear (MLP / attention
projections / LoRA), loss, optimizer, ZeRO
fetch/release/grad-reduce and other, by op name, scope and GEMM shape; the category table and the top
ops and kernels go to PATH, and one CSV row per profile (pass="profile") holds the category times.

    python -m benchmarks.bench_train_step --out $OUT/bench_train_step.csv --profile $OUT/profile.txt
    python -m benchmarks.bench_train_step --tiny --out /tmp/ts.csv --profile /tmp/prof.txt   # CPU, ~30 s

--tiny (and any run without CUDA): a tiny random Llama (2 layers, hidden 64, vocab 512), small batches, fp32,
DeepSpeed ZeRO-3 on gloo in a world of one; the engine's kernels resolve to their torch references on CPU.
"""
import argparse
import contextlib
import gc
import os
import re
import statistics
import sys
import time

_T0 = time.perf_counter()

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from benchmarks.common import CsvWriter  # noqa: E402

BENCH = "train_step"
# written into every step row (extra flops_def): what mfu / hfu divide by the step time (module docstring)
FLOPS_DEF = ("model: 4*N_frozen*T + 6*N_lora*T + 12*sum(L^2)*Hq*D*layers + 4*head_rows*V*H (MNTP) or "
             "6*B*N*E (contrastive)| hfu adds the recompute: full 2*N_frozen*T + 2*N_lora*T + "
             "4*sum(L^2)*Hq*D*layers, selective 4*sum(L^2)*Hq*D*layers (the Triton attention reruns), none 0 "
             "(the row's recompute extra; full where absent)")
IGNORE = -100

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name substring; first match wins.
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4),
               ("GH200", 989.4), ("A100", 312.0), ("L40S", 362.0)]

GPU_MODEL = dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 max_position_embeddings=4096, sliding_window=None, tie_word_embeddings=False)
TINY_MODEL = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  tie_word_embeddings=False)

# Batch shapes: mntp (batch, seq); simcse (sentences, min len, max len); supervised (queries, q min, q max,
# doc min, doc max, hard negatives per query).
GPU_SHAPES = dict(mntp=(32, 512), simcse=(128, 16, 128), supervised=(64, 16, 64, 64, 512, 1))
TINY_SHAPES = dict(mntp=(4, 48), simcse=(6, 6, 24), supervised=(4, 6, 16, 12, 40, 1))
# MNTP masking (probability, scheme) of every path: llm2vec's per-model setting, set in main() (llm2vec_masking)
MASK = {"gpu": (0.8, "all"), "tiny": (0.2, "bert")}

LORA = dict(r=16, alpha=32, dropout=0.05)
TINY_LORA = dict(r=8, alpha=16, dropout=0.05)

IMPLS = {  # name -> (path, {op: impl})
    "reference-zero3": ("reference", {"attention": "auto", "masked_ce": "auto", "contrastive": "torch"}),
    "engine": ("engine", {"attention": "auto", "masked_ce": "auto", "contrastive": "auto"}),
    "engine-torch-attention": ("engine", {"attention": "torch", "masked_ce": "auto", "contrastive": "auto"}),
    "engine-torch-masked_ce": ("engine", {"attention": "auto", "masked_ce": "torch", "contrastive": "auto"}),
    "engine-torch-contrastive": ("engine", {"attention": "auto", "masked_ce": "auto", "contrastive": "torch"}),
}
# llm2vec's own one-GPU recipe, measured without the DeepSpeed engine (MNTP only): attention implementation
HF_REFERENCES = {"reference": "sdpa", "reference-fa2": "flash_attention_2"}
# rows with a model of their own, MNTP only (measure_own_model): llm2vec's recipe and the trainer's own setup
OWN_MODEL = list(HF_REFERENCES) + ["engine-auto"]
ALL_IMPLS = OWN_MODEL + list(IMPLS)
STAGE_ABLATIONS = {"mntp": ("attention", "masked_ce"), "simcse": ("attention", "contrastive"),
                   "supervised": ("attention", "contrastive")}


def default_plan(stages, tiny):
    """(stage, impl) in priority order: the headline pairs first, then ablations (MNTP, supervised, SimCSE).

    On the GPU the SimCSE attention ablation is left out: with dropout the torch attention reference draws
    its keep-masks on the CPU per sequence and head, which measures the host RNG, not attention.
    """
    plan = [("mntp", i) for i in ("reference", "reference-fa2", "engine-auto") if "mntp" in stages]
    plan += [(s, i) for s in ("mntp", "supervised", "simcse") if s in stages for i in ("reference-zero3", "engine")]
    for s in ("mntp", "supervised", "simcse"):
        if s not in stages:
            continue
        for op in STAGE_ABLATIONS[s]:
            if s == "simcse" and op == "attention" and not tiny:
                continue
            plan.append((s, f"engine-torch-{op}"))
    return plan


def log(*a):
    print(f"[train_step {time.perf_counter() - _T0:6.1f}s]", *a, flush=True)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# Model, stages and DeepSpeed engine (built once)
# ----------------------------------------------------------------------------------------------

class SyntheticTokenizer:
    """What the stages read from a tokenizer; the benchmark's token ids are synthetic."""

    pad_token_id, bos_token_id, eos_token_id, mask_token_id = 0, 1, 2, None

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size
        self.all_special_ids = [0, 1, 2]

    def __len__(self):
        return self.vocab_size


def build_model(spec, dtype, device, seed=0):
    """Random-weight CausalLM created directly on ``device`` in ``dtype`` (no CPU init on the GPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    cfg = AutoConfig.for_model(spec.pop("model_type"), pad_token_id=0, bos_token_id=1, eos_token_id=2, **spec)
    cfg.use_cache = False
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model


def make_train_config(tiny, lora, mask=(0.2, "bert")):
    from engine.config import ContrastiveConfig, LoraConfig, MNTPConfig, ModelConfig, TrainConfig

    return TrainConfig(
        stage="mntp", model=ModelConfig(name_or_path="synthetic", gradient_checkpointing=True),
        lora=LoraConfig(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"]),
        mntp=MNTPConfig(mask_prob=mask[0], scheme=mask[1], mask_token="eos"),
        contrastive=ContrastiveConfig(temperature=0.05, pooling="mean", max_len=512, gather_across_ranks=True),
        batch_size=1, micro_batch_size=1, max_seq_len=512, progress_bar=False)


def count_params(model):
    """(frozen decoder GEMM weights, LoRA weights) per token, counted before ZeRO-3 partitions them."""
    from engine.modeling import decoder_of

    dec = decoder_of(model)
    frozen = lora = 0
    for name, p in dec.named_parameters():
        if p.requires_grad:
            lora += p.numel()
        elif p.dim() == 2 and "embed" not in name:
            frozen += p.numel()
    return frozen, lora


def set_attention_path(model, path):
    """engine -> the engine's bidirectional varlen attention; reference -> HF's SDPA with a 4-D mask."""
    from engine.bidirectional import ATTN_NAME, make_bidirectional

    if path == "engine":
        make_bidirectional(model)
        return
    base = model
    while hasattr(base, "get_base_model") and base is not base.get_base_model():
        base = base.get_base_model()
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation("sdpa")
    for cfg in {id(c): c for c in (base.config, getattr(base.config, "text_config", None)) if c is not None}.values():
        cfg._attn_implementation = "sdpa"
    for mod in base.modules():  # bidirectional: SDPA must never take its is_causal shortcut
        if hasattr(mod, "is_causal"):
            mod.is_causal = False
    if base.config._attn_implementation == ATTN_NAME:
        raise RuntimeError("could not switch the model to SDPA")


# ----------------------------------------------------------------------------------------------
# The `reference` path: llm2vec's own one-GPU recipe (HF model + PEFT LoRA, no DeepSpeed, no engine code)
# ----------------------------------------------------------------------------------------------

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# llm2vec's per-model MNTP masking, as this repo's configs/<model>/mntp.yaml record it (probability, scheme)
LLM2VEC_MNTP_CONFIG = {"mistral": "configs/mistral-7b/mntp.yaml", "llama": "configs/llama3-8b/mntp.yaml"}


def llm2vec_masking(model_type):
    """(mask probability, scheme) llm2vec uses for this model family (Mistral: 0.8, all-mask)."""
    import yaml

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, LLM2VEC_MNTP_CONFIG.get(model_type, LLM2VEC_MNTP_CONFIG["llama"]))) as f:
        m = yaml.safe_load(f)["mntp"]
    return float(m["mask_prob"]), m["scheme"]


def build_hf_reference(spec, dtype, device, lora, attn="sdpa", seed=0):
    """HF CausalLM + PEFT LoRA (r on all seven projections, PEFT defaults) as llm2vec trains it on one GPU:
    bidirectional attention through ``attn`` (SDPA or flash_attention_2) with no mask on an unpadded batch,
    full (non-reentrant) gradient checkpointing. Returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    model = build_model(spec, dtype, device, seed)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
    model.config._attn_implementation = attn
    model.config.is_causal = False
    for mod in model.modules():  # non-causal: SDPA / flash-attn read the module's is_causal flag
        if hasattr(mod, "is_causal"):
            mod.is_causal = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pcfg = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=LORA_TARGETS,
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, pcfg)


def unshift_labels(labels):
    """The engine's MNTP labels (token i's target at i-1) -> HF's causal-LM labels (target at i), which the HF
    loss shifts back: the same rows, the same loss."""
    out = torch.full_like(labels, IGNORE)
    out[:, 1:] = labels[:, :-1]
    return out


def hf_reference_forward(model, batch):
    """Full logits for every position, fp32 upcast and cross-entropy, all inside the HF model's own loss."""
    return model(input_ids=batch["input_ids"], labels=batch["hf_labels"]).loss


def hf_reference_step(model, optimizer, params, batch):
    """One optimizer step as HF Trainer runs it: forward, backward, clip at 1.0, torch AdamW, zero grads."""
    loss = hf_reference_forward(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# ----------------------------------------------------------------------------------------------
# Reference (LLM2Vec-style) losses
# ----------------------------------------------------------------------------------------------

def additive_mask(attention_mask, dtype):
    """(B, S) padding mask -> dense (B, 1, S, S) additive mask: 0 where the key is real, dtype-min elsewhere."""
    B, S = attention_mask.shape
    keep = attention_mask.bool()[:, None, None, :].expand(B, 1, S, S)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(keep, zero, torch.finfo(dtype).min)


def dense_hidden_states(model, input_ids, attention_mask):
    """HF decoder forward on the padded batch with the dense bidirectional mask (the reference's attention)."""
    from engine.modeling import decoder_of

    dec = decoder_of(model)
    dtype = dec.get_input_embeddings().weight.dtype  # a ZeRO-3 partitioned parameter keeps its dtype
    pos = (torch.cumsum(attention_mask, 1) - 1).clamp(min=0)
    mask4 = additive_mask(attention_mask, dtype)
    return dec(input_ids=input_ids, attention_mask=mask4, position_ids=pos).last_hidden_state


def make_stages(cfg, tok):
    """{(stage, path): stage object}. Engine entries are the engine's own stage classes."""
    from engine.modeling import lm_head_of
    from engine.pooling import pool
    from engine.stages.mntp import MNTPStage
    from engine.stages.simcse import SimCSEStage
    from engine.stages.supervised import SupervisedStage

    class ReferenceMNTP(MNTPStage):
        """Full logits for every position, fp32 upcast, F.cross_entropy with ignore_index (as HF does)."""

        def loss(self, module, batch):
            hidden = dense_hidden_states(module.model, batch["input_ids"], batch["attention_mask"])
            logits = lm_head_of(module.model)(hidden)  # (B, S, V) in the model dtype
            labels = batch["labels"]
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=IGNORE)
            return loss, {"tokens": batch["attention_mask"].sum()}

    class ReferenceContrastiveMixin:
        """One forward per text slot, each padded to its own longest text, mean pooling, torch loss."""

        def loss(self, module, batch):
            embs = []
            for ids, am, pm in batch["slots"]:
                hidden = dense_hidden_states(module.model, ids, am)
                embs.append(pool(hidden, am, self.cfg.contrastive.pooling, pm))
            q, d = embs[0], torch.cat(embs[1:])
            return self.contrastive(q, d), {"tokens": batch["attention_mask"].sum()}

    class ReferenceSimCSE(ReferenceContrastiveMixin, SimCSEStage):
        pass

    class ReferenceSupervised(ReferenceContrastiveMixin, SupervisedStage):
        pass

    return {("mntp", "engine"): MNTPStage(cfg, tok), ("mntp", "reference"): ReferenceMNTP(cfg, tok),
            ("simcse", "engine"): SimCSEStage(cfg, tok), ("simcse", "reference"): ReferenceSimCSE(cfg, tok),
            ("supervised", "engine"): SupervisedStage(cfg, tok),
            ("supervised", "reference"): ReferenceSupervised(cfg, tok)}


# ----------------------------------------------------------------------------------------------
# Synthetic batches
# ----------------------------------------------------------------------------------------------

def _rand_ids(g, n, vocab):
    return [1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist()  # BOS + ordinary tokens


def _lengths(g, n, lo, hi):
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    lens[int(torch.randint(0, n, (1,), generator=g))] = hi  # the batch reaches the maximum length
    return lens


def make_batches(shapes, stages, vocab, device, seed=0):
    """{stage: batch dict on device}. Engine keys: input_ids / attention_mask (/ labels / pool_mask / n_queries);
    reference contrastive batches add "slots": [(ids, mask, pool_mask)] per text slot, each padded alone."""
    from engine.encoding import pad_batch

    g = torch.Generator().manual_seed(seed)
    out = {}
    B, S = shapes["mntp"]
    out["mntp"] = stages[("mntp", "engine")].collate([_rand_ids(g, S, vocab) for _ in range(B)],
                                                     torch.Generator().manual_seed(seed + 1))

    def texts(lens, instr=None):
        ids, pms = [], []
        for n in lens:
            t = _rand_ids(g, n, vocab)
            k = 0 if instr is None else min(int(torch.randint(instr[0], instr[1] + 1, (1,), generator=g)), n - 2)
            ids.append(t)
            pms.append([0] * k + [1] * (n - k))
        return ids, pms

    def contrastive_batch(slots):
        all_ids = [x for ids, _ in slots for x in ids]
        all_pm = [x for _, pms in slots for x in pms]
        ids, am, pm = pad_batch(all_ids, 0, "right", extra=(all_pm,))
        ref = [pad_batch(s_ids, 0, "right", extra=(s_pm,)) for s_ids, s_pm in slots]
        return {"input_ids": ids, "attention_mask": am, "pool_mask": pm, "n_queries": torch.tensor(len(slots[0][0])),
                "slots": ref}

    n, lo, hi = shapes["simcse"]
    sent = texts(_lengths(g, n, lo, hi))
    out["simcse"] = contrastive_batch([sent, sent])
    nq, qlo, qhi, dlo, dhi, nneg = shapes["supervised"]
    q = texts(_lengths(g, nq, qlo, qhi), instr=(min(8, qlo // 2), min(12, qlo - 2)))
    docs = [texts(_lengths(g, nq, dlo, dhi)) for _ in range(1 + nneg)]
    out["supervised"] = contrastive_batch([q] + docs)

    def to_dev(x):
        if torch.is_tensor(x):
            return x.to(device)
        if isinstance(x, (list, tuple)):
            return type(x)(to_dev(v) for v in x)
        if isinstance(x, dict):  # collate's host-side layout (packing) is a nested dict
            return {k: to_dev(v) for k, v in x.items()}
        return x

    return {k: {kk: to_dev(vv) for kk, vv in v.items()} for k, v in out.items()}


def batch_stats(stage, batch):
    am = batch["attention_mask"]
    lens = am.sum(1).tolist()
    st = {"tokens": int(sum(lens)), "lens": lens}
    if stage == "mntp":
        st["masked"] = int((batch["labels"] != IGNORE).sum())
        st["padded_tokens"] = am.numel()
    else:
        st["padded_tokens"] = sum(s[1].numel() for s in batch["slots"])  # the reference's padded positions
        st["n_queries"] = int(batch["n_queries"])
        st["n_docs"] = am.shape[0] - st["n_queries"]
    return st


def stage_flops(stage, st, mcfg, n_frozen, n_lora, head_rows=None, recompute="full"):
    """(model FLOPs, hardware FLOPs) of one step; see the module docstring. head_rows: the rows the MNTP LM head
    computes (default: the masked rows, as the engine does; a full-logit path computes every position).
    recompute: what the hardware FLOPs add for the recomputed forward: full, selective (GEMM outputs are kept;
    the engine's Triton attention reruns) or none."""
    layers, hq_d = mcfg.num_hidden_layers, mcfg.num_attention_heads * _head_dim(mcfg)
    T = st["tokens"]
    attn_fwd = 4.0 * sum(n * n for n in st["lens"]) * hq_d * layers
    model = 4.0 * n_frozen * T + 6.0 * n_lora * T + 3.0 * attn_fwd
    if stage == "mntp":
        model += 4.0 * (st["masked"] if head_rows is None else head_rows) * mcfg.vocab_size * mcfg.hidden_size
    else:
        model += 6.0 * st["n_queries"] * st["n_docs"] * mcfg.hidden_size
    redo = {"full": 2.0 * n_frozen * T + 2.0 * n_lora * T + attn_fwd, "selective": attn_fwd, "none": 0.0}
    return model, model + redo[recompute]


def _head_dim(mcfg):
    return getattr(mcfg, "head_dim", None) or mcfg.hidden_size // mcfg.num_attention_heads


def shape_name(stage, shapes):
    if stage == "mntp":
        B, S = shapes["mntp"]
        p, scheme = MASK["tiny" if shapes is TINY_SHAPES else "gpu"]
        return f"mntp {B}x{S} mask{p:g}-{scheme}"
    if stage == "simcse":
        n, lo, hi = shapes["simcse"]
        return f"simcse 2x{n} len{lo}-{hi}"
    nq, qlo, qhi, dlo, dhi, nneg = shapes["supervised"]
    return f"supervised {nq}q+{nq}p+{nq * nneg}n q{qlo}-{qhi} d{dlo}-{dhi}"


def peak_tflops(name, override=None):
    if override:
        return float(override), "--peak-tflops"
    for key, val in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return val, f"spec dense bf16 ({key})"
    return float("nan"), "unknown card"


# ----------------------------------------------------------------------------------------------
# Profiling
# ----------------------------------------------------------------------------------------------

CATEGORIES = ("attention", "linear: MLP", "linear: attention projections", "linear: LoRA", "loss", "optimizer",
              "ZeRO fetch/release/grad-reduce", "other", "unattributed", "linear (all GEMMs)")
_COMM = re.compile(r"nccl|all_gather|allgather|reduce_scatter|all_reduce|allreduce|c10d::|record_param_comms|zero:")
_LOSS = re.compile(r"cross_?entropy|nll_loss|log_softmax|logsumexp|contrastive|_ce_|scope:loss")
_ATTN = re.compile(r"attention|attn|flash|sdpa|scaled_dot|fmha|aten::_?softmax|softmax_backward")
_GEMM = re.compile(r"aten::(mm|addmm|bmm|baddbmm|matmul|linear)\b|gemm|nvjet|xmma|cutlass|gemv")


def _dims(shapes):
    out = set()
    for s in shapes or ():
        if isinstance(s, (list, tuple)):
            out.update(int(x) for x in s if isinstance(x, int))
    return out


def classify(chain, kernel_names, shapes, dims_cfg):
    """Category of one op from its name, its ancestors' names (nearest first), its kernels and input shapes.

    ZeRO scopes and collectives anywhere above the op win, then the optimizer phase; GEMMs are told apart by
    shape (vocab V -> LM head / loss, LoRA rank r, MLP width I, else attention projections); other ops take
    the first loss / attention name found walking up to the autograd node that ran them.
    """
    low = [c.lower() for c in chain]
    full = " ".join(low)
    kn = " ".join(kernel_names).lower()
    if _COMM.search(full) or "nccl" in kn:
        return "ZeRO fetch/release/grad-reduce"
    if "phase:optimizer" in full:
        return "optimizer"
    dims = _dims(shapes)
    own = low[0] if low else ""
    if dims_cfg["V"] in dims and "embedding" not in own:
        return "loss"
    gemm = bool(_GEMM.search(own) or _GEMM.search(kn))
    if gemm and dims_cfg["r"] in dims:
        return "linear: LoRA"
    if gemm and dims_cfg["I"] in dims:
        return "linear: MLP"
    for n in low:
        if _LOSS.search(n):
            return "loss"
        if _ATTN.search(n):
            return "attention"
        if n.startswith("autograd::engine::evaluate_function"):
            break
    if gemm:
        three_d = any(isinstance(s, (list, tuple)) and len(s) == 3 for s in shapes or ())
        if three_d and dims_cfg.get("H") not in dims and "aten::linear" not in full:
            return "attention"  # batched per-head products of the torch attention fallback
        return "linear: attention projections"
    return "other"


@contextlib.contextmanager
def zero_scopes():
    """Wrap DeepSpeed ZeRO-3's parameter fetch/release and gradient reduction in profiler scopes."""
    from torch.autograd.profiler import record_function

    patched = []
    targets = []
    try:
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as PPC

        targets += [(PPC, "fetch_sub_module", "zero:fetch"), (PPC, "release_sub_module", "zero:release")]
    except Exception:
        pass
    try:
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Z3

        targets += [(Z3, "reduce_independent_p_g_buckets_and_remove_grads", "zero:grad_reduce"),
                    (Z3, "independent_gradient_partition_epilogue", "zero:grad_reduce")]
    except Exception:
        pass
    for cls, name, scope in targets:
        fn = cls.__dict__.get(name)
        if fn is None:
            continue

        def wrapper(*a, _fn=fn, _scope=scope, **kw):
            with record_function(_scope):
                return _fn(*a, **kw)

        setattr(cls, name, wrapper)
        patched.append((cls, name, fn))
    try:
        yield
    finally:
        for cls, name, fn in patched:
            setattr(cls, name, fn)


def _ns(e, which):
    """Start or end of a Kineto event in ns (older torch only has start_us / duration_us)."""
    f = getattr(e, f"{which}_ns", None)
    if f is not None:
        return f()
    start = e.start_us() * 1000
    return start if which == "start" else start + e.duration_us() * 1000


def _raw_ops(prof, on_device):
    """Ops with their weight straight from the Kineto results (no FunctionEvent objects: a 7B step has
    hundreds of thousands of events, which the profiler's Python post-processing would take minutes on).

    Returns (ops, kernels, device_total_us): ops = [(name, chain of ancestor names, weight_us, kernel names,
    kineto event)], weight = the GPU time of the kernels the op launched (CPU self time without a GPU);
    kernels = {kernel name: [us, count]}.
    """
    from torch.autograd import DeviceType

    res = prof.profiler.kineto_results
    frontend, device, launched, kern, device_total = [], [], {}, {}, 0.0
    for e in res.events():
        if e.device_type() == DeviceType.CPU:
            if e.is_async() or e.linked_correlation_id() > 0:  # async ranges and CUDA runtime calls
                continue
            frontend.append(e)
        else:
            device.append(e)
    names = [e.name() for e in frontend]
    scopes = set(names)
    for e in device:
        name = e.name()
        ua = getattr(e, "is_user_annotation", None)
        if (ua is not None and ua()) or name in scopes:  # GPU-side ranges of record_function scopes
            continue
        dur = (_ns(e, "end") - _ns(e, "start")) / 1e3
        device_total += dur
        k = kern.setdefault(name, [0.0, 0])
        k[0] += dur
        k[1] += 1
        launched.setdefault(e.linked_correlation_id(), []).append((name, dur))
    # Nesting per thread by time containment (what the profiler's own tree does).
    recs = [(e.start_thread_id(), _ns(e, "start"), -_ns(e, "end"), i) for i, e in enumerate(frontend)]
    recs.sort()
    parent = [-1] * len(frontend)
    child_ns = [0] * len(frontend)
    stack, thread = [], None
    for tid, start, neg_end, i in recs:
        if tid != thread:
            stack, thread = [], tid
        while stack and stack[-1][1] <= start:
            stack.pop()
        if stack:
            parent[i] = stack[-1][0]
            child_ns[stack[-1][0]] += -neg_end - start
        stack.append((i, -neg_end))
    ops = []
    for i, e in enumerate(frontend):
        if on_device:
            ks = launched.get(e.correlation_id(), ())
            w = sum(d for _, d in ks)
            knames = [n for n, _ in ks]
        else:
            w = (_ns(e, "end") - _ns(e, "start") - child_ns[i]) / 1e3
            knames = []
        if w <= 0:
            continue
        chain, j = [], i
        while j >= 0:
            chain.append(names[j])
            j = parent[j]
        ops.append((names[i], chain, w, knames, e))
    return ops, kern, device_total


def _event_ops(prof, on_device):
    """Fallback through prof.events() (slow on big traces) when the raw Kineto results are not exposed."""
    ops, kern, device_total = [], {}, 0.0
    for e in prof.events():
        if "cpu" not in str(getattr(e, "device_type", "")).lower():
            if getattr(e, "is_user_annotation", False):
                continue
            dur = e.time_range.elapsed_us()
            device_total += dur
            k = kern.setdefault(e.name, [0.0, 0])
            k[0] += dur
            k[1] += 1
            continue
        if getattr(e, "is_async", False):
            continue
        ks = getattr(e, "kernels", []) or []
        w = float(sum(k.duration for k in ks)) if on_device else float(e.self_cpu_time_total)
        if w <= 0:
            continue
        chain, p = [], e
        while p is not None:
            chain.append(p.name)
            p = p.cpu_parent
        ops.append((e.name, chain, w, [k.name for k in ks], e))
    return ops, kern, device_total


def _shapes(ev):
    try:
        sh = ev.shapes() if callable(getattr(ev, "shapes", None)) else getattr(ev, "input_shapes", None)
        return [list(x) for x in sh] if sh else []
    except Exception:
        return []


_K_ATTN = re.compile(r"flash|fmha|attn|sdpa|_attn_")
_K_GEMM = re.compile(r"nvjet|gemm|cutlass|xmma|cublas|sm90_|sm80_|ampere_|hopper_")
_K_LOSS = re.compile(r"cross_entropy|_ce_|masked_ce|lse|log_softmax|nll")
_K_COMM = re.compile(r"nccl|allgather|reducescatter|allreduce")


def classify_kernel(name):
    """Category of a GPU kernel from its name alone (the CUDA-only profile has no op tree or shapes)."""
    n = name.lower()
    if _K_COMM.search(n):
        return "ZeRO fetch/release/grad-reduce"
    if _K_ATTN.search(n):
        return "attention"
    if _K_LOSS.search(n):
        return "loss"
    if _K_GEMM.search(n):
        return "linear (all GEMMs)"
    return "other"


def _profile_kernels(step_fn, device, title, top):
    """GPU profile of one step recording CUDA activity only (no CPU ops, no shapes: the profiler then adds
    almost nothing to the step): kernel time by category from kernel names, and GPU busy time against wall."""
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step_fn()
        _sync(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    kern, spans = {}, []
    for e in prof.profiler.kineto_results.events():
        ua = getattr(e, "is_user_annotation", None)
        if ua is not None and ua():
            continue
        start, end = _ns(e, "start"), _ns(e, "end")
        k = kern.setdefault(e.name(), [0.0, 0])
        k[0] += (end - start) / 1e3
        k[1] += 1
        spans.append((start, end))
    busy_ns, cur_s, cur_e = 0, None, None  # union of kernel intervals (streams may overlap)
    for a, b in sorted(spans):
        if cur_e is None or a > cur_e:
            busy_ns += (cur_e - cur_s) if cur_e is not None else 0
            cur_s, cur_e = a, b
        else:
            cur_e = max(cur_e, b)
    busy_ns += (cur_e - cur_s) if cur_e is not None else 0
    busy = busy_ns / 1e6
    cats = {c: 0.0 for c in CATEGORIES}
    for name, (us, _) in kern.items():
        cats[classify_kernel(name)] += us / 1e3
    total = sum(cats.values())
    lines = [f"== {title}", f"step wall {wall_ms:.1f} ms under a CUDA-only profiler; GPU busy {busy:.1f} ms "
             f"({100 * busy / max(wall_ms, 1e-9):.0f}% of wall), kernel time {total:.1f} ms",
             f"{'category':34s} {'ms':>10s} {'share':>7s}"]
    for c in CATEGORIES:
        if cats[c] or c in ("attention", "linear (all GEMMs)", "loss", "other"):
            lines.append(f"{c:34s} {cats[c]:10.2f} {100 * cats[c] / max(total, 1e-9):6.1f}%")
    lines.append(f"-- top {top} kernels by GPU time")
    for name, (w, n) in sorted(kern.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{w / 1e3:10.2f} ms {n:7d}x  {name[:110]}")
    return "\n".join(lines) + "\n", cats, wall_ms, busy


def profile_step(step_fn, device, dims_cfg, title, top=25):
    """Run step_fn once under torch.profiler -> (text report, {category: ms}, wall ms, busy ms).

    busy ms: total GPU kernel time (CPU self time without a GPU); busy / wall well below 1 means the step is
    bound by the host (Python, launches, ZeRO-3 hooks) rather than by the kernels.
    """
    from torch.profiler import ProfilerActivity, profile

    on_device = device.type == "cuda"
    if on_device:
        return _profile_kernels(step_fn, device, title, top)
    acts = [ProfilerActivity.CPU]
    _sync(device)
    with zero_scopes(), profile(activities=acts, record_shapes=True) as prof:
        t0 = time.perf_counter()
        step_fn()
        _sync(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    t_parse = time.perf_counter()
    try:
        ops, kern, device_total = _raw_ops(prof, on_device)
        source = "kineto results"
    except Exception as exc:
        log(f"raw profiler results unavailable ({type(exc).__name__}: {exc}); using prof.events()")
        ops, kern, device_total = _event_ops(prof, on_device)
        source = "prof.events()"
    cats = {c: 0.0 for c in CATEGORIES}
    agg = {}
    attributed = 0.0
    for name, chain, w, knames, ev in ops:
        cat = classify(chain, knames, _shapes(ev), dims_cfg)
        cats[cat] += w
        attributed += w
        o = agg.setdefault((name, cat), [0.0, 0])
        o[0] += w
        o[1] += 1
    total = device_total if on_device else attributed
    if on_device:
        cats["unattributed"] = max(device_total - attributed, 0.0)
    what = "GPU kernel time" if on_device else "CPU self time"
    lines = [f"== {title}", f"step wall {wall_ms:.1f} ms under the profiler; {what} {total / 1e3:.1f} ms"
             + (f" ({100 * total / 1e3 / wall_ms:.0f}% of wall; the rest is host-bound or idle GPU)"
                if on_device else ""),
             f"{'category':34s} {'ms':>10s} {'share':>7s}"]
    for c in CATEGORIES:
        lines.append(f"{c:34s} {cats[c] / 1e3:10.2f} {100 * cats[c] / max(total, 1e-9):6.1f}%")
    lines.append(f"-- top {top} ops by {what} (the op that launched the kernels; category)")
    for (name, cat), (w, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{w / 1e3:10.2f} ms {n:7d}x  {cat:30s} {name[:90]}")
    if kern:
        lines.append(f"-- top {top} kernels by GPU time")
        for name, (w, n) in sorted(kern.items(), key=lambda kv: -kv[1][0])[:top]:
            lines.append(f"{w / 1e3:10.2f} ms {n:7d}x  {name[:110]}")
    lines.append(f"(parsed from {source} in {time.perf_counter() - t_parse:.1f} s, {len(ops)} weighted ops)")
    return "\n".join(lines) + "\n", {c: v / 1e3 for c, v in cats.items()}, wall_ms, total / 1e3


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------

class PlainEngine:
    """Stand-in for the DeepSpeed engine when DeepSpeed cannot be imported or initialised: the same calls in
    plain torch (AdamW, clipping at 1.0), so the run still compares the paths; rows then say zero=none."""

    def __init__(self, module, optimizer):
        self.module, self.optimizer = module, optimizer
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __call__(self, batch):
        return self.module(batch)

    def backward(self, loss):
        loss.backward()

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def train(self, mode=True):
        self.module.train(mode)

    def eval(self):
        self.module.train(False)


class Bench:
    def __init__(self, args):
        self.args = args
        self.tiny = args.tiny
        self.zero = "none" if getattr(args, "no_deepspeed", False) else "3"
        try:
            if self.zero == "none":
                raise RuntimeError("--no-deepspeed")
            from engine.trainer import init_distributed

            self.device = init_distributed()  # a world of one; DeepSpeed places the module on this device
            import torch.distributed as dist

            probe = torch.ones(1, device=self.device)
            dist.all_reduce(probe)  # the process group works (ZeRO-3 gathers go through it)
            if probe.item() != 1.0:
                raise RuntimeError(f"all_reduce in a world of one returned {probe.item()}")
        except Exception as exc:
            if self.zero == "3":
                log(f"WARNING: DeepSpeed unavailable ({type(exc).__name__}: {exc}); measuring without ZeRO-3")
            self.zero = "none"
            self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        spec = TINY_MODEL if self.tiny else GPU_MODEL
        self.shapes = TINY_SHAPES if self.tiny else GPU_SHAPES
        self.lora = TINY_LORA if self.tiny else LORA
        self.cfg = make_train_config(self.tiny, self.lora, MASK["tiny" if self.tiny else "gpu"])
        self.tok = SyntheticTokenizer(spec["vocab_size"])
        self.stages = make_stages(self.cfg, self.tok)

        t0 = time.perf_counter()
        self._build(spec)
        if self.zero == "3":
            try:
                import deepspeed

                from engine.config import deepspeed_config

                ds_cfg = deepspeed_config(self.cfg, 1, use_bf16=self.dtype == torch.bfloat16)
                self.engine, _, _, _ = deepspeed.initialize(model=self.module, optimizer=self.optimizer,
                                                            config=ds_cfg)
            except Exception as exc:
                import traceback

                traceback.print_exc()
                log(f"WARNING: deepspeed.initialize failed ({type(exc).__name__}: {exc}); rebuilding the model "
                    "and measuring without ZeRO-3")
                self.zero = "none"
                del self.model, self.module, self.optimizer
                self.cleanup()
                self._build(spec)
        if self.zero == "none":
            self.engine = PlainEngine(self.module, self.optimizer)
        self.engine.train()
        mem = (f", {torch.cuda.memory_allocated(self.device) / 2**30:.1f} GiB allocated"
               if self.device.type == "cuda" else "")
        log(f"model + LoRA + {'ZeRO-3 engine' if self.zero == '3' else 'plain torch engine'} built in "
            f"{time.perf_counter() - t0:.1f} s on {self.device} ({self.dtype}){mem}; frozen GEMM params "
            f"{self.n_frozen / 1e9:.3f} B, LoRA {self.n_lora / 1e6:.2f} M")
        self.batches = make_batches(self.shapes, self.stages, spec["vocab_size"], self.device, seed=args.seed)
        self.stats = {s: batch_stats(s, b) for s, b in self.batches.items()}
        self.gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.peak, self.peak_src = peak_tflops(self.gpu, args.peak_tflops)
        self.dims_cfg = {"V": self.mcfg.vocab_size, "I": self.mcfg.intermediate_size, "r": self.lora["r"],
                         "H": self.mcfg.hidden_size}
        self.step_s = {}  # (stage, impl) -> slowest measured step (s), for the time budget

    def _build(self, spec):
        """Random model on the device -> MNTP head -> bidirectional -> checkpointing -> LoRA -> EngineModule."""
        from engine.modeling import add_lora
        from engine.trainer import EngineModule

        model = build_model(spec, self.dtype, self.device)
        self.mcfg = model.config
        model = self.stages[("mntp", "engine")].prepare_model(model)  # LM head that can return the fused loss
        set_attention_path(model, "engine")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = add_lora(model, self.cfg.lora)
        self.n_frozen, self.n_lora = count_params(model)
        self.model = model
        self.module = EngineModule(model, self.stages[("mntp", "engine")])
        self.optimizer = torch.optim.AdamW([p for p in self.module.parameters() if p.requires_grad], lr=1e-5)

    # -- switching -------------------------------------------------------------------------------
    def configure(self, stage, impl):
        path, impls = IMPLS[impl]
        for op, val in impls.items():
            kernels.set_default_impl(op, val)
        set_attention_path(self.model, path)
        from engine.bidirectional import set_attention_dropout

        set_attention_dropout(self.model, 0.3 if stage == "simcse" else 0.0)
        self.module.stage = self.stages[(stage, path)]

    def train_step(self, batch):
        loss, _ = self.module.stage.train_micro_step(self.engine, batch)
        self.engine.step()
        return loss

    def phased_step(self, batch):
        """The same step with profiler scopes around forward, backward and the optimizer step."""
        from torch.autograd.profiler import record_function

        with record_function("phase:forward"):
            loss, _ = self.engine(batch)
        with record_function("phase:backward"):
            self.engine.backward(loss)
        with record_function("phase:optimizer"):
            self.engine.step()
        return loss

    def recover(self):
        """Best effort after an OOM or error inside a step: drop grads and cached blocks."""
        try:
            self.engine.zero_grad()
        except Exception:
            pass
        try:
            coord = self.engine.optimizer.parameter_offload.get_param_coordinator()
            coord.release_and_reset_all(self.module)
        except Exception:
            pass
        try:
            self.module.zero_grad(set_to_none=True)
        except Exception:
            pass
        self.cleanup()

    def cleanup(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def estimate_s(self, stage, impl, profile):
        """Rough cost of a measurement from what was measured so far (0 when nothing was)."""
        same = [t for (s, _), t in self.step_s.items() if s == stage]
        if same:
            step = max(same)
        elif self.step_s:
            per_token = max(t / self.stats[s]["tokens"] for (s, _), t in self.step_s.items())
            step = per_token * self.stats[stage]["tokens"] * (1.5 if impl.startswith("reference") else 1.0)
        else:
            return 0.0
        step *= 1.5 if "torch" in impl else 1.0
        return (self.args.warmup + self.args.steps) * step + ((step + 10.0) if profile else 0.0)

    # -- parity ----------------------------------------------------------------------------------
    @torch.no_grad()
    def parity(self, stage):
        """Eval-mode loss of the reference and the engine path on the same batch (no dropout)."""
        losses = {}
        self.engine.eval()
        try:
            for impl in ("reference-zero3", "engine"):
                self.configure(stage, impl)
                loss, _ = self.engine(self.batches[stage])
                losses[impl] = float(loss)
        finally:
            self.engine.train()
        ref = losses["reference-zero3"]
        rel = abs(losses["engine"] - ref) / max(abs(ref), 1e-12)
        log(f"parity {stage}: reference-zero3 {ref:.6f} engine {losses['engine']:.6f} rel {rel:.2e}")
        return rel, losses

    # -- one measurement -------------------------------------------------------------------------
    def measure(self, writer, stage, impl, parity_rel, profile_out=None):
        st = self.stats[stage]
        full_logits = stage == "mntp" and impl.startswith("reference")
        model_flops, hw_flops = stage_flops(stage, st, self.mcfg, self.n_frozen, self.n_lora,
                                            head_rows=st["padded_tokens"] if full_logits else None)
        shape = shape_name(stage, self.shapes)
        extra = {"tokens": st["tokens"],
                 "padded_tokens": st["padded_tokens"] if impl.startswith("reference") else st["tokens"],
                 "dtype": str(self.dtype).replace("torch.", ""), "zero": self.zero, "world": 1,
                 "peak_tflops": f"{self.peak:.1f}", "peak_src": self.peak_src.replace(";", ","),
                 "model_tflop": f"{model_flops / 1e12:.2f}", "parity_rel": f"{parity_rel:.2e}", "flops_def": FLOPS_DEF}
        if stage == "mntp":
            extra["masked_rows"] = st["masked"]
            extra["head_rows"] = st["padded_tokens"] if full_logits else st["masked"]
            extra["mask_prob"], extra["mask_scheme"] = MASK["tiny" if self.tiny else "gpu"]
        batch = self.batches[stage]
        self.cleanup()
        status, times, peak, act_peak, loss = "ok", [], float("nan"), float("nan"), float("nan")
        failure = None
        try:
            self.configure(stage, impl)
            for _ in range(self.args.warmup):
                self.train_step(batch)
            _sync(self.device)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
                base = torch.cuda.memory_allocated(self.device)
            for _ in range(self.args.steps):
                _sync(self.device)
                t0 = time.perf_counter()
                loss = float(self.train_step(batch))
                _sync(self.device)
                times.append(time.perf_counter() - t0)
                if out_of_time(self.args, times):
                    extra["cut"] = "budget"
                    break
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device) / 2**20
                act_peak = peak - base / 2**20
        except torch.cuda.OutOfMemoryError as exc:
            status, failure = "oom", str(exc).split("\n")[0][:80]
        except Exception as exc:  # recorded, never fatal: the rest of the GPU run goes on
            import traceback

            traceback.print_exc()
            status, failure = "error", f"{type(exc).__name__}: {exc}".split("\n")[0][:80]
        if failure is not None:
            self.recover()
            extra["detail"] = failure.replace(";", ",").replace("=", ":")
        extra["status"] = status
        if times:
            s = statistics.median(times)
            self.step_s[(stage, impl)] = max(times)
            extra.update(step_stats(times, self.args.warmup))
            extra.update(tokens_per_s=f"{st['tokens'] / s:.1f}", steps_ms="/".join(f"{t * 1e3:.1f}" for t in times),
                         mfu=f"{model_flops / s / 1e12 / self.peak:.4f}" if self.peak == self.peak else "nan",
                         hfu=f"{hw_flops / s / 1e12 / self.peak:.4f}" if self.peak == self.peak else "nan",
                         act_peak_mb=f"{act_peak:.1f}", loss=f"{loss:.4f}")
            row = writer.add(shape, impl, "step", s * 1e3, tflops=model_flops / s / 1e12, peak_mb=peak, **extra)
        else:
            row = writer.add(shape, impl, "step", float("nan"), **extra)
        if profile_out is not None and status == "ok":
            self.profile(writer, stage, impl, shape, profile_out)
        return row

    def profile(self, writer, stage, impl, shape, path):
        try:
            title = f"{stage} / {impl} ({self.gpu}, {str(self.dtype)[6:]}, zero={self.zero})"
            text, cats, wall, busy = profile_step(lambda: self.phased_step(self.batches[stage]), self.device,
                                                  self.dims_cfg, title)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            writer.add(shape, impl, "profile", float("nan"), status="error",
                       detail=f"{type(exc).__name__}: {exc}".split("\n")[0][:80].replace(";", ",").replace("=", ":"))
            return
        with open(path, "a") as f:
            f.write(text + "\n")
        print(text, flush=True)
        keys = {c: re.sub(r"[^a-z]+", "_", c.lower()).strip("_") for c in CATEGORIES}
        writer.add(shape, impl, "profile", wall, status="ok", busy_ms=f"{busy:.1f}",
                   busy_pct=f"{100 * busy / max(wall, 1e-9):.0f}" if self.device.type == "cuda" else "nan",
                   **{f"{keys[c]}_ms": f"{v:.2f}" for c, v in cats.items()})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", f"bench_{BENCH}.csv"))
    ap.add_argument("--profile", default=None, help="text file for the profiler breakdown (engine + reference MNTP)")
    ap.add_argument("--tiny", action="store_true", help="CPU mode: tiny random Llama, small batches (CI)")
    ap.add_argument("--stages", default="mntp,simcse,supervised")
    ap.add_argument("--impls", default=None, help="comma list of (stage:)impl to run instead of the default plan, "
                    f"impl in {', '.join(ALL_IMPLS)}")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per measurement (5; 1 with --tiny)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement (20; 2 with --tiny)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting measurements that would end after this many seconds from start "
                         "(default 135 on GPU, none with --tiny)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the card's dense bf16 peak")
    ap.add_argument("--no-parity", action="store_true")
    ap.add_argument("--no-deepspeed", action="store_true",
                    help="plain torch optimizer step instead of DeepSpeed ZeRO-3 (also the automatic fallback)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--big-batch", default=None,
                    help="comma list of global batch sizes: measure only the supervised step's peak memory at these "
                         "batch sizes (short texts), without and with gradient caching (issue 6)")
    ap.add_argument("--grad-cache-chunk", type=int, default=256, help="texts per chunk for --big-batch")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        # Small CPU ops on shared cores: OpenMP barriers stall whenever a core is taken, one thread does not.
        torch.set_num_threads(1)
    if not args.tiny and not torch.cuda.is_available():
        log("no CUDA device: running the --tiny CPU configuration instead")
        args.tiny = True
    MASK["gpu"], MASK["tiny"] = llm2vec_masking(GPU_MODEL["model_type"]), llm2vec_masking(TINY_MODEL["model_type"])
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 5
    if args.steps is None:
        args.steps = 2 if args.tiny else 20
    budget = args.budget_s if args.budget_s is not None else (float("inf") if args.tiny else 135.0)
    args.budget_resolved = budget
    stages = [s for s in args.stages.split(",") if s]
    plan = default_plan(stages, args.tiny)
    if args.impls:
        wanted = [x.strip() for x in args.impls.split(",") if x.strip()]
        plan = [(s, i) for s, i in plan if i in wanted or f"{s}:{i}" in wanted]
        for w in wanted:
            s, _, i = w.rpartition(":")
            if i not in ALL_IMPLS:
                ap.error(f"unknown impl {i!r}; choose from {sorted(ALL_IMPLS)}")
            if i in OWN_MODEL and s not in ("", "mntp"):
                ap.error(f"{i} is MNTP only")
            for stg in ([s] if s else (["mntp"] if i in OWN_MODEL else stages)):
                if (stg, i) not in plan:
                    plan.append((stg, i))
    if args.profile:
        os.makedirs(os.path.dirname(os.path.abspath(args.profile)) or ".", exist_ok=True)
        open(args.profile, "w").close()

    writer = CsvWriter(args.out, BENCH, timing="wall-synced-step")
    # llm2vec's one-GPU recipe and engine-auto first, each in a model of its own that is freed before the next
    own_plan = [(s, i) for s, i in plan if i in OWN_MODEL and not args.big_batch]  # --big-batch: only that
    plan = [(s, i) for s, i in plan if i not in OWN_MODEL]
    for stage, impl in own_plan:
        elapsed = time.perf_counter() - _T0
        if elapsed > budget:
            writer.add(shape_name(stage, TINY_SHAPES if args.tiny else GPU_SHAPES), impl, "step", float("nan"),
                       status="skipped_budget", elapsed_s=f"{elapsed:.0f}", budget_s=f"{budget:.0f}")
            continue
        measure_own_model(args, writer, impl, args.profile)
    if not plan and not args.big_batch:
        writer._f.close()
        log(f"{len(writer.rows)} rows -> {args.out}")
        return writer.rows
    try:
        bench = Bench(args)
    except Exception as exc:  # no model: one error row per planned measurement says why, then fail
        import traceback

        traceback.print_exc()
        detail = f"{type(exc).__name__}: {exc}".split("\n")[0][:80].replace(";", ",").replace("=", ":")
        for stage, impl in plan:
            writer.add(shape_name(stage, TINY_SHAPES if args.tiny else GPU_SHAPES), impl, "step", float("nan"),
                       status="error", detail=f"setup failed: {detail}")
        writer._f.close()
        raise
    parity = {}
    try:
        if args.big_batch:
            plan = []  # this invocation measures only the big-batch supervised steps
            big_batch(bench, writer, [int(x) for x in args.big_batch.split(",") if x.strip()], args.grad_cache_chunk,
                      budget)
        for stage, impl in plan:
            prof = args.profile if (args.profile and stage == "mntp" and impl in ("reference-zero3", "engine")) else None
            elapsed = time.perf_counter() - _T0
            est = bench.estimate_s(stage, impl, prof is not None)
            if elapsed + est > budget:
                writer.add(shape_name(stage, bench.shapes), impl, "step", float("nan"),
                           status="skipped_budget", elapsed_s=f"{elapsed:.0f}", est_s=f"{est:.0f}",
                           budget_s=f"{budget:.0f}")
                continue
            if stage not in parity:
                parity[stage] = float("nan") if args.no_parity else _safe_parity(bench, stage)
            bench.measure(writer, stage, impl, parity[stage], profile_out=prof)
    finally:
        writer._f.close()
        for op in ("attention", "masked_ce", "contrastive"):
            kernels.set_default_impl(op, "auto")
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
    log(f"{len(writer.rows)} rows -> {args.out}")
    return writer.rows


def big_batch(bench, writer, sizes, chunk, budget):
    """Peak memory and time of one supervised engine step at large global batches, without gradient caching
    (chunk 0) and with it. Texts are short (queries 8-32 tokens, positives/negatives 16-64) so a 7B step at
    batch 4096 (12288 texts) stays within a GPU run's minutes; memory without caching grows with the batch,
    with caching it is bounded by one chunk's activations plus the (n_texts, H) embeddings."""
    from engine.encoding import pad_batch

    lo_q, hi_q, lo_d, hi_d = (4, 8, 6, 12) if bench.tiny else (8, 32, 16, 64)
    # Most needed first, so a run that is cut short keeps the issue-6 figure (the largest batch WITH caching):
    # every size with caching, largest first, then the sizes without it (the largest is expected to OOM).
    runs = ([(B, chunk) for B in sorted(sizes, reverse=True)] if chunk > 0 else []) + [(B, 0) for B in sorted(sizes)]
    batches = {}
    for B, c in runs:
        if B not in batches:
            g = torch.Generator().manual_seed(B)
            lens = _lengths(g, B, lo_q, hi_q) + _lengths(g, 2 * B, lo_d, hi_d)
            seqs = [_rand_ids(g, n, bench.mcfg.vocab_size) for n in lens]
            ids, am, pm = pad_batch(seqs, 0, "right", extra=([[1] * n for n in lens],))
            batches[B] = ({"input_ids": ids.to(bench.device), "attention_mask": am.to(bench.device),
                           "pool_mask": pm.to(bench.device), "n_queries": torch.tensor(B)}, int(am.sum()))
        batch, n_tokens = batches[B]
        shape = f"supervised-bigbatch B{B}+{B}p+{B}n q{lo_q}-{hi_q} d{lo_d}-{hi_d}"
        impl = f"engine-gradcache{c}" if c else "engine-nocache"
        elapsed = time.perf_counter() - _T0
        if elapsed > budget:
            writer.add(shape, impl, "step", float("nan"), status="skipped_budget", elapsed_s=f"{elapsed:.0f}")
            continue
        bench.cfg.contrastive.grad_cache_chunk = c
        bench.configure("supervised", "engine")
        bench.cleanup()
        status, ms, peak, detail = "ok", float("nan"), float("nan"), ""
        try:
            if bench.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(bench.device)
            _sync(bench.device)
            t0 = time.perf_counter()
            bench.train_step(batch)
            _sync(bench.device)
            ms = (time.perf_counter() - t0) * 1e3
            if bench.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(bench.device) / 2**20
        except torch.cuda.OutOfMemoryError as exc:
            status, detail = "oom", str(exc).split("\n")[0][:80]
            bench.recover()
        except Exception as exc:
            status, detail = "error", f"{type(exc).__name__}: {exc}".split("\n")[0][:80]
            bench.recover()
        finally:
            bench.cfg.contrastive.grad_cache_chunk = 0
        extra = {"status": status, "texts": 3 * B, "tokens": n_tokens, "chunk": c, "zero": bench.zero}
        if detail:
            extra["detail"] = detail.replace(";", ",").replace("=", ":")
        writer.add(shape, impl, "step", ms, peak_mb=peak, **extra)


def out_of_time(args, times, min_steps=5):
    """Stop timing early (after at least min_steps) when the next step and a profiled one would end past the
    budget, so a run under a hard timeout still writes its row; the row then says cut=budget."""
    budget = getattr(args, "budget_resolved", float("inf"))
    return len(times) >= min_steps and time.perf_counter() - _T0 + 3 * max(times) > budget


def step_stats(times, warmup):
    """CSV extras of a timed run: min, quartiles and IQR of the step times (ms), and the protocol."""
    ms = sorted(t * 1e3 for t in times)
    q1, q3 = (statistics.quantiles(ms, n=4)[0], statistics.quantiles(ms, n=4)[2]) if len(ms) > 1 else (ms[0], ms[0])
    return {"min_ms": f"{ms[0]:.1f}", "q1_ms": f"{q1:.1f}", "q3_ms": f"{q3:.1f}", "iqr_ms": f"{q3 - q1:.1f}",
            "warmup": warmup, "timed_steps": len(ms)}


class _OwnModel:
    """A row's model, batch and step, built in this process for this row alone (see measure_own_model)."""

    def __init__(self, step, eval_loss, model, mcfg, n_frozen, n_lora, head_rows, recompute, extra, title):
        self.step, self.eval_loss, self.model, self.mcfg = step, eval_loss, model, mcfg
        self.n_frozen, self.n_lora, self.head_rows, self.recompute = n_frozen, n_lora, head_rows, recompute
        self.extra, self.title = extra, title


def _mntp_batch(args, lora, mask, vocab, device):
    """The MNTP batch every own-model row trains on: the same ids, masks and labels for the same --seed."""
    from engine.stages.base import to_device

    B, S = (TINY_SHAPES if args.tiny else GPU_SHAPES)["mntp"]
    stage = make_stages(make_train_config(args.tiny, lora, mask), SyntheticTokenizer(vocab))[("mntp", "engine")]
    g = torch.Generator().manual_seed(args.seed)
    coll = stage.collate([_rand_ids(g, S, vocab) for _ in range(B)], torch.Generator().manual_seed(args.seed + 1))
    return coll, batch_stats("mntp", to_device(coll, device))  # collate's host-side layout is a nested dict


def _build_hf_reference(args, impl, device, dtype, spec, lora, mask):
    model = build_hf_reference(spec, dtype, device, lora, attn=HF_REFERENCES[impl], seed=args.seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    coll, st = _mntp_batch(args, lora, mask, spec["vocab_size"], device)
    batch = {"input_ids": coll["input_ids"].to(device), "hf_labels": unshift_labels(coll["labels"]).to(device)}
    n_frozen, n_lora = count_params(model)
    return st, _OwnModel(step=lambda: hf_reference_step(model, opt, params, batch),
                         eval_loss=lambda: hf_reference_forward(model, batch), model=model, mcfg=model.config,
                         n_frozen=n_frozen, n_lora=n_lora, head_rows=st["padded_tokens"], recompute="full",
                         extra={"zero": "none", "attn": HF_REFERENCES[impl]}, title="no DeepSpeed")


def _build_engine_auto(args, impl, device, dtype, spec, lora, mask):
    """The trainer's own setup (benchmarks.bench_step_ops.Path "engine": engine.trainer.setup_model with its fused
    LoRA groups and Triton decoder ops, the memory plan's ZeRO stage and recompute policy, DeepSpeed from
    engine.config.deepspeed_config and engine.trainer.tune_optimizer_step) on the batch of the reference row."""
    import types

    from benchmarks.bench_step_ops import Path as StepPath
    from engine.stages.base import to_device

    B = (TINY_SHAPES if args.tiny else GPU_SHAPES)["mntp"][0]
    sets = [f"lora.r={lora['r']}", f"lora.alpha={lora['alpha']}", f"lora.dropout={lora['dropout']}",
            f"mntp.mask_prob={mask[0]}", f"mntp.scheme={mask[1]}"]
    if device.type != "cuda":  # the CPU rehearsal: fp32 and the kernels' torch paths (the plan stays an H200's)
        sets += ["model.dtype=fp32", "model.attention=auto", "model.loss=auto", "model.fused_ops=auto"]
    path = StepPath("engine", spec, device.type, sets, B)
    path.init_deepspeed()
    coll, st = _mntp_batch(args, lora, mask, spec["vocab_size"], device)
    batch = types.SimpleNamespace(engine=to_device(coll, device))
    n_frozen, n_lora = count_params(path.module.model)

    def eval_loss():
        return path.module(batch.engine)[0]

    opt = type(path.engine.optimizer).__name__
    return st, _OwnModel(step=lambda: path.step(batch), eval_loss=eval_loss, model=path.module,
                         mcfg=path.module.model.config, n_frozen=n_frozen, n_lora=n_lora, head_rows=st["masked"],
                         recompute=path.recompute,
                         extra={"zero": str(path.zero_stage), "recompute": path.recompute, "optimizer": opt,
                                "fused_ops": path.cfg.model.fused_ops},
                         title=f"ZeRO {path.zero_stage}, {path.recompute} recompute, {opt}")


OWN_MODEL_IMPLS = {"reference": _build_hf_reference, "reference-fa2": _build_hf_reference,
                   "engine-auto": _build_engine_auto}


def measure_own_model(args, writer, impl, profile_out=None):
    """An MNTP row whose model is built in this process for this row alone (gpu_run.sh runs each in its own
    process), on the same batch for the same --seed:

    * reference / reference-fa2: llm2vec's one-GPU recipe, no DeepSpeed and no engine code. HF model + PEFT
      LoRA, bf16 on the GPU, bidirectional SDPA (or flash-attn 2) with no mask on the unpadded MNTP batch,
      full gradient checkpointing, full-logit CE inside the HF loss, clip 1.0 + torch AdamW;
    * engine-auto: what `deepspeed engine/train.py` sets up for this model on this device (_build_engine_auto).
    """
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tiny = args.tiny
    spec, shapes, lora = (TINY_MODEL, TINY_SHAPES, TINY_LORA) if tiny else (GPU_MODEL, GPU_SHAPES, LORA)
    shape = shape_name("mntp", shapes)
    mask = MASK["tiny" if tiny else "gpu"]
    extra = {"world": 1, "dtype": str(dtype).replace("torch.", ""), "mask_prob": mask[0], "mask_scheme": mask[1]}
    if HF_REFERENCES.get(impl) == "flash_attention_2":
        extra.update(zero="none", attn="flash_attention_2")
        try:
            import flash_attn  # noqa: F401
        except Exception:
            return writer.add(shape, impl, "step", float("nan"), status="skipped", detail="flash_attn not installed",
                              **extra)
        if device.type != "cuda":
            return writer.add(shape, impl, "step", float("nan"), status="skipped", detail="flash-attn needs CUDA",
                              **extra)
    status, failure, times, peak, loss = "ok", None, [], float("nan"), float("nan")
    own = None
    try:
        st, own = OWN_MODEL_IMPLS[impl](args, impl, device, dtype, spec, lora, mask)
        extra.update(own.extra)
        model_flops, hw_flops = stage_flops("mntp", st, own.mcfg, own.n_frozen, own.n_lora, head_rows=own.head_rows,
                                            recompute=own.recompute)
        extra.update(tokens=st["tokens"], padded_tokens=st["padded_tokens"], masked_rows=st["masked"],
                     model_tflop=f"{model_flops / 1e12:.2f}", head_rows=own.head_rows, flops_def=FLOPS_DEF)
        own.model.eval()  # the loss before any step (LoRA B is zero): the same batch on every own-model row
        with torch.no_grad():
            extra["eval_loss0"] = f"{float(own.eval_loss()):.6f}"
        own.model.train()
        for _ in range(args.warmup):
            own.step()
        _sync(device)
        base = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        for _ in range(args.steps):
            _sync(device)
            t0 = time.perf_counter()
            loss = float(own.step())
            _sync(device)
            times.append(time.perf_counter() - t0)
            if out_of_time(args, times):
                extra["cut"] = "budget"
                break
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
            extra["act_peak_mb"] = f"{peak - base / 2**20:.1f}"
    except torch.cuda.OutOfMemoryError as exc:
        status, failure = "oom", str(exc).split("\n")[0][:80]
    except Exception as exc:  # recorded, never fatal
        import traceback

        traceback.print_exc()
        status, failure = "error", f"{type(exc).__name__}: {exc}".split("\n")[0][:80]
    extra["status"] = status
    if failure:
        extra["detail"] = failure.replace(";", ",").replace("=", ":")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    pk, pk_src = peak_tflops(gpu, args.peak_tflops)
    if times:
        s = statistics.median(times)
        extra.update(step_stats(times, args.warmup))
        extra.update(tokens_per_s=f"{st['tokens'] / s:.1f}", steps_ms="/".join(f"{t * 1e3:.1f}" for t in times),
                     mfu=f"{model_flops / s / 1e12 / pk:.4f}" if pk == pk else "nan",
                     hfu=f"{hw_flops / s / 1e12 / pk:.4f}" if pk == pk else "nan", peak_tflops=f"{pk:.1f}",
                     peak_src=pk_src.replace(";", ","), loss=f"{loss:.4f}")
        row = writer.add(shape, impl, "step", s * 1e3, tflops=model_flops / s / 1e12, peak_mb=peak, **extra)
        log(f"{impl}: median {s * 1e3:.1f} ms, min {extra['min_ms']} ms, IQR {extra['iqr_ms']} ms over {len(times)} "
            f"steps; loss {loss:.4f}")
        if profile_out is not None and status == "ok" and device.type == "cuda":
            try:
                title = f"mntp / {impl} ({gpu}, {extra['dtype']}, {own.title})"
                text, cats, wall, busy = profile_step(own.step, device, {"V": spec["vocab_size"],
                                                                         "I": spec["intermediate_size"],
                                                                         "r": lora["r"], "H": spec["hidden_size"]},
                                                      title)
                with open(profile_out, "a") as f:
                    f.write(text + "\n")
                print(text, flush=True)
            except Exception as exc:
                log(f"profile of {impl} failed: {type(exc).__name__}: {exc}")
    else:
        row = writer.add(shape, impl, "step", float("nan"), **extra)
    del own
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _safe_parity(bench, stage):
    try:
        rel, _ = bench.parity(stage)
        return rel
    except Exception as exc:
        import traceback

        traceback.print_exc()
        log(f"parity {stage} failed: {type(exc).__name__}: {exc}")
        bench.recover()
        return float("nan")


if __name__ == "__main__":
    main()
