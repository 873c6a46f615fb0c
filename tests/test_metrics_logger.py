import csv
import os

from engine.config import load_config
from engine.metrics import MetricsLogger


def test_csv_stays_aligned_and_tensorboard_is_written(tmp_path):
    cfg = load_config(None, ["model.name_or_path=x", f"output_dir={tmp_path}", "logger=both"])
    log = MetricsLogger(cfg, rank=0)
    log.log(1, {"loss": 2.0, "lr": 1e-4})
    log.log(2, {"loss": 1.5, "lr": 1e-4, "eval_loss": 1.7})  # a new column rewrites the header
    log.log(3, {"loss": 1.2, "lr": 5e-5})
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert [r["eval_loss"] for r in rows] == ["", "1.7", ""]
    assert [float(r["loss"]) for r in rows] == [2.0, 1.5, 1.2]
    resumed = MetricsLogger(cfg, rank=0)  # a resumed run appends under the same header
    resumed.log(4, {"loss": 1.0, "lr": 1e-5})
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2", "3", "4"]
    events = os.listdir(tmp_path / "tensorboard")
    assert any(e.startswith("events.out.tfevents") for e in events)
    assert MetricsLogger(cfg, rank=1).log(5, {"loss": 0.0}) is None  # other ranks write nothing
