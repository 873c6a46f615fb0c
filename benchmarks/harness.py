"""What the step benchmarks share (bench_train_step, the CPU proxy bench_step_ops and its step paths): the
synthetic tokenizer and batches, the benchmark's TrainConfig, random-weight models, llm2vec's masking per model
family, and the reference recipe they measure the engine against.

The reference (llm2vec's one-GPU MNTP recipe, no engine code): an HF CausalLM + PEFT LoRA (r on all seven
projections, PEFT defaults), bidirectional attention with no mask on an unpadded batch, full (non-reentrant)
gradient checkpointing, full logits for every position and the cross-entropy inside the HF loss (on labels
unshifted from the engine's MNTP labels: the same rows, the same loss), clip 1.0 + torch AdamW.
The older reference stages (ReferenceMNTP and the contrastive ones) run what LLM2Vec does on the engine's own
model: HF SDPA with a dense additive (B, 1, S, S) mask, full logits, one forward per contrastive text slot.
"""
import contextlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/x.py` as well as `python -m benchmarks.x`
    sys.path.insert(0, ROOT)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from peft import LoraConfig as PeftLoraConfig  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from engine.bidirectional import ATTN_NAME, make_bidirectional  # noqa: E402
from engine.config import ContrastiveConfig, LoraConfig, MNTPConfig, ModelConfig, TrainConfig  # noqa: E402
from engine.encoding import pad_batch  # noqa: E402
from engine.modeling import decoder_of, lm_head_of, lora_targets  # noqa: E402
from engine.pooling import pool  # noqa: E402
from engine.stages.mntp import MNTPStage  # noqa: E402
from engine.stages.simcse import SimCSEStage  # noqa: E402
from engine.stages.supervised import SupervisedStage  # noqa: E402

try:  # optional: without it the benchmarks measure a plain torch step (rows say zero=none)
    import deepspeed  # noqa: E402

    DEEPSPEED_ERROR = None
except Exception as _exc:
    deepspeed, DEEPSPEED_ERROR = None, f"{type(_exc).__name__}: {_exc}"

IGNORE = -100

GPU_MODEL = dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 max_position_embeddings=4096, sliding_window=None, tie_word_embeddings=False)
TINY_MODEL = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  tie_word_embeddings=False)
LORA = dict(r=16, alpha=32, dropout=0.05)
TINY_LORA = dict(r=8, alpha=16, dropout=0.05)


@contextlib.contextmanager
def wrapped_methods(targets, make_wrapper):
    """Within the block, each method ``cls.name`` of ``targets`` (tuples ``(cls, name, *extra)``; a method the
    class does not define itself is passed over) is replaced by ``make_wrapper(original, *extra)``; the originals
    are put back on exit, also after an error."""
    patched = []
    for cls, name, *extra in targets:
        fn = cls.__dict__.get(name)
        if fn is None:
            continue
        setattr(cls, name, make_wrapper(fn, *extra))
        patched.append((cls, name, fn))
    try:
        yield
    finally:
        for cls, name, fn in patched:
            setattr(cls, name, fn)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# Tokenizer, models and configs
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
    spec = dict(spec, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # SyntheticTokenizer's ids
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    cfg.use_cache = False
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model


def make_train_config(tiny, lora, mask=(0.2, "bert")):
    return TrainConfig(
        stage="mntp", model=ModelConfig(name_or_path="synthetic", gradient_checkpointing=True),
        lora=LoraConfig(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"]),
        mntp=MNTPConfig(mask_prob=mask[0], scheme=mask[1], mask_token="eos"),
        contrastive=ContrastiveConfig(temperature=0.05, pooling="mean", max_len=512, gather_across_ranks=True),
        batch_size=1, micro_batch_size=1, max_seq_len=512, progress_bar=False)


def count_params(model):
    """(frozen decoder GEMM weights, LoRA weights) per token, counted before ZeRO-3 partitions them."""
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
    with open(os.path.join(ROOT, LLM2VEC_MNTP_CONFIG.get(model_type, LLM2VEC_MNTP_CONFIG["llama"]))) as f:
        m = yaml.safe_load(f)["mntp"]
    return float(m["mask_prob"]), m["scheme"]


def build_hf_reference(spec, dtype, device, lora, attn="sdpa", seed=0):
    """HF CausalLM + PEFT LoRA (r on all seven projections, PEFT defaults) as llm2vec trains it on one GPU:
    bidirectional attention through ``attn`` (SDPA or flash_attention_2) with no mask on an unpadded batch,
    full (non-reentrant) gradient checkpointing. Returns the PEFT model."""
    model = build_model(spec, dtype, device, seed)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
    model.config._attn_implementation = attn
    model.config.is_causal = False
    for mod in model.modules():  # non-causal: SDPA / flash-attn read the module's is_causal flag
        if hasattr(mod, "is_causal"):
            mod.is_causal = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # the same weights on every family: Phi3's qkv_proj for q/k/v, as the engine's add_lora adapts them
    targets = list(lora_targets(LORA_TARGETS, model.config.model_type))
    pcfg = PeftLoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=targets,
                          bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, pcfg)


def unshift_labels(labels):
    """The engine's MNTP labels (token i's target at i-1) -> HF's causal-LM labels (target at i), which the HF
    loss shifts back: the same rows, the same loss."""
    out = torch.full_like(labels, IGNORE)
    out[:, 1:] = labels[:, :-1]
    return out


def hf_reference_forward(model, batch):
    """Full logits for every position, fp32 upcast and cross-entropy, all inside the HF model's own loss.
    ``batch["hf_mask"]``, when given, is the attention mask handed to the model as is (eager attention's
    bidirectional masks, which it adds to the scores)."""
    mask = batch.get("hf_mask")
    return model(input_ids=batch["input_ids"], labels=batch["hf_labels"], attention_mask=mask).loss


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
    dec = decoder_of(model)
    dtype = dec.get_input_embeddings().weight.dtype  # a ZeRO-3 partitioned parameter keeps its dtype
    pos = (torch.cumsum(attention_mask, 1) - 1).clamp(min=0)
    mask4 = additive_mask(attention_mask, dtype)
    return dec(input_ids=input_ids, attention_mask=mask4, position_ids=pos).last_hidden_state


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


def make_stages(cfg, tok):
    """{(stage, path): stage object}. Engine entries are the engine's own stage classes."""
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
