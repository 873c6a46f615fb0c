"""metrics.csv (and optionally TensorBoard): one row per logged step, written by rank 0."""
import csv
import importlib.util
import io
import os

from .config import ConfigError
from .files import atomic_open


def check_logger(cfg):
    """ConfigError when ``cfg.logger`` asks for TensorBoard and the ``tensorboard`` package is not installed (the
    ``dev`` extra has it): said before the model loads, not as an ImportError on every rank once it has."""
    if cfg.logger in ("tensorboard", "both") and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(f"logger={cfg.logger} needs the tensorboard package, which is not installed: "
                          f"pip install tensorboard, or logger=csv")


class MetricsLogger:
    """metrics.csv (rank 0): one row per logged step, whatever ``logger`` says (resume, ``best/``, ``engine.pick``
    and the export read it; ``logger=tensorboard`` and ``both`` add TensorBoard beside it). A column that appears later (eval metrics) rewrites the
    file with the wider header, so every row stays aligned; a resumed run (``start``: the step it resumes from)
    drops rows past that step, then appends, and TensorBoard hides its events past that step (``purge_step``). A
    file that does not end in a newline was torn mid-row (a power cut): that row is dropped and the file rewritten
    (atomically, as every rewrite), so the next row starts on a line of its own."""

    def __init__(self, cfg, rank, start=None):
        self.rank = rank
        self.path = os.path.join(cfg.output_dir, "metrics.csv")
        self.rows, self.fields = [], []
        torn = False
        if rank == 0 and os.path.exists(self.path):
            self.fields, self.rows, torn = _read(self.path)
        if rank == 0 and (torn or (start is not None and self.rows)):
            # Rows past the step this run starts from were logged by a run that did not reach its next
            # checkpoint: they are logged again, so drop them now (no step appears twice). A torn last line
            # (a power cut mid-write) is dropped too, else the next row would be glued onto it.
            kept = self.rows if start is None else [r for r in self.rows if _stands(r, start)]
            if torn or len(kept) != len(self.rows):
                self.rows = kept
                self._rewrite()
        self.tb = None
        if rank == 0 and cfg.logger in ("tensorboard", "both"):
            from torch.utils.tensorboard import SummaryWriter

            # from ``start`` on (0 too: starting over), the events an earlier run logged past it are hidden, as
            # its CSV rows are dropped, so the curves do not double back
            self.tb = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"),
                                    **({"purge_step": start + 1} if start is not None else {}))

    def log(self, step, row):
        if self.rank != 0:
            return
        row = {"step": step, **row}
        new = [k for k in row if k not in self.fields]  # metrics.csv: the run's record, under every logger
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
            if self.fields:  # a header torn before its end: nothing stands, the next row writes one
                w = csv.DictWriter(f, fieldnames=self.fields)
                w.writeheader()
                w.writerows(self.rows)


def _read(path):
    """(fields, rows, torn) of a metrics.csv. Every row the logger writes ends in a newline, so a file that does
    not has a torn last line: it is left out (a line cut after its ``\\r`` is whole) and ``torn`` is True."""
    with open(path, newline="") as f:
        text = f.read()
    torn = not text.endswith("\n") and text != ""
    if torn and not text.endswith("\r"):
        text = text[:text.rfind("\n") + 1]  # "" when even the header is torn
    reader = csv.DictReader(io.StringIO(text, newline=""))
    return list(reader.fieldnames or []), list(reader), torn


def _stands(row, start):
    """Whether ``row`` stands when a run resumes from step ``start``: its step is a number <= ``start``."""
    step = _int_or_none(row.get("step"))
    return step is not None and step <= start


def _int_or_none(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return None
