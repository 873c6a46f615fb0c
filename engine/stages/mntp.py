"""Masked next-token prediction (MNTP).

Tokens are masked as in BERT (probability ``mask_prob``; "bert" scheme: 80% mask token, 10% random,
10% unchanged; "all" scheme: always the mask token); special tokens and position 0 are never masked.
The label of masked token i is placed at position i-1, so token i is predicted from the hidden state
at i-1, as the causal LM head was trained to do. Only labelled rows reach the LM head, through
``llm2vec_kernels.masked_cross_entropy`` (no full logits).
"""
import copy

import torch

import llm2vec_kernels

from .. import data, token_cache
from ..data import BlockChunker, DataError, DataStats, SentenceRows, iter_texts, seed_orders, tokenized_batches
from ..encoding import pad_batch
from ..modeling import lm_head_of, packed_hidden_states, packing
from .base import Stage

IGNORE = -100


class _LMHeadWithLoss(torch.nn.Linear):
    """The model's own LM head, able to return the fused masked-token loss instead of logits.

    Calling the head module (rather than reading its weight elsewhere) keeps DeepSpeed ZeRO-3's
    gather hooks in charge of the weight for forward and backward.
    """

    def forward(self, hidden, labels=None):
        if labels is None:
            return super().forward(hidden)
        # every row given here is labelled (MNTP selected them), which spares the kernel its nonzero()
        return llm2vec_kernels.masked_cross_entropy(hidden, self.weight, labels, ignore_index=IGNORE,
                                            softcap=self.llm2vec_softcap, z_loss=self.llm2vec_z_loss,
                                            all_labelled=True)


def resolve_mask_token(tokenizer, spec):
    if spec == "eos":
        return tokenizer.eos_token_id, False
    if spec == "<mask>" and tokenizer.mask_token_id is None:
        tokenizer.add_special_tokens({"mask_token": "<mask>"})
        return tokenizer.mask_token_id, True
    if spec == "<mask>":
        return tokenizer.mask_token_id, False
    # As llm2vec (run_mntp.py): the token *named* spec, by vocabulary lookup. Tokenising "_" can differ: a
    # SentencePiece tokenizer (Llama-2, Mistral) reads it as the word-initial piece "▁_", not the piece "_".
    vid = tokenizer.convert_tokens_to_ids(spec)
    if vid is not None and (vid != tokenizer.unk_token_id or spec == tokenizer.unk_token):
        return vid, False
    ids = tokenizer(spec, add_special_tokens=False)["input_ids"]  # not a vocabulary entry: its one-token encoding
    if len(ids) != 1:
        raise DataError(f"mntp.mask_token {spec!r} is {len(ids)} tokens for this tokenizer; it must be one token")
    return ids[0], False


def mask_tokens(input_ids, attention_mask, special_ids, mask_id, vocab_size, prob, scheme, generator):
    """(B, S) ids -> (masked ids, shifted labels). Labels: token i's target sits at position i-1."""
    ids = input_ids.clone()
    special = torch.isin(ids, torch.tensor(sorted(special_ids), dtype=torch.long)) | (attention_mask == 0)
    special[:, 0] = True  # nothing precedes position 0 to predict it from
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & ~special
    target = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    if scheme == "all":
        ids[chosen] = mask_id
    else:
        r = torch.rand(ids.shape, generator=generator)
        to_mask = chosen & (r < 0.8)
        to_rand = chosen & (r >= 0.8) & (r < 0.9)
        ids[to_mask] = mask_id
        ids[to_rand] = torch.randint(0, vocab_size, (int(to_rand.sum()),), generator=generator)
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = target[:, 1:]
    return ids, labels


class MNTPStage(Stage):
    name = "mntp"

    def __init__(self, cfg, tokenizer):
        if cfg.mntp.mask_token == "<mask>" and tokenizer.mask_token_id is None:
            # The added token is MNTP's alone, on a copy: the adapters keep the base tokenizer, whose every id has
            # an embedding row in the base (they carry LoRA weights only, not the added row).
            tokenizer = copy.deepcopy(tokenizer)
        super().__init__(cfg, tokenizer)
        self.mask_id, self.added_token = resolve_mask_token(tokenizer, cfg.mntp.mask_token)
        self.special_ids = set(tokenizer.all_special_ids) | {tokenizer.pad_token_id}
        self.special_ids.discard(None)
        self.vocab_size = len(tokenizer)

    def prepare_model(self, model):
        if self.added_token and len(self.tok) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(self.tok))  # grown only: Qwen2's padded table already has the row
        head = lm_head_of(model)
        if type(head) is not torch.nn.Linear or head.bias is not None:
            raise ValueError(f"MNTP needs a bias-free nn.Linear LM head, got {type(head).__name__}")
        head.__class__ = _LMHeadWithLoss
        head.llm2vec_softcap = getattr(model.config, "final_logit_softcapping", None)
        head.llm2vec_z_loss = self.cfg.mntp.z_loss
        return model

    def load(self, sources, max_samples=0, seed=None):
        """The blocks (:class:`engine.data.BlockChunker`; one row per document, :class:`engine.data.SentenceRows`,
        under ``mntp.pack: false``) from the token cache (:mod:`engine.token_cache`): tokenised once, streamed, read
        lazily per batch."""
        seed = self.cfg.seed if seed is None else seed
        max_seq_len, pack = self.cfg.max_seq_len, self.cfg.mntp.pack

        def build(writer, progress):
            stats = DataStats()
            chunker = BlockChunker(self.tok, max_seq_len) if pack else SentenceRows(self.tok, max_seq_len, stats)
            texts = iter_texts(sources, stats, max_samples, seed=seed)
            for ids in tokenized_batches(texts, self.tok, progress, token_cache.source_bytes(sources)):
                for block in chunker.feed(ids):
                    writer.add(block)
            for block in chunker.finish():
                writer.add(block)
            if not stats.kept:
                raise DataError(f"no non-empty text in {sources} ({stats.summary()})")
            stats.sources["blocks" if pack else "rows"] = writer.n
            return stats.to_cache()

        settings = {"stage": "mntp", "read_rules": data.READ_RULES, "max_seq_len": max_seq_len,
                    "max_samples": max_samples}
        if seed_orders(sources):  # a corpus's blocks are the same under every seed: one cache entry for all
            settings["seed"] = seed
        if not pack:  # packed caches keep their key
            settings["pack"] = False
        blocks, meta = token_cache.cached_items("tokens", self.tok, sources, settings, build)
        return blocks, DataStats.from_cache(meta["stats"], not_counted=["duplicates"]), None

    def collate(self, items, generator):
        if not items:
            raise ValueError("empty batch")
        ids, am = pad_batch(items, self.tok.pad_token_id, "right")
        m = self.cfg.mntp
        ids, labels = mask_tokens(ids, am, self.special_ids, self.mask_id, self.vocab_size, m.mask_prob, m.scheme,
                                  generator)
        # Host-side: the packed layout and the labelled rows, so the forward and backward never sync.
        sel = (labels != IGNORE).flatten().nonzero().squeeze(1)
        return {"input_ids": ids, "attention_mask": am, "labels": labels, "layout": packing(am), "label_rows": sel,
                "tokens": int(am.sum())}

    def loss_units(self, batch):
        """The micro-batch's masked tokens: its loss is their mean, and a step's is the mean over the global batch's."""
        return int(batch["label_rows"].numel())

    def loss(self, module, batch):
        hidden = packed_hidden_states(module.model, batch["input_ids"], batch["attention_mask"],
                                      layout=batch.get("layout"))
        labels = batch["labels"]
        sel = batch.get("label_rows")
        if sel is None:  # a caller without collate's host-side rows
            sel = (labels != IGNORE).flatten().nonzero().squeeze(1)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, sel)  # only masked rows reach the head
        y = labels.flatten().index_select(0, sel)
        loss = lm_head_of(module.model)(h, labels=y)
        tokens = batch.get("tokens")
        tokens = batch["attention_mask"].sum() if tokens is None else tokens
        return loss, {"tokens": tokens, "predicted": sel.numel()}
