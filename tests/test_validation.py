"""Bad input gives a clear error (exit code 2) before any model loads: config values, data files, model files."""
import json
import os

import pytest

from engine.config import ConfigError, load_config
from engine.data import DataError, read_sts, read_supervised, read_texts

from .helpers import ROOT, run_cmd, tmpfs_mount

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
        ({"query": "q", "positive": "p", "negatives": 3}, r":2: field 'negatives' must be a string or a list"),
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
    # and a null negative is a row without one, counted as a missing field is (tests/test_data.py)
    gap = {"query": "q", "positive": "p", "negatives": None}
    p = _write(tmp_path / "gap.jsonl", json.dumps(ok) + "\n" + json.dumps(gap) + "\n")
    rows, stats = read_supervised([p])
    assert len(rows) == 1 and stats.no_negative == 1


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


# ------------------------------------------------------------------------------------------------------------
# Issue 25: every bad config input is exit 2 and one line (no traceback), before any model loads.

def _cli(args, capsys, monkeypatch):
    """engine/train.py's main in-process; training itself must not be reached."""
    import engine.trainer
    from engine.train import main

    def no_train(cfg):
        raise AssertionError("training started (a model would load) despite bad input")

    monkeypatch.setattr(engine.trainer, "train", no_train)
    rc = main(args)
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize("content,msg", [
    (b"stage: mntp\nmodel: {name_or_path: x\n", "is not valid YAML"),
    (b"stage: !!python/object/apply:os.system ['echo pwned']\n", "holds a tag that is not plain data"),
    (b"stage: mntp\n# caf\xe9\n", "is not UTF-8 text"),
    (b"stage: " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "is nested too deeply"),
], ids=["unparsable", "python-tag", "not-utf8", "nested-100k"])
def test_bad_yaml_files_exit_2_with_one_line(tmp_path, capsys, monkeypatch, content, msg):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=msg):
        load_config(str(path))
    rc, err = _cli(["--config", str(path)], capsys, monkeypatch)
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err


def test_bad_yaml_in_an_override_is_a_config_error():
    with pytest.raises(ConfigError, match="override 'data=\\[a, b' : the value is not valid YAML|not valid YAML"):
        load_config(os.path.join(TINY, "mntp.yaml"), ["data=[a, b"])


def test_empty_target_modules_is_a_config_error(capsys, monkeypatch):
    rc, err = _cli(["--config", os.path.join(TINY, "mntp.yaml"), "lora.target_modules=[]"], capsys, monkeypatch)
    assert rc == 2 and "lora.target_modules is empty" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("config", ["tiny/mntp.yaml", "mistral-7b/mntp.yaml"])
def test_unknown_target_modules_fail_before_any_weight_loads(tmp_path, capsys, monkeypatch, config):
    # checked on the architecture built on the meta device (tiny: random_init; Mistral: the shipped config.json
    # values), so no weights or hub are needed; the old code reported it only after the model had loaded
    import engine.modeling

    def no_weights(*a, **k):
        raise AssertionError("weights loaded before the target modules were checked")

    monkeypatch.setattr(engine.modeling, "load_model", no_weights)
    rc, err = _cli(["--config", os.path.join(ROOT, "configs", config), f"output_dir={tmp_path / 'o'}",
                    "lora.target_modules=[q_proj, qproj]"], capsys, monkeypatch)
    assert rc == 2 and "lora.target_modules ['qproj'] name no Linear module" in err, err
    assert len(err.strip().splitlines()) == 1


def test_bad_output_dirs(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    dangling = tmp_path / "link"
    os.symlink(tmp_path / "gone", dangling)
    for value, msg in (("''", "output_dir is empty"), (str(a_file), "is a file, not a folder"),
                       (str(dangling), "is a symbolic link to"), (str(a_file / "run"), "is not a folder")):
        with pytest.raises(ConfigError, match=msg):
            load_config(os.path.join(TINY, "mntp.yaml"), [f"output_dir={value}"])
        rc, err = _cli(["--config", os.path.join(TINY, "mntp.yaml"), f"output_dir={value}"], capsys, monkeypatch)
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, (value, err)
    assert load_config(os.path.join(TINY, "mntp.yaml"), [f"output_dir={tmp_path / 'new' / 'run'}"])


def test_json_nested_100k_deep_is_one_clear_error():
    from engine.config import json_loads

    class DataLikeError(ValueError):
        pass

    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(DataLikeError, match=r"^train.jsonl:3: JSON nested too deeply to parse$"):
        json_loads(deep, "train.jsonl:3", error=DataLikeError)
    with pytest.raises(ConfigError, match="invalid JSON"):
        json_loads("{", "x.json")
    assert json_loads('{"a": [1, {"b": 2}]}', "x") == {"a": [1, {"b": 2}]}


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_exits_2_naming_the_path(tmp_path):
    mnt = tmp_path / "small"
    if os.geteuid() != 0 or not tmpfs_mount(mnt, "300k"):
        pytest.skip("needs root and `mount -t tmpfs` to make a small file system")
    try:
        out = mnt / "run"
        r = run_cmd(["python", "engine/train.py", "--config", "configs/tiny/mntp.yaml", f"output_dir={out}",
                     "max_steps=2", "save_every=1", "progress_bar=false"], timeout=300)
        assert r.returncode == 2, r.stderr[-3000:]
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "no space left on the device writing" in lines[0] and str(out) in lines[0], r.stderr
        assert "bytes free on" in lines[0] and "Traceback" not in r.stderr, r.stderr[-3000:]
    finally:
        import subprocess

        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_disk_full_message_reads_the_exception_chain(tmp_path):
    import errno

    from engine.cli import disk_full_message

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt" / "x.pt"))
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as e:
        msg = disk_full_message(e, str(tmp_path))
    assert msg.startswith(f"error: no space left on the device writing {tmp_path / 'ckpt' / 'x.pt'} (")
    assert "bytes free on" in msg
    assert disk_full_message(RuntimeError("unexpected pos 1 vs 2"), str(tmp_path), low=0) is None  # disk not full
    assert disk_full_message(ValueError("other"), str(tmp_path)) is None
    # safetensors raises its own error type on a full disk (found by the export's tmpfs test)
    st_err = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert disk_full_message(st_err, str(tmp_path)).startswith(f"error: no space left on the device writing under {tmp_path}")


def _stage(config, overrides):
    from engine.modeling import load_tokenizer
    from engine.stages import build_stage

    cfg = load_config(config, overrides)
    return cfg, build_stage(cfg, load_tokenizer(cfg.model))


def test_an_angle_threshold_above_every_score_is_refused_at_load(tmp_path):
    """AnglE's in-batch-negative term takes the pairs scoring >= positive_min_score (default 4, STS-B's 0-5 scale)
    as positives: on 0-1 scores it had none, and the term was 0 at every step, silently."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"sentence1": f"a {i}", "sentence2": f"b {i}", "score": i / 10}) + "\n"
                             for i in range(10)))
    cfg, stage = _stage("configs/tiny/graded.yaml", [f"data={pairs}", "contrastive.loss=angle"])
    with pytest.raises(ConfigError, match=r"positive_min_score 4.0: no pair .* \(scores 0 to 0.9\)"):
        stage.load(cfg.data)
    for fix in ("contrastive.positive_min_score=0.8", "contrastive.angle_weights=[1,0,1]"):
        cfg, stage = _stage("configs/tiny/graded.yaml", [f"data={pairs}", "contrastive.loss=angle", fix])
        assert len(stage.load(cfg.data)[0]) == 10


@pytest.mark.parametrize("config,overrides,says", [
    ("configs/tiny/supervised.yaml", ["contrastive.instruction=" + "word " * 40], "contrastive.max_len: instruction"),
    ("configs/tiny/simcse.yaml", ["contrastive.instruction=" + "word " * 40, "contrastive.max_len=16"],
     "contrastive.max_len: instruction"),
    ("configs/tiny/supervised.yaml", ["data=data/e5-sample", "contrastive.max_len=12"], "'Find questions that have the same meaning"),
    ("configs/tiny/graded.yaml", ["contrastive.instruction=" + "word " * 40], "doc_max_len: instruction"),
])
def test_an_instruction_with_no_room_for_the_text_is_refused_at_load(config, overrides, says):
    """An instruction that leaves max_len no room for a text token was found at collate time: a ValueError and a
    traceback at the first batch that drew it, however late in the run. The config's instruction and E5's own are
    checked when the data loads."""
    cfg, stage = _stage(config, overrides)
    with pytest.raises(ConfigError, match="leaves no room") as e:
        stage.load(cfg.data)
    assert says in str(e.value), str(e.value)


def test_a_row_instruction_with_no_room_stops_the_run_at_load_in_one_line(tmp_path):
    """A row's own instruction (JSONL ``instruction``) is checked when the data loads, on every rank alike: met only
    at collate, it stopped the one rank whose batch drew it while the others waited in the step's collectives.
    One row of 32 carries it; the run stops before its first step with one line, exit 2, no traceback."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"query": f"q {i}", "positive": f"p {i}", "negative": f"n {i}",
                                        **({"instruction": "word " * 40} if i == 29 else {})}) + "\n"
                            for i in range(32)))
    r = run_cmd(["python", "engine/train.py", "--config", "configs/tiny/supervised.yaml", f"output_dir={tmp_path / 'o'}",
                 f"data={rows}", "max_steps=1", "save_every=0"], timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "contrastive.max_len (a row's own instruction): instruction 'word word" in lines[0], lines
    assert "leaves no room" in lines[0] and "step 1" not in r.stderr, lines


@pytest.mark.parametrize("config,row", [
    ("mntp.yaml", {"text": "bad \ud800 text"}),
    ("supervised.yaml", {"query": "bad \ud800", "positive": "p", "negative": "n"}),
], ids=["mntp", "supervised"])
def test_a_lone_surrogate_in_the_data_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, config, row):
    """A JSONL text holding JSON's ``\\ud800`` escape: MNTP failed building its item cache with the tokenizer's
    TypeError traceback, naming no file; supervised cached it and failed at the batch that drew it, hours into a
    run. engine/train.py's main, in-process, up to the stage's data load (no model): one line naming file:line."""
    import engine.trainer
    from engine.modeling import load_tokenizer
    from engine.stages import build_stage
    from engine.train import main

    def load_only(cfg):
        build_stage(cfg, load_tokenizer(cfg.model)).load(cfg.data)
        raise AssertionError("the data loaded despite the surrogate")

    monkeypatch.setenv("LLM2VEC_ENGINE_TOKEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(engine.trainer, "train", load_only)
    data = tmp_path / "d.jsonl"
    ok = {k: "fine" for k in row}
    data.write_text("".join(json.dumps(r) + "\n" for r in [ok] * 40 + [row]))
    rc = main(["--config", os.path.join(TINY, config), f"data={data}", f"output_dir={tmp_path / 'o'}", "eval_data=[]"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]  # (MNTP's tokenise bar is on stderr too)
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"d.jsonl:41: field '{next(iter(row))}' holds an unpaired UTF-16 surrogate" in lines[0], err
