"""Bad input gives a clear error (exit code 2) before any model loads: config values, data files, model files."""
import json
import os

import pytest

from engine.config import ConfigError, load_config
from engine.data import DataError, read_sts, read_supervised, read_texts

from .helpers import ROOT, run_cmd

TINY = os.path.join(ROOT, "configs", "tiny")


@pytest.mark.parametrize("override,msg", [
    ("log_every=0", "log_every must be >= 1"),
    ("learning_rate=nan", "learning_rate must be a finite number"),
    ("learning_rate=0", "learning_rate must be a positive number"),
    ("max_samples=-1", "max_samples must be >= 0"),
    ("contrastive.temperature=0", "contrastive.temperature must be a positive number"),
    ("contrastive.temperature=-0.05", "contrastive.temperature must be a positive number"),
    ("eval_batches=0", "eval_batches must be >= 1"),
    ("max_grad_norm=0", "max_grad_norm must be > 0"),
    ("max_grad_norm=-1", "max_grad_norm must be > 0"),
    ("lora.r=0", "lora.r must be >= 1"),
    ("lora.dropout=1.0", "lora.dropout must be in [0, 1)"),
    ("adam_betas=[0.9]", "adam_betas must be two numbers in [0, 1)"),
    ("adam_betas=[0.9, 1.5]", "adam_betas must be two numbers in [0, 1)"),
    ("weight_decay=inf", "weight_decay must be a finite number"),
    ("contrastive.max_len=0", "contrastive.max_len must be >= 2"),
    ("contrastive.doc_max_len=1", "contrastive.doc_max_len must be >= 2"),
    ("warmup_steps=-1", "warmup_steps must be >= 0"),
    ("keep_checkpoints=-1", "keep_checkpoints must be >= 0"),
    ("max_nonfinite_steps=0", "max_nonfinite_steps must be >= 1"),
    ("resume=maybe", "resume must be one of"),
])
def test_every_numeric_key_is_checked(override, msg):
    with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(os.path.join(TINY, "simcse.yaml"), [override])


def test_bad_values_exit_2_before_any_model_loads(tmp_path):
    # The three values a user tried: each crashed or misbehaved after the model had loaded.
    for override, msg in (("log_every=0", "log_every must be >= 1"),
                          ("learning_rate=nan", "learning_rate must be a finite number"),
                          ("max_samples=-1", "max_samples must be >= 0")):
        r = run_cmd(["python", "engine/train.py", "--config", "configs/tiny/mntp.yaml",
                     f"output_dir={tmp_path / 'o'}", override], timeout=120)
        assert r.returncode == 2 and f"config error: {msg}" in r.stderr, (override, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
        assert not os.path.exists(tmp_path / "o")  # nothing written, not even config.yaml


def _write(path, data):
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def test_text_data_errors_name_file_and_line(tmp_path):
    cases = [
        (b"good line\n\xff\xfe bad bytes\n", "txt", r":2: not valid UTF-8"),
        (b"\x7fELF\x02\x01\x01\x00\x00\x00binary", "txt", r":1: NUL byte: this looks like a binary file"),
        ('{"text": "ok"}\n{"text": 5}\n', "jsonl", r":2: field 'text' must be a string, got a number"),
        ('{"text": null}\n', "jsonl", r":1: field 'text' must be a string, got null"),
        ('"just a string"\n', "jsonl", r":1: expected a JSON object with a 'text' field, got a string"),
        ('[1, 2]\n', "jsonl", r":1: expected a JSON object.*got an array"),
    ]
    for i, (data, ext, msg) in enumerate(cases):
        p = _write(tmp_path / f"d{i}.{ext}", data)
        with pytest.raises(DataError, match=msg):
            read_texts([p])


def test_sts_bad_encoding_is_a_data_error(tmp_path):
    good = "main-captions\tMSRvid\t2012test\t0001\t5.000\tA man.\tA man.\n"
    p = _write(tmp_path / "sts.csv", good.encode() + b"main\tx\t2012\t2\t1.0\t\xe9t\xe9\tb\n")
    with pytest.raises(DataError, match=r"sts.csv:2: not valid UTF-8"):
        read_sts(p)


def test_supervised_data_errors(tmp_path):
    ok = {"query": "q", "positive": "p", "negative": "n"}
    cases = [
        ({**ok, "query": None}, r":2: field 'query' must be a string, got null"),
        ({**ok, "positive": 3}, r":2: field 'positive' must be a string, got a number"),
        ({"query": "q", "positive": "p", "negatives": None}, r":2: field 'negatives' must be a string or a list"),
        ({"query": "q", "positive": "p", "negatives": ["a", None]}, r":2: .*got an array holding null"),
        ({**ok, "instruction": 1}, r":2: field 'instruction' must be a string"),
        ("a string line", r":2: expected a JSON object with query, positive"),
    ]
    for i, (row, msg) in enumerate(cases):
        p = _write(tmp_path / f"s{i}.jsonl", json.dumps(ok) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(DataError, match=msg):
            read_supervised([p])
    # A null instruction means "no instruction of its own": the default applies.
    p = _write(tmp_path / "ok.jsonl", json.dumps({**ok, "instruction": None}) + "\n")
    rows, _ = read_supervised([p], default_instruction="Find: ")
    assert rows[0]["instruction"] == "Find: " and rows[0]["negatives"] == ["n"]


def test_relative_data_path_error_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repo root: the configs' relative data paths do not resolve here
    with pytest.raises(DataError, match=r"data file not found: data/stsbenchmark/sts-dev.csv.*relative paths are "
                                        r"read from the current directory.*run from the repository root"):
        read_texts(["data/stsbenchmark/sts-dev.csv"])


@pytest.mark.slow
def test_data_and_model_errors_exit_2_from_the_command_line(tmp_path):
    binary = _write(tmp_path / "bin.txt", bytes(range(256)) * 4)
    bad_gguf = _write(tmp_path / "model.gguf", b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64)
    for overrides, msg in (([f"data={binary}"], "bin.txt:1: NUL byte"),
                           ([f"model.name_or_path={bad_gguf}", "model.random_init=null", "model.tokenizer=null"],
                            "error: could not load the tokenizer of")):
        r = run_cmd(["python", "engine/train.py", "--config", "configs/tiny/mntp.yaml",
                     f"output_dir={tmp_path / 'o'}", *overrides], timeout=300)
        assert r.returncode == 2, (overrides, r.stderr[-3000:])
        assert msg in r.stderr and "Traceback" not in r.stderr, (msg, r.stderr[-3000:])


def test_unknown_hub_id_is_a_model_load_error(monkeypatch):
    from engine.config import ModelConfig
    from engine.modeling import ModelLoadError, load_tokenizer

    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE once, at import: set the constant too, or the lookup waits on the network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"could not load the tokenizer of 'no-such-org/no-such-model-x'"):
        load_tokenizer(ModelConfig(name_or_path="no-such-org/no-such-model-x"))
