import torch

# The seed that orders held-out data (eval_data): fixed, so that runs with other seeds are scored on the same
# sentences. An STS-style eval file's pairs are shuffled by a seed (engine.data.split_pairs) and the eval reads
# only its first eval_batches micro-batches, so with the run's seed each seed saw another 80-block sample of it.
EVAL_SEED = 0
# The definition of the held-out loss (:func:`held_out_mean`) a run's ``eval_loss`` column holds, recorded in its
# adapter's engine_encoder.json so that engine.pick never ranks readings of two definitions. 1: a mean of the
# batches' losses (MNTP before 2026-12-06, e8df566); 2: MNTP's mean over every masked token. Adapters that record
# no rule but a fingerprint were written after that change (8c2120c), so they hold rule 2; older ones rule 1.
EVAL_LOSS_RULE = 2


class Stage:
    """A training stage: items -> collated batch -> loss.

    ``load(sources)`` returns (items, stats, groups or None); ``collate(items, generator)`` builds
    tensors on CPU; ``loss(module, batch)`` runs inside the DeepSpeed-wrapped module's forward;
    ``train_micro_step(engine, batch)`` does forward + backward for one micro-batch.
    """

    name = "base"

    def __init__(self, cfg, tokenizer):
        self.cfg, self.tok = cfg, tokenizer

    def prepare_model(self, model):
        return model

    def load(self, sources, max_samples=0, seed=None):
        """(items, DataStats, groups) of ``sources``. ``seed`` orders what the data's seed orders (the sentences of
        an STS-style pair file, engine.data.split_pairs); None: the run's seed. Held-out data is read with
        :data:`EVAL_SEED`, so runs that differ in seed are scored on the same text."""
        raise NotImplementedError

    def collate(self, items, generator):
        raise NotImplementedError

    def loss(self, module, batch):
        raise NotImplementedError

    def loss_units(self, batch):
        """How many terms this (host-side, collated) micro-batch's loss is the mean of, for a stage whose micro-batches
        hold unequal counts of them (MNTP's masked tokens); None for a stage whose micro-batches weigh the same. The
        trainer then weights each micro-batch by its count (:meth:`train_micro_step`'s ``weight``), so a step's loss
        and gradient are the mean over every term of the global batch, whatever the micro-batch size or world."""
        return None

    def train_micro_step(self, engine, batch, weight=1.0):
        """Forward and backward of one micro-batch; the backward runs on ``weight`` x the loss (the trainer's
        weighting by :meth:`loss_units`). Returns the unweighted loss and the forward's metrics."""
        loss, metrics = engine(batch)
        engine.backward(loss if weight == 1.0 else loss * weight)
        return loss.detach(), metrics

    @torch.no_grad()
    def batch_losses(self, engine, items, max_batches, device=None, units=False):
        """The loss of each of the first ``max_batches`` held-out micro-batches, in order. One generator draws
        every batch's masks in turn, so the first n losses of a longer read are those of a read of n batches.
        Each batch goes to ``device`` (default: the DeepSpeed engine's) as a training batch does: DeepSpeed's
        forward moves nothing, and CPU ids would meet a GPU embedding. ``units=True``: (loss, :meth:`loss_units`)
        pairs, for :func:`held_out_mean`."""
        device = device or getattr(engine, "device", None)
        losses = []
        g = torch.Generator().manual_seed(1234)
        mb = self.cfg.micro_batch_size
        for b in range(min(max_batches, max(1, len(items) // mb))):
            batch = self.collate(items[b * mb:(b + 1) * mb], g)
            batch.pop("truncated", None)
            n = self.loss_units(batch) if units else None
            if device is not None:
                batch = to_device(batch, device)
            loss, _ = engine(batch)
            losses.append((float(loss), n) if units else float(loss))
        return losses

    @torch.no_grad()
    def evaluate(self, engine, items, world, rank, max_batches):
        """The held-out loss (:func:`held_out_mean`; every rank runs the same batches: ZeRO-3 forward is
        collective)."""
        return {"eval_loss": held_out_mean(self.batch_losses(engine, items, max_batches, units=True))}


def held_out_mean(pairs):
    """The held-out loss from (loss, units) pairs, on the training step's definition: for a stage with loss units
    (MNTP's masked tokens) the mean over every unit, sum(loss_b units_b) / sum(units_b), so a batch with few masked
    tokens weighs little and one with none nothing; otherwise the mean of the batch losses. None when no unit was
    read (no masked token in any held-out batch): the log's cell stays empty. (Before 2026-12-06 the MNTP held-out
    loss was the mean of the batch losses, an unweighted mean of per-batch token means.)"""
    if not pairs:
        return 0.0
    if any(n is None for _, n in pairs):
        return sum(loss for loss, _ in pairs) / len(pairs)
    total = sum(n for _, n in pairs)
    return sum(loss * n for loss, n in pairs) / total if total else None


def to_device(batch, device):
    """Tensors (also inside nested dicts / lists, e.g. the packed layout) to ``device``; the rest as is."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
