"""Every command line ends a bad input with one line on stderr and exit code 2, before any heavy work (issue 23)."""
import os
import sys

import pytest

from .helpers import STS, run_cmd


def _one_line(err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(("error:", "config error:")), err[-2000:]
    return lines[0]


def _evaluate(capsys, *args):
    from engine.evaluate import main

    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, _one_line(capsys.readouterr().err)


DEV = os.path.join(STS, "sts-dev.csv")


def test_evaluate_missing_path(capsys, tmp_path):
    rc, line = _evaluate(capsys, "--model", str(tmp_path / "missing"), "--data", DEV)
    assert rc == 2 and "model not found" in line


def test_evaluate_a_folder_that_is_no_model(capsys, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    rc, line = _evaluate(capsys, "--model", str(tmp_path / "notes"), "--data", DEV)
    assert rc == 2 and "not a model or a training run" in line
    (tmp_path / "empty").mkdir()
    rc, line = _evaluate(capsys, "--model", str(tmp_path / "empty"), "--data", DEV)
    assert rc == 2 and "empty folder" in line


def test_an_unfinished_run_is_recognised_and_explained(capsys, tmp_path):
    from engine.export import main as export_main

    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000003" / "adapter").mkdir(parents=True)
    (run / "checkpoints" / "step_0000003" / "adapter" / "adapter_config.json").write_text("{}")
    (run / "config.yaml").write_text("stage: mntp\n")
    rc, line = _evaluate(capsys, "--model", str(run), "--data", DEV)
    assert rc == 2 and "without a final adapter" in line and "step_0000003" in line
    assert export_main(["--model", str(run), "--out", str(tmp_path / "exp")]) == 2
    assert "without a final adapter" in _one_line(capsys.readouterr().err)


def test_evaluate_a_model_it_cannot_encode_with_is_one_line(capsys, tmp_path):
    """An architecture the engine cannot make bidirectional (before its weights load), and an instruction that
    leaves --max-length no room for the text: exit 2 and one line, no traceback."""
    from transformers import GPT2Config, GPT2Model

    from engine.config import ModelConfig
    from engine.modeling import load_tokenizer

    from .test_encoder import _save_base

    tok = load_tokenizer(ModelConfig(name_or_path="smollm2-135m"))
    gpt2 = str(tmp_path / "gpt2")
    GPT2Model(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2)).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    capsys.readouterr()
    rc, line = _evaluate(capsys, "--model", gpt2, "--data", DEV)
    assert rc == 2 and "gpt2" in line
    base = str(tmp_path / "base")
    _save_base(base, tok)
    capsys.readouterr()
    rc = __import__("engine.evaluate", fromlist=["main"]).main(
        ["--model", base, "--data", DEV, "--max-length", "4", "--instruction", "a long instruction of many words"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "error: instruction" in err, err[-2000:]  # after the progress bars
    assert "leaves no room for the text" in err


def test_evaluate_bad_choice(capsys, tmp_path):
    rc, line = _evaluate(capsys, "--model", str(tmp_path), "--pooling", "maxx", "--data", DEV)
    assert rc == 2 and "maxx" in line
    rc, line = _evaluate(capsys, "--model", str(tmp_path), "--batch-size", "0", "--data", DEV)
    assert rc == 2 and "batch-size" in line


def test_evaluate_compare_needs_the_same_pairs(capsys, tmp_path):
    from engine.data import read_sts
    from engine.evaluate import write_scores

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # the file is read before any model loads
    pairs = read_sts(DEV)
    write_scores(tmp_path / "short.tsv", pairs[:10], [0.5] * 10)
    rc, line = _evaluate(capsys, "--model", str(tmp_path / "model"), "--data", DEV, "--compare", str(tmp_path / "short.tsv"))
    assert rc == 2 and "10 pairs, but --data has 1500" in line
    shuffled = pairs[1:] + pairs[:1]
    write_scores(tmp_path / "other.tsv", shuffled, [0.5] * len(pairs))
    rc, line = _evaluate(capsys, "--model", str(tmp_path / "model"), "--data", DEV, "--compare", str(tmp_path / "other.tsv"))
    assert rc == 2 and "other.tsv:" in line and "same file" in line
    (tmp_path / "junk.tsv").write_text("a,b\n")
    rc, line = _evaluate(capsys, "--model", str(tmp_path / "model"), "--data", DEV, "--compare", str(tmp_path / "junk.tsv"))
    assert rc == 2 and "not a --scores file" in line
    rc, line = _evaluate(capsys, "--model", str(tmp_path / "model"), "--data", DEV, "--bootstrap", "10")
    assert rc == 2 and "at least 100" in line
    rc, line = _evaluate(capsys, "--model", str(tmp_path / "model"), "--task", "mteb:STSBenchmark", "--bootstrap", "200")
    assert rc == 2 and "for --task sts" in line


def test_evaluate_offline_hub_task_names_the_offline_one(capsys, tmp_path, monkeypatch):
    pytest.importorskip("mteb")
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if hasattr(datasets.config, "HF_HUB_OFFLINE"):
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    rc, line = _evaluate(capsys, "--model", str(tmp_path / "model"), "--task", "mteb:STSBenchmark")
    assert rc == 2 and "needs its data from the Hugging Face hub" in line
    assert "mteb:STSBenchmarkLocal --data data/stsbenchmark/sts-dev.csv" in line


def test_export_a_folder_that_is_no_model(capsys, tmp_path):
    from engine.export import main

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    assert main(["--model", str(tmp_path / "notes"), "--out", str(tmp_path / "exp")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "not a model or a training run" in line and "model_type" not in line
    assert not os.path.exists(tmp_path / "exp")


def test_assets_bad_alias_and_unwritable_cache(tmp_path):
    r = run_cmd([sys.executable, "-m", "engine.assets", "fetch", "no-such-model"], timeout=120)
    assert r.returncode == 2 and "no-such-model" in _one_line(r.stderr)
    (tmp_path / "file").write_text("x")
    r = run_cmd([sys.executable, "-m", "engine.assets", "fetch", "smollm2-135m"], timeout=120,
                env={"LLM2VEC_ENGINE_CACHE": str(tmp_path / "file" / "cache")})
    assert r.returncode == 2 and "Not a directory" in _one_line(r.stderr)


def _train(*args):
    return run_cmd([sys.executable, "engine/train.py", "--config", "configs/tiny/mntp.yaml", *args], timeout=300)


def test_train_output_dir_checks_and_no_empty_folder_left(tmp_path):
    (tmp_path / "file").write_text("x")
    r = _train(f"output_dir={tmp_path / 'file'}")
    assert r.returncode == 2 and "is a file" in _one_line(r.stderr)
    r = _train(f"output_dir={tmp_path / 'file' / 'run'}")
    assert r.returncode == 2 and f"{tmp_path / 'file'} is not a folder" in _one_line(r.stderr)
    os.symlink(tmp_path / "gone", tmp_path / "link")
    r = _train(f"output_dir={tmp_path / 'link'}")
    assert r.returncode == 2 and "is a symbolic link to" in _one_line(r.stderr) and "does not exist" in r.stderr
    # a run that fails on its data leaves no empty output_dir (nor the parents it created)
    r = _train(f"output_dir={tmp_path / 'new' / 'run'}", f"data={tmp_path / 'missing.txt'}")
    assert r.returncode == 2 and "missing.txt" in r.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "new")
    r = _train("--no-such-flag")
    assert r.returncode == 2 and "no-such-flag" in _one_line(r.stderr)


def test_train_refuses_dry_run_flags_without_a_dry_run(tmp_path):
    """--world and --gpu-memory-gb plan a dry run; a training run ignored them and started (writing its folder)."""
    for flag, value in (("--world", "0"), ("--gpu-memory-gb", "40")):
        r = run_cmd([sys.executable, "engine/train.py", "--config", "configs/tiny/mntp.yaml", flag, value,
                     f"output_dir={tmp_path / 'run'}"], timeout=120)
        assert r.returncode == 2 and f"{flag} applies to --dry-run only" in _one_line(r.stderr), r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "run")


def test_train_refuses_full_fine_tuning_before_it_writes_anything(tmp_path, capsys):
    """lora.enabled=false trained to the end and then failed with a traceback saving the adapter (PEFT's state dict
    of a model with no PEFT config): everything the run writes and reads back is LoRA's. Full fine-tuning is the dry
    run's memory plan only; a run refuses it in one line, exit 2, before its folder exists."""
    from engine.train import main

    out = tmp_path / "run"
    assert main(["--config", "configs/tiny/mntp.yaml", "lora.enabled=false", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert _one_line(err).startswith("config error: lora.enabled=false (full fine-tuning) is planned by --dry-run"), err
    assert not out.exists()
    assert main(["--config", "configs/tiny/mntp.yaml", "--dry-run", "lora.enabled=false"]) == 0


def test_a_name_that_is_no_model_is_said_by_every_command_before_anything_is_written(capsys, tmp_path, monkeypatch):
    """engine.refs' "missing" (a one-part name, ``outputs/x`` beside outputs/, three parts): train, evaluate and
    export each exit 2 with one line naming it. Train says it before making the run folder, also for a random-init
    run, which loads no base and used to fail only at its first checkpoint."""
    from engine.export import main as export_main

    repo = os.getcwd()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for name in ("run1", "outputs/run1", "a/b/c"):
        rc, line = _evaluate(capsys, "--model", name, "--data", DEV)
        assert rc == 2 and f"model not found: {name}" in line
        assert export_main(["--model", name, "--out", str(tmp_path / "exp")]) == 2
        assert f"model not found: {name}" in _one_line(capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ["outputs"]
    monkeypatch.chdir(repo)
    for key, value in (("model.name_or_path", "run1"), ("model.tokenizer", "a/b/c"), ("model.adapters", "[nope]")):
        r = _train(f"{key}={value}", f"output_dir={tmp_path / 'run'}")
        assert r.returncode == 2 and "model not found" in _one_line(r.stderr) and key in r.stderr
        assert not os.path.exists(tmp_path / "run")


def test_model_path_check_lets_hub_ids_and_aliases_through(tmp_path, monkeypatch):
    from engine.encoder import ModelPathError, check_model_path

    monkeypatch.chdir(tmp_path)
    check_model_path("smollm2-135m")  # the engine's alias (engine.assets)
    check_model_path("McGill-NLP/LLM2Vec-Tiny")  # a hub id: the hub answers for it
    (tmp_path / "outputs").mkdir()
    with pytest.raises(ModelPathError, match="model not found"):
        check_model_path("outputs/missing")  # its first part is a local folder: a missing local path


class _StubEncoder:
    """engine.Encoder for engine.evaluate without a model: ``loads`` counts the loads; the cosines are the test's."""
    loads, source, pooling = 0, None, "mean"

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        cls.loads += 1
        return cls()


@pytest.fixture
def stub_model(tmp_path, monkeypatch):
    """A --model folder that passes the path check, an Encoder that loads nothing, and ``set(cosines)``."""
    import numpy as np

    import engine
    import engine.evaluate

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    monkeypatch.setattr(_StubEncoder, "loads", 0)
    monkeypatch.setattr(engine, "Encoder", _StubEncoder, raising=False)
    cos = {"cos": np.linspace(0.1, 0.9, 5)}
    monkeypatch.setattr(engine.evaluate, "sts_cosines", lambda enc, pairs, *a, **k: cos["cos"][:len(pairs)])

    def set_cosines(values):
        cos["cos"] = np.asarray(values, dtype=np.float64)

    return str(tmp_path / "model"), set_cosines


def _sts(path, golds):
    with open(path, "w") as f:
        for i, g in enumerate(golds):
            f.write(f"main-news\tMSRvid\t2012test\t{i:04d}\t{g}\tA man plays {i}.\tA man is playing {i}.\n")
    return str(path)


@pytest.mark.parametrize("case,message", [
    ("one_pair", "1 pair(s), but a rank correlation needs at least 3"),
    ("two_pairs_bootstrap", "2 pair(s), but a rank correlation needs at least 3"),
    ("one_gold_score", "every one of its 4 pairs has the gold score 2.5, so a rank correlation with them is undefined"),
    ("nan_gold", "nan.csv:2: score 'nan' is not a finite number"),
    ("nan_compare", "other.tsv:4: cosine 'nan' is not finite"),
    ("scores_folder_missing", "its folder"),
    ("negative_seed", "--seed -1: the bootstrap's seed must be >= 0"),
    ("scores_empty", "--scores an empty path"),
    ("compare_empty", "--compare: an empty path"),
    ("scores_unwritable", "cannot be written"),
    ("device_bad", "--device 'foo': not a device"),
    ("device_cuda", "--device 'cuda:7': "),
])
def test_evaluate_checks_pairs_files_and_seed_before_the_model_loads(capsys, tmp_path, stub_model, case, message):
    """Each used to fail after the model had loaded, with a traceback (exit 1); --scores in a missing folder only
    after the whole evaluation, losing its result."""
    from engine.data import read_sts
    from engine.evaluate import write_scores

    model, _ = stub_model
    five = _sts(tmp_path / "five.csv", [0.0, 1.5, 2.0, 3.5, 5.0])
    args = {
        "one_pair": ["--data", _sts(tmp_path / "one.csv", [3.0])],
        "two_pairs_bootstrap": ["--data", _sts(tmp_path / "two.csv", [1.0, 3.0]), "--bootstrap", "200"],
        "one_gold_score": ["--data", _sts(tmp_path / "flat.csv", [2.5] * 4)],
        "nan_gold": ["--data", _sts(tmp_path / "nan.csv", [1.0, "nan", 2.0, 4.0]), "--bootstrap", "200"],
        "nan_compare": ["--data", five, "--compare", str(tmp_path / "other.tsv")],
        "scores_folder_missing": ["--data", five, "--scores", str(tmp_path / "nodir" / "x.tsv")],
        "negative_seed": ["--data", five, "--bootstrap", "200", "--seed", "-1"],
        "scores_empty": ["--data", five, "--scores", ""],  # was a silent success with no scores written
        "compare_empty": ["--data", five, "--compare", ""],
        # /proc takes no new file even for root, whose mode-bit check (os.access) passed: said after the evaluation
        "scores_unwritable": ["--data", five, "--scores", "/proc/llm2vec-scores.tsv"],
        "device_bad": ["--data", five, "--device", "foo"],  # a traceback once the model had loaded
        "device_cuda": ["--data", five, "--device", "cuda:7"],
    }[case]
    write_scores(tmp_path / "other.tsv", read_sts(five), [0.1, 0.2, float("nan"), 0.4, 0.5])
    rc, line = _evaluate(capsys, "--model", model, *args)
    assert rc == 2 and message in line and _StubEncoder.loads == 0, line
    assert not os.path.exists(tmp_path / "nodir")


def test_evaluate_model_cosines_that_are_not_finite_are_one_line(capsys, tmp_path, stub_model):
    """NaN cosines are the model's fault, not the input's: one line naming them, exit 1, no traceback; the
    --scores file still keeps them."""
    model, set_cosines = stub_model
    data = _sts(tmp_path / "five.csv", [0.0, 1.5, 2.0, 3.5, 5.0])
    set_cosines([0.1, float("nan"), 0.3, float("nan"), 0.5])
    rc, line = _evaluate(capsys, "--model", model, "--data", data, "--bootstrap", "200",
                         "--scores", str(tmp_path / "s.tsv"))
    assert rc == 1 and "cosine is not finite for 2 of 5 pairs (the first: pair 1)" in line
    assert _StubEncoder.loads == 1 and (tmp_path / "s.tsv").read_text().count("\tnan\n") == 2


def test_evaluate_prints_undefined_figures_as_json_null(capsys, tmp_path, stub_model):
    """Constant cosines have no rank correlation: the JSON says null, not a bare NaN that strict readers refuse."""
    import json

    model, set_cosines = stub_model
    data = _sts(tmp_path / "five.csv", [0.0, 1.5, 2.0, 3.5, 5.0])
    set_cosines([0.5] * 5)
    from engine.evaluate import main

    assert main(["--model", model, "--data", data, "--bootstrap", "200"]) == 0
    out = capsys.readouterr().out

    def refuse(name):
        raise AssertionError(f"bare {name} in {out}")

    res = json.loads(out, parse_constant=refuse)
    assert res["spearman"] is None and res["pearson"] is None and res["spearman_ci"]["ci"] == [None, None]
