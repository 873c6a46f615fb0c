"""Tokenising texts (with optional instructions) and turning them into pooled embeddings."""
import torch

from .chat import CHAT_SETTINGS, CHAT_WRAP_BY_BASE, CHAT_WRAPS  # noqa: F401  (applied here, listed in .chat)
from .modeling import packed_hidden_states
from .pooling import pool
from .refs import hub_id_of


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


class NoRoomError(ValueError):
    """An instruction (with the chat wrap's head) that leaves a max length no room for a text token."""


def tokenize_with_instruction(tokenizer, texts, instructions=None, max_len=512, pooling="mean", chat=None):
    """Training's tokenisation: :func:`tokenize_for_encoding`'s rule exactly (same string, same pooled tokens as
    ``encode`` and an exported sentence-transformers folder), with ``chat`` the wrap the run trains with.
    Returns (list of id lists, list of pool-mask lists, number truncated).
    """
    if not texts:
        raise ValueError("no texts to tokenize (empty batch)")
    instructions = instructions if instructions is not None else [""] * len(texts)
    ids, pms, stats = tokenize_for_encoding(tokenizer, texts, instructions, max_len, pooling, chat=chat)
    return ids, pms, stats["truncated"]


def pad_batch(seqs, pad_id, side="right", extra=()):
    """Pad lists of ids to (B, S) tensors; returns ids, attention mask, and each `extra` list padded with 0.
    ``side``: "right" or "left" (anything else is a ValueError)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side {side!r}: expected 'left' or 'right'")
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


# What a training run records (engine_encoder.json "text_format") for the rule below; runs without it predate it.
# /2: under a chat wrap, the prompt is the tokens the text shares with it (_prefix_len), so a head ending in a space
# no longer takes the text's first word out of the pooled tokens (/1 did; unwrapped texts read as in /1)
TEXT_FORMAT = "instruction-newline-eos/2"


def resolve_chat(setting, base_id, stage="supervised"):
    """The wrap a run trains with: ``none``, a name of :data:`CHAT_WRAPS`, or ``auto`` = what llm2vec does for
    this stage and base (its supervised stage wraps the bases of :data:`CHAT_WRAP_BY_BASE`; its SimCSE stage and
    MNTP never wrap). Returns a wrap name or None."""
    if setting in (None, "none"):
        return None
    if setting == "auto":
        return CHAT_WRAP_BY_BASE.get(base_id or "") if stage == "supervised" else None
    if setting not in CHAT_WRAPS:
        raise ValueError(f"unknown chat wrap {setting!r}; expected one of {list(CHAT_SETTINGS)}")
    return setting


def training_wrap(cfg):
    """The chat wrap a training run (a TrainConfig) applies to its texts, which its adapter records: none for MNTP,
    else ``contrastive.chat`` resolved for the stage and the base model (:func:`resolve_chat`)."""
    if cfg.stage not in ("simcse", "supervised"):
        return None
    return resolve_chat(cfg.contrastive.chat, hub_id_of(cfg.model.name_or_path), cfg.stage)


def instruction_prefix(instruction):
    """The string put before a text: the instruction, its trailing whitespace replaced by one newline.

    A newline is a token boundary in byte-level BPE (GPT-2 / Llama-3 / Qwen pre-tokenisers split it from a
    following word) and in SentencePiece vocabularies (a byte-fallback piece, never merged with a word), so the
    instruction's last token is the same alone and before any text: the prompt length that sentence-transformers
    counts on the instruction alone then ends exactly where the text starts. (A trailing space would fuse with the
    text's first word, ``ĠHi`` / ``▁Hi``, and that word would be counted as instruction.)
    """
    instruction = (instruction or "").rstrip()
    return instruction + "\n" if instruction else ""


def prompt_tokens(tokenizer, prefix, cache=None):
    """The tokens of ``prefix`` alone, with the tokenizer's special tokens, less a trailing special token: their
    count is sentence-transformers' prompt length (``include_prompt=False`` pooling). [] for no prefix."""
    if not prefix:
        return []
    if cache is not None and prefix in cache:
        return cache[prefix]
    ids = tokenizer(prefix, add_special_tokens=True)["input_ids"]
    if ids and ids[-1] in set(tokenizer.all_special_ids):
        ids = ids[:-1]
    if cache is not None:
        cache[prefix] = ids
    return ids


def _prefix_len(ids, prefix_ids, wrapped=False, tokenizer=None):
    """How many leading tokens of ``ids`` are not pooled.

    Unwrapped: the prefix's own token count, as sentence-transformers counts a prompt (on the prompt alone), at
    most the whole sequence. The prefix ends in a newline, a token boundary for any text that does not itself start
    with whitespace; one that does (``"\n\nHi"``, ``"   "``) can fuse its first whitespace with that newline
    (byte-level BPE: ``ĊĊ``), and that fused token is then not pooled, as in an exported folder (a whitespace-only
    text is its EOS, as ``""`` is).

    Under a chat wrap (``wrapped``; no export encodes one, so no prompt count to agree with; ``tokenizer`` given):
    the leading tokens of ``ids`` that hold prompt characters only: those it shares with the prefix alone, then any
    that still decode to a prefix of the prompt (a head's ``"\n\n"`` is one token alone, two before a word on
    byte-level BPE). A head that ends in a space (``"[INST] "``) tokenises alone with a lone space piece that the
    text's first word takes in (``▁Hi``): counted on the prefix alone, that word was never pooled, and a one-word
    text pooled only the tail and the EOS."""
    if not wrapped:
        return min(len(prefix_ids), len(ids))
    n = 0
    for a, b in zip(ids, prefix_ids):
        if a != b:
            break
        n += 1
    if n < len(prefix_ids):
        prompt = tokenizer.decode(prefix_ids, clean_up_tokenization_spaces=False)
        while n < len(ids) and prompt.startswith(tokenizer.decode(ids[:n + 1], clean_up_tokenization_spaces=False)):
            n += 1
    return n


def tokenize_for_encoding(tokenizer, texts, instructions, max_len=512, pooling="mean", chat=None,
                          skip_instruction=True, cache=None):
    """The engine's one rule for what the model reads and what is pooled (training, ``encode``, the export).

    Text ``t`` with instruction ``i`` and chat wrap (head, tail) is read as
    ``[special prefix] + tokens(head + instruction_prefix(i) + t + tail) + [EOS]``: truncated to ``max_len``
    tokens with the EOS kept last; pooled are every token after the prompt (head + instruction, counted as
    sentence-transformers counts a prompt, see :func:`instruction_prefix`), EOS included. So every text, ``""``
    too, has at least one pooled token (its EOS), and an exported folder (whose tokenizer appends EOS, whose
    prompts end in the newline) pools the same tokens. ``skip_instruction=False`` pools the instruction too;
    ``bos`` pooling keeps the first token. With a wrap the text is stripped first, as llm2vec does.
    An instruction that leaves no room for a text token is a ValueError.
    Returns (ids, pool masks, {"truncated": n, "empty": n}) ("empty": blank texts, embedded by their EOS).
    """
    cache = {} if cache is None else cache
    head, tail = CHAT_WRAPS[chat] if chat else ("", "")
    if chat:
        texts = [t.strip() for t in texts]
    prefixes = [head + instruction_prefix(i) for i in instructions]
    joint = [p + t + tail for p, t in zip(prefixes, texts)]
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token: the engine pools an appended EOS (set tokenizer.eos_token)")
    longest_prompt = max((len(prompt_tokens(tokenizer, p, cache)) for p in set(prefixes)), default=0)
    enc = _tokenize_head(tokenizer, joint, max_len + longest_prompt)
    ids_out, pm_out, stats = [], [], {"truncated": 0, "empty": 0}
    for ids, prefix, text in zip(enc, prefixes, texts):
        if ids and ids[-1] == eos:
            ids = ids[:-1]  # a tokenizer that appends EOS itself (an exported one): append it once
        n_prefix = (_prefix_len(ids, prompt_tokens(tokenizer, prefix, cache), bool(chat), tokenizer)
                    if skip_instruction else 0)
        if len(ids) > max_len - 1:
            stats["truncated"] += 1
            ids = ids[:max_len - 1]
        # no room: the prompt itself cut, or a text none of whose tokens fit (only its EOS would be pooled; a blank
        # text is its EOS by design)
        if n_prefix > len(ids) or (n_prefix == len(ids) and text.strip()):
            raise NoRoomError(f"instruction {prefix[:60]!r} takes {n_prefix} tokens: max_length {max_len} leaves no "
                              f"room for the text (raise max_length or shorten the instruction)")
        ids = ids + [eos]
        if not text.strip():
            stats["empty"] += 1
        pm = [1] * len(ids) if pooling == "bos" else [0] * n_prefix + [1] * (len(ids) - n_prefix)
        ids_out.append(ids)
        pm_out.append(pm)
    return ids_out, pm_out, stats


def _tokenize_head(tokenizer, texts, keep):
    """Each text's ids (with the special tokens) as the tokenizer gives them in full, cut after ``keep + 8`` tokens.

    The tokenizer cuts the ids after tokenising the whole text, so the ids kept are the full ids' first ones, bit
    for bit; the margin over what :func:`tokenize_for_encoding` keeps (``max_len - 1`` tokens, after any prompt of
    at most ``keep - max_len`` tokens) still tells a truncated text from one that fits, and counts the prompt the
    same. The full ids of a long document would be ~150 bytes of Python ints a token (1.3M characters: ~90 MB)."""
    return _head_ids(tokenizer, texts, keep + 8, add_special_tokens=True)


def _head_ids(tokenizer, texts, max_length, add_special_tokens):
    """The first ``max_length`` ids of each text's tokenisation (the special tokens counted), whatever the
    tokenizer's own ``truncation_side``."""
    side = getattr(tokenizer, "truncation_side", "right")
    try:
        tokenizer.truncation_side = "right"
        return tokenizer(texts, add_special_tokens=add_special_tokens, truncation=True,
                         max_length=max_length)["input_ids"]
    finally:
        tokenizer.truncation_side = side


def truncate_words(tokenizer, texts, max_tokens, stats=None):
    """llm2vec's ``doc_max_length``: cut each text to whole words until it has at most ``max_tokens`` tokens.
    Returns (texts, number cut). The lengths are counted ``chunk`` texts at a time: the token ids of 100k long
    documents at once would be several GB of Python ints.

    Departure from llm2vec: a text that whole words would empty (no space within its first ``max_tokens`` tokens:
    Chinese or Japanese text, a URL, code) keeps its first ``max_tokens`` tokens instead (decoded, at most
    ``max_tokens`` tokens again); llm2vec embeds it as ``""``. Those texts are counted (among the cut ones) in
    ``stats["doc_cut_to_tokens"]`` when ``stats`` (a dict) is given."""
    out, cut, by_tokens = list(texts), 0, 0
    for i, n in enumerate(_token_counts(tokenizer, out)):
        if n <= max_tokens:
            continue
        cut += 1
        words = out[i].split()
        while n > max_tokens and words:
            words = words[:min(int(len(words) * max_tokens / n), len(words) - 1)]
            n = len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"])
        if words:
            out[i] = " ".join(words)
        else:
            out[i] = _first_tokens(tokenizer, out[i], max_tokens)
            by_tokens += 1
    if stats is not None:
        stats["doc_cut_to_tokens"] = stats.get("doc_cut_to_tokens", 0) + by_tokens
    return out, cut


def _first_tokens(tokenizer, text, max_tokens):
    """The text of ``text``'s first tokens that re-tokenises to at most ``max_tokens`` tokens (a token that ends
    inside a character, a byte-level piece, is dropped)."""
    ids = _head_ids(tokenizer, [text], max_tokens, add_special_tokens=False)[0]
    for k in range(len(ids), 0, -1):
        head = tokenizer.decode(ids[:k], skip_special_tokens=True, clean_up_tokenization_spaces=False).rstrip("\ufffd")
        if head.strip() and len(tokenizer(head, add_special_tokens=False)["input_ids"]) <= max_tokens:
            return head
    return ""


def _token_counts(tokenizer, texts, chunk=1024):
    """The token count of each text (no special tokens), tokenised ``chunk`` texts at a time."""
    for a in range(0, len(texts), chunk):
        for ids in tokenizer(texts[a:a + chunk], add_special_tokens=False)["input_ids"]:
            yield len(ids)


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
