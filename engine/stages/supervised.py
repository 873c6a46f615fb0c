"""Supervised contrastive learning on (query, positive, hard negatives) with instructions.

Queries carry their instruction (attended, not pooled); documents carry none, except in E5's symmetric
datasets (``doc_instruction``, :func:`engine.data.e5_rows`) and in rows naming their own (a JSONL or ``hf:`` row's
``doc_instruction``). Candidates are
[positives (B), hard negatives (B*n)], gathered across ranks with gradient, so each query sees
world * B * (1 + n) candidates. With several sources, each global batch is drawn from one source.

With ``contrastive.loss: cosent | angle`` the stage trains on scored pairs instead (every STS-style pair with
its score, ``engine.losses``), with the same cross-rank batches and gradient caching.
"""

import os

import numpy as np
import torch

from .. import token_cache
from ..config import ConfigError
from ..data import (E5_INSTRUCTIONS, E5_SYMMETRIC, E5_WHOLE, DataError, DataStats, e5_files, iter_supervised,
                    read_scored_pairs, rows_rule_digest)
from ..encoding import pad_batch, tokenize_with_instruction
from .contrastive import ContrastiveStage, text_keys


class SupervisedStage(ContrastiveStage):
    name = "supervised"

    def load(self, sources, max_samples=0, seed=None):  # no data of this stage is ordered by a seed
        c = self.cfg.contrastive
        doc_len = c.doc_max_len or c.max_len
        if c.loss != "infonce":  # graded losses: every scored pair, scores kept
            self.check_room([c.instruction], min(c.max_len, doc_len), "contrastive.max_len / doc_max_len")
            pairs, stats = read_scored_pairs(sources, max_samples)
            if c.loss == "angle" and c.angle_weights[1] > 0 and pairs and \
                    not any(p[2] >= c.positive_min_score for p in pairs):
                lo, hi = min(p[2] for p in pairs), max(p[2] for p in pairs)
                raise ConfigError(f"contrastive.positive_min_score {c.positive_min_score}: no pair of {sources} "
                                  f"scores that high (scores {lo:g} to {hi:g}), so AnglE's in-batch-negative term "
                                  f"(angle_weights[1] = {c.angle_weights[1]:g}) would be 0 at every step; set it on "
                                  f"the data's scale, or angle_weights[1] = 0")
            return pairs, stats, None
        queries, docs = [c.instruction], []  # the default instruction, and E5's own per dataset
        for src in sources:
            if os.path.isdir(src):
                for name in e5_files(src):
                    for half in E5_WHOLE.get(name, (name,)):
                        queries.append(E5_INSTRUCTIONS[half])
                        if half in E5_SYMMETRIC:
                            docs.append(E5_INSTRUCTIONS[half])
        self.check_room(queries, c.max_len, "contrastive.max_len")
        self.check_room(docs, doc_len, "contrastive.doc_max_len (E5's symmetric datasets' documents)")
        instruction = self.cfg.contrastive.instruction
        need_negatives = self.cfg.contrastive.num_hard_negatives > 0  # 0: (query, positive) pairs are examples too

        def build(writer, progress):  # examples from the item cache (engine.token_cache), read lazily per batch
            stats = DataStats(not_counted=["duplicates", "truncated"])  # cut at collate, counted per step
            q_seen, d_seen = set(), set()
            for e in iter_supervised(sources, stats, max_samples, instruction, need_negatives):
                writer.add(e, group=e["source"])
                q_seen.add(e["instruction"])
                d_seen.add(e.get("doc_instruction", ""))
            if not stats.kept:
                hint = ("; rows without a hard negative train as (query, positive) pairs with "
                        "contrastive.num_hard_negatives=0") if stats.no_negative else ""
                raise DataError(f"no usable supervised examples in {sources} ({stats.summary()}){hint}")
            return dict(stats.to_cache(), row_instructions={"query": _longest(q_seen), "doc": _longest(d_seen)})

        settings = {"stage": "supervised", "max_samples": max_samples, "instruction": instruction,
                    "need_negatives": need_negatives, "rows": rows_rule_digest(), "meta": "row_instructions"}
        ex, meta = token_cache.cached_items("json", None, sources, settings, build)
        # The rows' own instructions (JSONL ``instruction`` / ``doc_instruction``), checked now on every rank alike:
        # met at collate, one row's too-long instruction would stop only the rank whose batch draws it, and the
        # others would wait in the step's collectives until their timeout.
        rows = meta["stats"]["row_instructions"]
        self.check_room(rows["query"], c.max_len, "contrastive.max_len (a row's own instruction)")
        self.check_room(rows["doc"], doc_len, "contrastive.doc_max_len (a row's own document instruction)")
        groups = ex.groups if self.cfg.contrastive.source_homogeneous_batches else None
        if groups is not None and len(meta["groups"]) == 1:
            groups = None
        stats = DataStats.from_cache(meta["stats"], not_counted=["duplicates", "truncated"])  # cut at collate
        if need_negatives:
            stats.count_repeated_negatives(self.cfg.contrastive.num_hard_negatives)
        return ex, stats, groups

    def batch_losses(self, engine, items, max_batches, device=None, units=False):
        """The held-out loss's micro-batches taken from each source in turn (batch b from the (b mod G)-th of the G
        sources, each batch from one source, as training draws them). In file order the first ``eval_batches``
        micro-batches of an E5 folder or of several files all came from the first one."""
        return super().batch_losses(engine, by_source(items, max_batches, self.cfg.micro_batch_size), max_batches,
                                    device, units)

    def collate(self, items, generator):
        if not items:
            raise ValueError("empty batch")
        c = self.cfg.contrastive
        if c.loss != "infonce":
            return self._collate_scored(items)
        n = c.num_hard_negatives
        doc_len = c.doc_max_len or c.max_len
        q_ids, q_pm, t1 = tokenize_with_instruction(self.tok, [e["query"] for e in items],
                                                    [e["instruction"] for e in items], c.max_len, c.pooling, self.chat)
        docs = [e["positive"] for e in items]
        for k in range(n):
            docs += [e["negatives"][k % len(e["negatives"])] for e in items]
        d_instr = [e.get("doc_instruction", "") for e in items] * (1 + n)  # E5's symmetric tasks: documents too
        d_ids, d_pm, t2 = tokenize_with_instruction(self.tok, docs, d_instr, doc_len, c.pooling, self.chat)
        ids, am, pm = pad_batch(q_ids + d_ids, self.tok.pad_token_id, "right", extra=(q_pm + d_pm,))
        batch = self.host_layout({"input_ids": ids, "attention_mask": am, "pool_mask": pm, "n_queries": len(items),
                                  "truncated": t1 + t2})
        if self.masking:  # candidates: positives, then negatives; query i's positive is candidate i
            d_keys = text_keys(d_ids, d_pm)
            batch["q_keys"], batch["d_keys"] = d_keys[:len(items)].clone(), d_keys
        return batch


    def _collate_scored(self, items):
        """(sentence1, sentence2, score) pairs: both sides carry the instruction (a symmetric task), scores kept."""
        c = self.cfg.contrastive
        instr = [c.instruction] * len(items)
        a_ids, a_pm, t1 = tokenize_with_instruction(self.tok, [p[0] for p in items], instr, c.max_len, c.pooling,
                                                    self.chat)
        b_ids, b_pm, t2 = tokenize_with_instruction(self.tok, [p[1] for p in items], instr, c.doc_max_len or c.max_len,
                                                    c.pooling, self.chat)
        ids, am, pm = pad_batch(a_ids + b_ids, self.tok.pad_token_id, "right", extra=(a_pm + b_pm,))
        return self.host_layout({"input_ids": ids, "attention_mask": am, "pool_mask": pm, "n_queries": len(items),
                                 "scores": torch.tensor([float(p[2]) for p in items], dtype=torch.float32),
                                 "truncated": t1 + t2})


ROW_INSTRUCTIONS_KEPT = 4096


def _longest(instructions):
    """The distinct instructions an item-cache entry keeps for the load-time room check: all of them, or, past
    ``ROW_INSTRUCTIONS_KEPT`` (rows that each carry their own), the longest by characters (a row whose instruction
    is shorter in characters but longer in tokens is still met at collate)."""
    return sorted(instructions, key=lambda t: (-len(t), t))[:ROW_INSTRUCTIONS_KEPT]


def by_source(items, max_batches, mb):
    """The first ``max_batches`` micro-batches of ``mb`` items, batch b from source b mod G (``items.groups``: a
    token-cache entry's group per item; items without groups, or of one group, as they are), each source's items in
    file order; a source out of items leaves its turns to the others."""
    groups = getattr(items, "groups", None)
    if groups is None or len(groups.names) < 2:
        return items
    idx = np.asarray(groups.idx)
    queues = [np.flatnonzero(idx == g)[:max_batches * mb].tolist() for g in range(len(groups.names))]
    order, turn = [], 0
    while len(order) < max_batches * mb and any(len(q) >= mb for q in queues):
        q = queues[turn % len(queues)]
        if len(q) >= mb:
            order += q[:mb]
            del q[:mb]
        turn += 1
    return [items[i] for i in order] if order else items
