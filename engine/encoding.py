"""Tokenising texts (with optional instructions) and turning them into pooled embeddings."""
import torch

from .modeling import packed_hidden_states
from .pooling import pool


def special_prefix(tokenizer):
    """The ids the tokenizer puts before a text with ``add_special_tokens=True`` (BOS for Llama, Mistral and
    Gemma; nothing for SmolLM2 or Qwen).

    This is the one special-token rule of the engine: the encoder (:func:`tokenize_with_instruction`)
    tokenises with the tokenizer's own special tokens, and MNTP blocks (``engine.data.chunk_documents``)
    start with exactly this prefix, so a model is trained on the first token it will see at inference.
    """
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return list(full[:k])
    raise ValueError(f"cannot find the text tokens of {probe!r} among the tokenizer's special tokens: {full}")


def tokenize_with_instruction(tokenizer, texts, instructions=None, max_len=512, pooling="mean"):
    """Tokenise ``instruction + text`` once; mark which tokens belong to the text.

    Returns (list of id lists, list of pool-mask lists, number truncated). The instruction/text
    boundary comes from the tokenizer's character offsets on the joint string, so the text tokens are
    exactly those the model sees (no re-tokenising of the text alone). Special tokens are the tokenizer's
    own (``add_special_tokens=True``; see :func:`special_prefix`, the rule MNTP blocks follow too). For
    eos/last pooling an EOS token is appended and pooled.
    """
    if not texts:
        raise ValueError("no texts to tokenize (empty batch)")
    instructions = instructions if instructions is not None else [""] * len(texts)
    eos = tokenizer.eos_token_id if pooling in ("eos", "last") else None
    budget = max_len - (1 if eos is not None else 0)
    ids_out, pm_out, truncated = [], [], 0
    for text, instr in zip(texts, instructions):
        instr = instr or ""
        prefix = instr if (not instr or instr.endswith((" ", "\n"))) else instr + " "
        enc = tokenizer(prefix + text, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        # a token is a text token if it covers any character of the text (BPE glues the space to the next word)
        pm = [1 if (e > len(prefix) and e > s) else 0 for s, e in offsets]
        if len(ids) > budget:
            truncated += 1
            ids, pm = ids[:budget], pm[:budget]
        if eos is not None:
            ids, pm = ids + [eos], pm + [1]
        if pooling == "bos":
            pm = [1] * len(ids)  # bos pooling reads the first token; mark all so the text is never "empty"
        if not any(pm):
            raise ValueError(f"text {text[:60]!r} has no tokens left to pool after its instruction "
                             f"(max_len {max_len} too small?)")
        ids_out.append(ids)
        pm_out.append(pm)
    return ids_out, pm_out, truncated


def pad_batch(seqs, pad_id, side="right", extra=()):
    """Pad lists of ids to (B, S) tensors; returns ids, attention mask, and each `extra` list padded with 0."""
    S = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    am = torch.zeros((B, S), dtype=torch.long)
    ex = [torch.zeros((B, S), dtype=torch.long) for _ in extra]
    for i, s in enumerate(seqs):
        sl = slice(S - len(s), S) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        am[i, sl] = 1
        for t, e in zip(ex, extra):
            t[i, sl] = torch.tensor(e[i], dtype=torch.long)
    return (ids, am, *ex)


def embed_batch(model, input_ids, attention_mask, pool_mask, pooling, packed=True):
    hidden = packed_hidden_states(model, input_ids, attention_mask, packed=packed)
    return pool(hidden, attention_mask, pooling, pool_mask)


@torch.no_grad()
def encode_texts(model, tokenizer, texts, *, instruction=None, pooling="mean", max_len=512, batch_size=32,
                 device=None, padding_side="right", packed=True, show_progress_bar=False):
    """float32 (N, H) embeddings, in input order. Texts are sorted by length so batches pad little."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("encode: empty list of texts")
    instrs = instruction if isinstance(instruction, (list, tuple)) else [instruction or ""] * len(texts)
    ids, pms, _ = tokenize_with_instruction(tokenizer, texts, instrs, max_len, pooling)
    order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
    device = device or next(model.parameters()).device
    out = torch.empty(len(texts), dtype=torch.float32)
    it = range(0, len(order), batch_size)
    if show_progress_bar:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="encode")
    for s in it:
        sel = order[s:s + batch_size]
        b_ids, b_am, b_pm = pad_batch([ids[i] for i in sel], tokenizer.pad_token_id, padding_side,
                                      extra=([pms[i] for i in sel],))
        emb = embed_batch(model, b_ids.to(device), b_am.to(device), b_pm.to(device), pooling, packed)
        if out.dim() == 1:
            out = torch.empty(len(texts), emb.shape[-1], dtype=torch.float32)
        out[torch.tensor(sel)] = emb.float().cpu()
    return out
