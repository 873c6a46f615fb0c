"""Unsupervised SimCSE: every sentence passes twice under dropout (attention-probability dropout,
``model.attention_dropout``, 0.3 in the shipped SimCSE configs as in LLM2Vec (the key's default is 0), plus LoRA
dropout); the two views are each other's positive and the other sentences of the batch (across ranks too) are the
negatives. A run with neither dropout is warned about (``engine.config.dropout_warning``). With
``contrastive.mask_false_negatives`` two sentences that are the same once cut to ``max_len`` (repeated texts are
dropped at load) are no negatives of each other's query in one (gathered) batch (:mod:`engine.stages.contrastive`)."""

from .. import data, token_cache
from ..data import DataError, DataStats, iter_texts, seed_orders
from ..encoding import pad_batch, tokenize_with_instruction
from .contrastive import ContrastiveStage, text_keys


class SimCSEStage(ContrastiveStage):
    name = "simcse"

    def load(self, sources, max_samples=0, seed=None):
        """The de-duplicated sentences, from the item cache (:mod:`engine.token_cache`), read lazily per batch."""
        seed = self.cfg.seed if seed is None else seed
        self.check_room([self.cfg.contrastive.instruction], self.cfg.contrastive.max_len, "contrastive.max_len")

        def build(writer, progress):
            stats = DataStats(not_counted=["truncated"])  # texts are cut at collate, counted per step
            for text in iter_texts(sources, stats, max_samples, dedup=True, seed=seed):
                writer.add(text)
            if not stats.kept:
                raise DataError(f"no non-empty text in {sources} ({stats.summary()})")
            return stats.to_cache()

        settings = {"stage": "simcse", "read_rules": data.READ_RULES, "max_samples": max_samples, "dedup": True}
        if seed_orders(sources):  # a corpus's sentences are the same under every seed: one cache entry for all
            settings["seed"] = seed
        texts, meta = token_cache.cached_items("json", None, sources, settings, build)
        return texts, DataStats.from_cache(meta["stats"], not_counted=["truncated"]), None  # cut at collate

    def collate(self, items, generator):
        if not items:
            raise ValueError("empty batch")
        c = self.cfg.contrastive
        ids, pms, truncated = tokenize_with_instruction(self.tok, items, [c.instruction] * len(items), c.max_len,
                                                        c.pooling, self.chat)
        both_ids, both_pm = ids + ids, pms + pms  # view 1 = queries, view 2 = positives
        t_ids, t_am, t_pm = pad_batch(both_ids, self.tok.pad_token_id, "right", extra=(both_pm,))
        batch = self.host_layout({"input_ids": t_ids, "attention_mask": t_am, "pool_mask": t_pm,
                                  "n_queries": len(items), "truncated": truncated})
        if self.masking:  # the candidates are the second views: query i's positive (its own view) is candidate i
            keys = text_keys(ids, pms)
            batch["q_keys"], batch["d_keys"] = keys, keys.clone()
        return batch
