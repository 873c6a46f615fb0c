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


def test_tensorboard_alone_still_writes_metrics_csv(tmp_path):
    """logger=tensorboard wrote no metrics.csv, which resume, best/, engine.pick and the export read."""
    pytest.importorskip("tensorboard")
    cfg = load_config(None, ["model.name_or_path=x", f"output_dir={tmp_path}", "logger=tensorboard"])
    log = MetricsLogger(cfg, rank=0)
    log.log(1, {"loss": 2.0})
    log.log(2, {"loss": 1.0})
    log.tb.close()
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [(r["step"], r["loss"]) for r in csv.DictReader(f)] == [("1", "2.0"), ("2", "1.0")]


def test_tensorboard_asked_for_and_not_installed_is_a_config_error_before_the_run(tmp_path, monkeypatch, capsys):
    """It was an ImportError on every rank after the model had loaded and DeepSpeed had started."""
    import importlib.util

    from engine import train
    from engine.config import ConfigError
    from engine.metrics import check_logger

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    check_logger(load_config(None, ["model.name_or_path=x", "logger=csv"]))  # csv needs nothing
    with pytest.raises(ConfigError, match="logger=both needs the tensorboard package"):
        check_logger(load_config(None, ["model.name_or_path=x", "logger=both"]))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sts = os.path.join(root, "data", "stsbenchmark", "sts-train.csv")
    rc = train.main(["--config", os.path.join(root, "configs", "smollm2-135m", "mntp.yaml"), "logger=tensorboard",
                     f"data={sts}", "eval_data=[]",
                     f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr()
    assert rc == 2 and "logger=tensorboard needs the tensorboard package" in err.out + err.err
    assert not (tmp_path / "run").exists()  # said before anything is written


def test_texts_cut_in_steps_without_a_row_are_counted_in_the_next_row():
    """With log_every > 1 the truncated counts of the steps without a row were lost."""
    import types

    from engine.trainer import Trainer

    rows = []
    t = Trainer.__new__(Trainer)
    t.cfg = types.SimpleNamespace(log_every=3, max_steps=7)
    t.rank, t.bar = 0, types.SimpleNamespace()
    t.logger = types.SimpleNamespace(log=lambda step, row: rows.append((step, row["truncated"])))
    for done, cut in zip(range(1, 8), (1, 2, 0, 4, 0, 5, 6)):
        t.log(done, {"loss": 1.0, "truncated": cut}, always=done == 5)  # step 5: an eval's row
    assert rows == [(3, 3), (5, 4), (6, 5), (7, 6)] and sum(n for _, n in rows) == 18
