"""metrics.csv (and optionally TensorBoard): one row per logged step, written by rank 0."""
import csv
import os

from .files import atomic_open


class MetricsLogger:
    """metrics.csv (rank 0): one row per logged step. A column that appears later (eval metrics) rewrites the
    file with the wider header, so every row stays aligned; a resumed run (``start``: the step it resumes from)
    drops rows past that step, then appends."""

    def __init__(self, cfg, rank, start=None):
        self.rank, self.kind = rank, cfg.logger
        self.path = os.path.join(cfg.output_dir, "metrics.csv")
        self.rows, self.fields = [], []
        if rank == 0 and os.path.exists(self.path):
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or [])
                self.rows = list(reader)
        if rank == 0 and start is not None and self.rows:
            # Rows past the step this run starts from were logged by a run that did not reach its next
            # checkpoint: they are logged again, so drop them now (no step appears twice).
            kept = [r for r in self.rows if _int_or_none(r.get("step")) is not None and int(r["step"]) <= start]
            if len(kept) != len(self.rows):
                self.rows = kept
                self._rewrite()
        self.tb = None
        if rank == 0 and cfg.logger in ("tensorboard", "both"):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"))

    def log(self, step, row):
        if self.rank != 0:
            return
        row = {"step": step, **row}
        if self.kind in ("csv", "both"):
            new = [k for k in row if k not in self.fields]
            self.fields += new
            self.rows.append(row)
            if new or not os.path.exists(self.path):
                self._rewrite()
            else:
                with open(self.path, "a", newline="") as f:
                    csv.DictWriter(f, fieldnames=self.fields).writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def _rewrite(self):
        with atomic_open(self.path, newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            w.writeheader()
            w.writerows(self.rows)


def _int_or_none(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return None
