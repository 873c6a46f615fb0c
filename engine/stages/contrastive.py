"""Shared machinery of the contrastive stages: embedding, the loss, and gradient caching.

Gradient caching (``contrastive.grad_cache_chunk > 0``) makes the contrastive batch independent of
activation memory: (1) embed the micro-batch in chunks without grad, saving the RNG state before
each chunk; (2) compute the loss (cross-rank negatives included) on the detached embeddings and get
d loss / d embedding; (3) re-embed each chunk with grad, replaying its RNG state so dropout masks
are identical (SimCSE relies on dropout), and back-propagate the cached embedding gradients
through it as the surrogate loss sum(e * g).

The loss is InfoNCE (``llm2vec_kernels.contrastive_loss``) or, for scored pairs (``contrastive.loss: cosent | angle``),
one of ``engine.losses``; queries are then the pairs' first sentences, candidates their second ones.

In-batch false negatives (``contrastive.mask_false_negatives``, InfoNCE only, off by default as in llm2vec): collate
gives every text a key, :func:`text_key`, and the batch carries ``q_keys`` (B,) (the key of each query's positive)
and ``d_keys`` (M,) (each candidate's). Two texts are the same text when the model reads the same tokens where it
pools: the ids their pool mask marks (the text, the chat wrap's tail and EOS, as truncated to the max length; the
instruction and the chat head are attended but not pooled, so a passage under two instructions is one text where
the tokenizer splits it alike after either (not so SentencePiece's leading "▁": that copy stays a negative); with
``bos`` pooling the mask covers the whole sequence, instruction included). A candidate other than query i's positive
with that positive's key is left out of query i's InfoNCE denominator, across ranks too, in training, in gradient
caching and in the held-out loss; each micro-step's metrics count such (query, candidate) pairs of this rank's
queries (``false_negatives``).
"""
import hashlib

import numpy as np
import torch

import llm2vec_kernels

from .. import losses
from ..bidirectional import dispatch_as_if_backward
from ..config import ConfigError, false_negatives_error
from ..encoding import NoRoomError, embed_batch, tokenize_for_encoding, training_wrap
from ..modeling import packing
from .base import Stage


def _rng_state():
    st = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st):
    torch.set_rng_state(st["cpu"])
    if "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"])


def text_key(ids, pool_mask):
    """The 63-bit key of one tokenised text: the first 8 bytes of BLAKE2b over its pooled ids (``ids[pool_mask ==
    1]``, little-endian int64), shifted right once so that it is a non-negative int64. Equal pooled ids give equal
    keys on every rank and in every process (no salted hash); two different texts share a key with probability
    2^-63, which would drop one real negative from one step's loss."""
    kept = np.asarray(ids, dtype="<i8")[np.asarray(pool_mask, dtype=bool)]
    return int.from_bytes(hashlib.blake2b(kept.tobytes(), digest_size=8).digest(), "little") >> 1


def text_keys(ids, pool_masks):
    """(len(ids),) int64 tensor: :func:`text_key` of each tokenised text."""
    return torch.tensor([text_key(i, m) for i, m in zip(ids, pool_masks)], dtype=torch.int64)


def chunks(batch, chunk):
    """[(start, end, sub-batch)]: ``batch``'s texts ``chunk`` at a time (gradient caching's pieces), each an
    ``"embed"`` micro-batch with its packed layout when collate built them for this chunk size."""
    n = batch["input_ids"].shape[0]
    spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    layouts = batch.get("chunk_layouts")
    if layouts is not None and len(layouts) != len(spans):
        layouts = None  # built for another chunk size
    return [(s, e, {"mode": "embed", "input_ids": batch["input_ids"][s:e],
                    "attention_mask": batch["attention_mask"][s:e], "pool_mask": batch["pool_mask"][s:e],
                    "layout": layouts[i] if layouts else None}) for i, (s, e) in enumerate(spans)]


class ContrastiveStage(Stage):
    """Subclasses build batches with all texts in one (B_total, S) tensor; the first n_queries are queries.
    Every text (query, positive, negatives) is read in the chat wrap the run trains with (``self.chat``)."""

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        refused = false_negatives_error(cfg.contrastive)  # as validate says it: a config set by hand too
        if refused:
            raise ConfigError(refused)

    @property
    def masking(self):
        """Whether collate keys the texts and the loss leaves false negatives out (``mask_false_negatives``)."""
        return bool(self.cfg.contrastive.mask_false_negatives)

    @property
    def chat(self):
        if not hasattr(self, "_chat"):
            self._chat = training_wrap(self.cfg)
        return self._chat

    def check_room(self, instructions, max_len, what):
        """Refuse, before any step, an instruction that leaves ``max_len`` no room for a text token (with the chat
        wrap's head): at collate time it would stop the run at the first batch that draws it, however late."""
        for instruction in sorted(set(instructions)):
            try:
                tokenize_for_encoding(self.tok, ["x"], [instruction], max_len, self.cfg.contrastive.pooling,
                                      chat=self.chat)
            except NoRoomError as e:
                raise ConfigError(f"{what}: {e}") from None

    def embed(self, module, input_ids, attention_mask, pool_mask, layout=None):
        return embed_batch(module.model, input_ids, attention_mask, pool_mask, self.cfg.contrastive.pooling,
                           layout=layout)

    def host_layout(self, batch):
        """Add what the forward would otherwise read back from the device: the packed layout of the whole
        batch and of each gradient-caching chunk, and the token count (collate runs this on CPU tensors)."""
        am = batch["attention_mask"]
        batch["layout"] = packing(am)
        chunk = self.cfg.contrastive.grad_cache_chunk
        if chunk > 0:
            batch["chunk_layouts"] = [packing(am[s:s + chunk]) for s in range(0, am.shape[0], chunk)]
        batch["tokens"] = int(am.sum())
        return batch

    def split(self, emb, batch):
        nq = int(batch["n_queries"])  # a python int from collate
        return emb[:nq], emb[nq:]

    evaluating = False  # Stage.evaluate: every rank scores the same batches, so nothing is gathered

    def contrastive(self, q, d, batch=None):
        """The loss of queries q against candidates d (the batch gives scores, and keys when masking)."""
        return self.contrastive_counted(q, d, batch)[0]

    def contrastive_counted(self, q, d, batch=None):
        """(loss, metrics): the metrics hold ``false_negatives``, this rank's count of (query, candidate) pairs left
        out of the loss (an int64 0-dim tensor on the loss's device), when the batch carries keys."""
        c = self.cfg.contrastive
        gather = c.gather_across_ranks and not self.evaluating
        if c.loss == "cosent":
            return losses.cosent_loss(q, d, batch["scores"], scale=c.loss_scale, gather_across_ranks=gather), {}
        if c.loss == "angle":
            return losses.angle_loss(q, d, batch["scores"], scale=c.loss_scale, weights=tuple(c.angle_weights),
                                     positive_min_score=c.positive_min_score, gather_across_ranks=gather), {}
        if batch is None or batch.get("q_keys") is None:
            return llm2vec_kernels.contrastive_loss(q, d, temperature=c.temperature, gather_across_ranks=gather), {}
        loss, masked = llm2vec_kernels.contrastive_loss(q, d, temperature=c.temperature, gather_across_ranks=gather,
                                                        q_keys=batch["q_keys"], d_keys=batch["d_keys"],
                                                        return_masked=True)
        return loss, {"false_negatives": masked}

    def evaluate(self, engine, items, world, rank, max_batches):
        """The held-out loss without the cross-rank gather: every rank evaluates the same batches, and gathering W
        copies of one batch would repeat each candidate W times (the loss read log W too high). (A SimCSE loss
        read in eval mode has no dropout, so its two views are the same text: it is not the training objective.)"""
        self.evaluating = True
        try:
            return super().evaluate(engine, items, world, rank, max_batches)
        finally:
            self.evaluating = False

    def loss(self, module, batch):
        if batch.get("mode") == "embed":
            return self.embed(module, batch["input_ids"], batch["attention_mask"], batch["pool_mask"],
                              batch.get("layout")), {}
        chunk = self.cfg.contrastive.grad_cache_chunk
        if chunk > 0 and not torch.is_grad_enabled():  # a held-out batch: embedded chunk by chunk, as in training
            emb = torch.cat([self.embed(module, sub["input_ids"], sub["attention_mask"], sub["pool_mask"],
                                        sub["layout"]) for _, _, sub in chunks(batch, chunk)])
        else:
            emb = self.embed(module, batch["input_ids"], batch["attention_mask"], batch["pool_mask"],
                             batch.get("layout"))
        q, d = self.split(emb, batch)
        tokens = batch.get("tokens")
        loss, counts = self.contrastive_counted(q, d, batch)
        return loss, {"tokens": batch["attention_mask"].sum() if tokens is None else tokens, **counts}

    def train_micro_step(self, engine, batch, weight=1.0):
        if weight != 1.0:
            raise ValueError("a contrastive micro-batch has no loss_units: its weight is 1")
        chunk = self.cfg.contrastive.grad_cache_chunk
        if chunk <= 0:
            return super().train_micro_step(engine, batch)
        parts = chunks(batch, chunk)
        states, embs = [], []
        with torch.no_grad(), dispatch_as_if_backward(engine.module.model):  # the replay's attention kernels
            for _, _, sub in parts:
                states.append(_rng_state())
                embs.append(engine(sub)[0])
        after = _rng_state()
        # The loss and its gradients in fp32: an fp16 run's loss scale applies only at engine.backward below, so
        # fp16 embedding gradients (about 1 / (batch x temperature x norm)) would be held unscaled, flushed to zero
        # when small, and an fp16 surrogate's gradient (the loss scale itself, 2^16 at first) would overflow
        emb = torch.cat(embs).float().detach().requires_grad_(True)
        q, d = self.split(emb, batch)
        loss, counts = self.contrastive_counted(q, d, batch)
        loss.backward()
        cached = emb.grad
        for (s, e, sub), st in zip(parts, states):
            _set_rng_state(st)
            e_chunk = engine(sub)[0]
            engine.backward((e_chunk.float() * cached[s:e]).sum())
        _set_rng_state(after)
        tokens = batch.get("tokens")
        return loss.detach(), {"tokens": batch["attention_mask"].sum() if tokens is None else tokens, **counts}
