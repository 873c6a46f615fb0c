import csv
import os
import time

import pytest

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


@pytest.mark.parametrize("torn,kept", [
    ("step,loss\r\n1,2.0\r\n2,1.9", [("1", "2.0"), ("3", "1.8"), ("4", "1.7")]),  # "2,1.93\r\n" cut short
    ("step,loss\r\n1,2.0\r\n2,1.93\r", [("1", "2.0"), ("2", "1.93"), ("3", "1.8"), ("4", "1.7")]),  # only \n lost
    ("step,lo", [("3", "1.8"), ("4", "1.7")]),  # the header itself
])
def test_a_torn_last_line_is_dropped_on_resume(tmp_path, torn, kept):
    """A power cut mid-row left metrics.csv without its last newline and no row past the resumed step: the next
    row was glued onto the torn one ("2,1.93,1.8"), losing step 3 and corrupting step 2."""
    cfg = load_config(None, ["model.name_or_path=x", f"output_dir={tmp_path}", "logger=csv"])
    (tmp_path / "metrics.csv").write_bytes(torn.encode())
    log = MetricsLogger(cfg, rank=0, start=2)
    log.log(3, {"loss": 1.8})
    log.log(4, {"loss": 1.7})
    text = (tmp_path / "metrics.csv").read_text()
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["loss"]) for r in rows] == kept and list(rows[0]) == ["step", "loss"], text
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_tensorboard_curves_do_not_double_back_after_a_resume(tmp_path):
    """Resumed from step 2, the events an earlier run logged at steps 3 and 4 are purged (purge_step=start+1):
    TensorBoard shows each step once, the resumed run's value."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    cfg = load_config(None, ["model.name_or_path=x", f"output_dir={tmp_path}", "logger=tensorboard"])
    first = MetricsLogger(cfg, rank=0, start=0)
    for step in range(1, 5):
        first.log(step, {"loss": 10.0 - step})
    first.tb.close()
    time.sleep(1.01 - time.time() % 1)  # event files are ordered by their name, which starts with the second
    resumed = MetricsLogger(cfg, rank=0, start=2)
    for step in (3, 4):
        resumed.log(step, {"loss": 1.0 - step})
    resumed.tb.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 9.0), (2, 8.0), (3, -2.0), (4, -3.0)]
