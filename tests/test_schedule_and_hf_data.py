"""The LR schedule (warmup, then linear / cosine / constant) and `hf:NAME[:CONFIG[:SPLIT]]` data sources.

The hf: tests stand a fake `datasets` module in for the real one (no network here): they check the spec is
parsed into load_dataset's arguments and the rows are read like a local file's, not the Hub itself.
"""
import math
import sys
import types

import pytest
import torch

from engine.config import load_config
from engine.data import DataError, read_supervised, read_texts
from engine.optim import lr_lambda


def _cfg(**kw):
    return load_config("configs/tiny/mntp.yaml", [f"{k}={v}" for k, v in kw.items()])


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_warmup_then_decay(schedule):
    cfg = _cfg(warmup_steps=4, max_steps=20, lr_schedule=schedule)
    f = lr_lambda(cfg)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # linear warmup, full lr on the last warmup step
    t = lambda s: (s - 4) / 16  # noqa: E731  fraction of the decay span
    want = {"linear": lambda s: 1 - t(s), "cosine": lambda s: 0.5 * (1 + math.cos(math.pi * t(s))),
            "constant": lambda s: 1.0}[schedule]
    for s in (4, 8, 12, 19, 20, 25):
        assert f(s) == pytest.approx(want(min(s, 20)), abs=1e-12), s
    if schedule != "constant":
        assert f(20) == pytest.approx(0.0, abs=1e-12) and f(12) == pytest.approx(0.5)
    # and through torch's LambdaLR as the trainer drives it (one scheduler step per optimizer step)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * f(s) for s in range(20)])


def test_no_warmup_starts_at_full_lr():
    f = lr_lambda(_cfg(warmup_steps=0, max_steps=10, lr_schedule="cosine"))
    assert f(0) == 1.0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(0.0, abs=1e-12)


def test_a_schedule_that_defeats_itself_is_warned_about():
    from engine.optim import schedule_warnings

    assert schedule_warnings(_cfg(warmup_steps=4, max_steps=20)) == []
    assert schedule_warnings(_cfg(warmup_steps=0, max_steps=3)) == []
    (w,) = schedule_warnings(_cfg(warmup_steps=100, max_steps=10))
    assert "warmup_steps 100 >= max_steps 10" in w and "at 10% of learning_rate" in w
    (w,) = schedule_warnings(_cfg(warmup_steps=50, max_steps=100, lr_decay_steps=20))
    assert "decay reaches 0 at step 20" in w and "the LR is 0 from step 52 to max_steps 100" in w
    f = lr_lambda(_cfg(warmup_steps=50, max_steps=100, lr_decay_steps=20))
    assert f(50) == 1.0 and f(51) == 0.0  # what the warning says: step 52 (1-based) applies f(51)
    # a horizon under a schedule that does not decay was ignored in silence (and the dry run printed it)
    (w,) = schedule_warnings(_cfg(warmup_steps=50, max_steps=100, lr_decay_steps=20, lr_schedule="constant"))
    assert w.startswith("lr_decay_steps 20 is ignored: lr_schedule constant does not decay")
    (w,) = schedule_warnings(_cfg(max_steps=100, lr_decay_epochs=3, lr_schedule="constant_with_warmup"), 10)
    assert w.startswith("lr_decay_epochs 3 is ignored: lr_schedule constant_with_warmup does not decay")
    assert schedule_warnings(_cfg(warmup_steps=5, max_steps=100, lr_schedule="constant")) == []
    (w,) = schedule_warnings(_cfg(warmup_steps=30, max_steps=100, lr_decay_epochs=2), steps_per_epoch=10)
    assert "decay reaches 0 at step 20" in w
    # no warmup, a decay over 3 epochs of 3 steps each and 1000 steps: the LR is 0 from step 10 on
    (w,) = schedule_warnings(_cfg(warmup_steps=0, max_steps=1000, lr_decay_epochs=3), steps_per_epoch=3)
    assert "reaches 0 at step 9, before max_steps 1000: the LR is 0 from step 10 on" in w
    f = lr_lambda(_cfg(warmup_steps=0, max_steps=1000, lr_decay_epochs=3), steps_per_epoch=3)
    assert f(8) > 0 and f(9) == 0.0  # step 10 (1-based) applies f(9)
    assert schedule_warnings(_cfg(warmup_steps=0, max_steps=9, lr_decay_epochs=3), steps_per_epoch=3) == []


def test_a_step_with_an_eval_is_logged_whatever_log_every_says():
    """Evals at 25, 50, 75 and 100 with log_every 10: every eval's row reaches metrics.csv (25 and 75 did not)."""
    from engine.trainer import Trainer

    logged = []
    t = Trainer.__new__(Trainer)
    t.cfg = _cfg(max_steps=100, log_every=10, eval_every=25, max_nonfinite_steps=3)
    t.rank, t.bar, t.bad_streak = 0, None, 0
    t.logger = types.SimpleNamespace(log=lambda step, row: logged.append((step, dict(row))))
    t.evaluate = lambda done, row, bad: row.update(eval_loss=1.0)
    t.save = lambda done, bad: None
    for done in range(1, 101):
        t.after_step(done, {"loss": 1.0, "lr": 0.1, "grad_norm": 1.0, "skipped_steps": 0}, False)
    steps = [s for s, _ in logged]
    assert steps == sorted(set(range(10, 101, 10)) | {25, 75})
    assert [s for s, row in logged if "eval_loss" in row] == [25, 50, 75, 100]


class _FakeDataset(list):
    def __init__(self, rows):
        super().__init__(rows)
        self.column_names = list(rows[0]) if rows else []


@pytest.fixture
def fake_datasets(monkeypatch):
    calls, tables = [], {}
    mod = types.ModuleType("datasets")

    def load_dataset(name, config=None, split="train"):
        calls.append((name, config, split))
        return _FakeDataset(tables[name])

    mod.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", mod)
    return calls, tables


def test_hf_text_source(fake_datasets):
    calls, tables = fake_datasets
    tables["org/wiki"] = [{"id": 1, "text": " first "}, {"id": 2, "text": ""}, {"id": 3, "text": "first"},
                          {"id": 4, "text": "second"}]
    texts, stats = read_texts(["hf:org/wiki:20231101.en:validation"], dedup=True)
    assert calls == [("org/wiki", "20231101.en", "validation")]
    assert texts == ["first", "second"] and (stats.empty, stats.duplicates) == (1, 1)
    assert "duplicates 1" in stats.summary() and "duplicates" not in read_texts(["hf:org/wiki"])[1].summary()
    read_texts(["hf:org/wiki"])
    assert calls[-1] == ("org/wiki", None, "train")  # no config, default split
    tables["org/plain"] = [{"sentence": "only column"}]
    assert read_texts(["hf:org/plain::test"])[0] == ["only column"]  # no `text` column: the first one
    assert calls[-1] == ("org/plain", None, "test")


def test_hf_supervised_source(fake_datasets):
    _, tables = fake_datasets
    tables["org/pairs"] = [{"query": "q1", "positive": "p1", "negative": "n1"},
                           {"query": "q2", "positive": "p2", "negatives": ["n2", "n3"]}]
    ex, _ = read_supervised(["hf:org/pairs"], 0, "Find: ")
    assert [(e["query"], e["positive"], e["negatives"]) for e in ex] == [("q1", "p1", ["n1"]),
                                                                         ("q2", "p2", ["n2", "n3"])]


def test_hf_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(DataError, match="pip install datasets"):
        read_texts(["hf:org/wiki"])


def test_weight_decay_spares_norm_weights_and_biases():
    """AdamW held every trainable parameter in one group, so a full fine-tune's RMSNorm gains and biases were decayed
    towards 0 (a zero-gradient step took a gain from 1 to 0.9999 at lr 1e-3, wd 0.1). Matrices are decayed, 1-D
    parameters not; LoRA's trainables are all matrices, so a LoRA run keeps a single group; resume=force's new
    weight_decay reaches the decayed group only."""
    from transformers import LlamaForCausalLM

    from engine.modeling import add_lora
    from engine.optim import apply_optimizer_settings, param_groups

    from .helpers import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(attention_bias=True))
    groups = param_groups(model, 0.1)
    assert [g["decay"] for g in groups] == [True, False]
    assert all(p.ndim == 2 for p in groups[0]["params"]) and all(p.ndim == 1 for p in groups[1]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = torch.optim.AdamW(groups, lr=1e-3)
    norm, proj = model.model.norm.weight, model.model.layers[0].self_attn.q_proj
    before = [t.detach().clone() for t in (norm, proj.bias, proj.weight)]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(norm, before[0]) and torch.equal(proj.bias, before[1])
    assert torch.allclose(proj.weight, before[2] * (1 - 1e-3 * 0.1))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    line = apply_optimizer_settings(_cfg(weight_decay=0.05), types.SimpleNamespace(gradient_clipping=lambda: 1.0),
                                    sched)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0] and "weight_decay 0.05" in line

    lora = add_lora(LlamaForCausalLM(tiny_llama_config()), _cfg().lora)
    (only,) = param_groups(lora, 0.1)
    assert only["decay"] and len(only["params"]) == sum(p.requires_grad for p in lora.parameters()) > 0
