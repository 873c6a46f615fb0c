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
    """Training's tokenisation: :func:`tokenize_for_encoding`'s rule exactly, so that a trained encoder pools in
    training the tokens that ``encode`` and an exported sentence-transformers folder pool (the tokens after the
    instruction's prompt length, see :func:`prompt_token_count`); a text left with nothing to pool is an error
    here rather than pooled whole. Returns (list of id lists, list of pool-mask lists, number truncated).
    """
    if not texts:
        raise ValueError("no texts to tokenize (empty batch)")
    instructions = instructions if instructions is not None else [""] * len(texts)
    ids, pms, stats = tokenize_for_encoding(tokenizer, texts, instructions, max_len, pooling, strict=True)
    return ids, pms, stats["truncated"]


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


def embed_batch(model, input_ids, attention_mask, pool_mask, pooling, packed=True, layout=None):
    """Pooled embeddings. ``layout`` (modeling.packing of the mask, built on the host by collate, which has also
    checked that every text has tokens to pool) makes this free of host syncs."""
    hidden = packed_hidden_states(model, input_ids, attention_mask, packed=packed, layout=layout)
    return pool(hidden, attention_mask, pooling, pool_mask, check=layout is None)


# llm2vec's chat wrapping, applied to "instruction text" for the families whose published supervised
# checkpoints were trained with it (keyed, as llm2vec does, on the base model's hub id). (prefix, suffix).
CHAT_WRAPS = {
    "llama3": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
    "inst": ("[INST] ", " [/INST]"),
    "gemma2": ("<bos><start_of_turn>user\n", "<end_of_turn>"),
    "qwen2": ("<|im_start|>user\n", "<|im_end|>"),
}
CHAT_WRAP_BY_BASE = {
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama3",
    "mistralai/Mistral-7B-Instruct-v0.2": "inst",
    "meta-llama/Llama-2-7b-chat-hf": "inst",
    "google/gemma-2-9b-it": "gemma2",
    "Qwen/Qwen2-1.5B-Instruct": "qwen2",
    "Qwen/Qwen2-7B-Instruct": "qwen2",
}


def instruction_prefix(instruction):
    """The string put before a text: the instruction, with one space added unless it ends in whitespace."""
    instruction = instruction or ""
    return instruction if (not instruction or instruction[-1].isspace()) else instruction + " "


def prompt_token_count(tokenizer, prefix, cache=None):
    """How many leading tokens of ``prefix + text`` belong to the prefix: the token count of ``prefix`` alone
    (with the tokenizer's special tokens), less a trailing special token.

    This is sentence-transformers' rule for prompts (``include_prompt=False`` pooling), used here too so an
    exported folder pools the same tokens. Where the prefix's trailing space fuses with the text's first word
    (BPE's ``ĠA``), that first token counts as prefix: it is attended, not pooled, in both.
    """
    if not prefix:
        return None
    if cache is not None and prefix in cache:
        return cache[prefix]
    ids = tokenizer(prefix, add_special_tokens=True)["input_ids"]
    n = len(ids)
    if n and ids[-1] in set(tokenizer.all_special_ids):
        n -= 1
    if cache is not None:
        cache[prefix] = n
    return n


def tokenize_for_encoding(tokenizer, texts, instructions, max_len=512, pooling="mean", chat=None,
                          skip_instruction=True, cache=None, strict=False):
    """Batched tokenisation for ``encode`` and for training (``strict``: a text with nothing left to pool is an
    error): one tokenizer call for the whole list.

    Each text becomes ``wrap(instruction_prefix(instruction) + text)`` (``wrap`` is the optional chat
    wrapping), tokenised jointly; the pool mask covers the tokens after the prefix (``prompt_token_count``),
    or everything with ``skip_instruction=False``. eos/last pooling appends and pools EOS. A text with
    nothing left to pool (``""``, or truncated away behind its instruction) pools all its tokens, and an
    empty sequence is the EOS token alone, so every input gets an embedding.
    Returns (ids, pool masks, {"truncated": n, "empty": n}).
    """
    cache = {} if cache is None else cache
    head, tail = CHAT_WRAPS[chat] if chat else ("", "")
    prefixes = [head + instruction_prefix(i) for i in instructions]
    joint = [p + t + tail for p, t in zip(prefixes, texts)]
    eos = tokenizer.eos_token_id if pooling in ("eos", "last") else None
    budget = max_len - (1 if eos is not None else 0)
    enc = tokenizer(joint, add_special_tokens=True)["input_ids"]
    ids_out, pm_out, stats = [], [], {"truncated": 0, "empty": 0}
    for ids, prefix, text in zip(enc, prefixes, texts):
        n_prefix = (prompt_token_count(tokenizer, prefix, cache) or 0) if skip_instruction else 0
        if eos is not None and ids and ids[-1] == eos:
            ids = ids[:-1]  # a tokenizer that appends EOS itself (an export with eos pooling): append it once
        if len(ids) > budget:
            stats["truncated"] += 1
            ids = ids[:budget]
        pm = [0] * min(n_prefix, len(ids)) + [1] * max(len(ids) - n_prefix, 0)
        if eos is not None:
            ids, pm = ids + [eos], pm + [1]
        if not ids:
            ids, pm = [tokenizer.eos_token_id], [1]
        if pooling == "bos":
            pm = [1] * len(ids)
        if not any(pm):
            if strict:
                raise ValueError(f"text {text[:60]!r} has no tokens left to pool after its instruction "
                                 f"(max_len {max_len} too small?)")
            stats["empty"] += 1
            pm = [1] * len(ids)
        ids_out.append(ids)
        pm_out.append(pm)
    return ids_out, pm_out, stats


def truncate_words(tokenizer, texts, max_tokens):
    """llm2vec's ``doc_max_length``: cut each text to whole words until it has at most ``max_tokens`` tokens.
    Returns (texts, number cut)."""
    out, cut = list(texts), 0
    lengths = [len(x) for x in tokenizer(out, add_special_tokens=False)["input_ids"]] if out else []
    for i, n in enumerate(lengths):
        if n <= max_tokens:
            continue
        cut += 1
        words = out[i].split()
        while n > max_tokens and words:
            words = words[:min(int(len(words) * max_tokens / n), len(words) - 1)]
            n = len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"])
        out[i] = " ".join(words)
    return out, cut


@torch.no_grad()
def encode_texts(model, tokenizer, texts, *, instruction=None, pooling="mean", max_len=512, batch_size=32,
                 device=None, padding_side="right", packed=True, show_progress_bar=False, chat=None,
                 skip_instruction=True, stats=None, chunk_size=None):
    """float32 (N, H) embeddings, in input order.

    Texts are ordered by character length (longest first) and streamed: a chunk of ``chunk_size`` texts
    (default 64 batches) is tokenised in one call, embedded batch by batch, then the next. ``stats`` (a dict)
    receives the counts of truncated and empty-after-instruction texts.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("encode: empty list of texts")
    instrs = list(instruction) if isinstance(instruction, (list, tuple)) else [instruction or ""] * len(texts)
    if len(instrs) != len(texts):
        raise ValueError(f"encode: {len(instrs)} instructions for {len(texts)} texts")
    order = sorted(range(len(texts)), key=lambda i: -(len(texts[i]) + len(instrs[i] or "")))
    device = device or next(model.parameters()).device
    chunk_size = chunk_size or batch_size * 64
    stats = {} if stats is None else stats
    stats.setdefault("truncated", 0)
    stats.setdefault("empty", 0)
    out, cache = None, {}
    bar = None
    if show_progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc="encode", unit="text")
    for c in range(0, len(order), chunk_size):
        sel_chunk = order[c:c + chunk_size]
        ids, pms, st = tokenize_for_encoding(tokenizer, [texts[i] for i in sel_chunk], [instrs[i] for i in sel_chunk],
                                             max_len, pooling, chat, skip_instruction, cache)
        for k, v in st.items():
            stats[k] += v
        local = sorted(range(len(sel_chunk)), key=lambda j: -len(ids[j]))
        for s in range(0, len(local), batch_size):
            sel = local[s:s + batch_size]
            b_ids, b_am, b_pm = pad_batch([ids[j] for j in sel], tokenizer.pad_token_id, padding_side,
                                          extra=([pms[j] for j in sel],))
            emb = embed_batch(model, b_ids.to(device), b_am.to(device), b_pm.to(device), pooling, packed)
            if out is None:
                out = torch.empty(len(texts), emb.shape[-1], dtype=torch.float32)
            out[torch.tensor([sel_chunk[j] for j in sel])] = emb.float().cpu()
            if bar is not None:
                bar.update(len(sel))
    if bar is not None:
        bar.close()
    return out
