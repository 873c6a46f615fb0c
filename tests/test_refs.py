"""engine.refs: one reading of a model or adapter name, shared by training, encode, evaluate and the export."""
import json
import os
import shutil
import sys

import pytest

from engine import assets, refs

from .helpers import ROOT, STS, run_cmd


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A working folder holding a model folder, a GGUF file and an ``outputs/`` folder, with HOME in it too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLM2VEC_ENGINE_CACHE", str(tmp_path / "cache"))
    for folder in (tmp_path / "home" / "models" / "m", tmp_path / "models" / "m"):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    (tmp_path / "w.gguf").write_bytes(b"GGUF")
    (tmp_path / "home" / "w.gguf").write_bytes(b"GGUF")
    (tmp_path / "outputs").mkdir()
    return tmp_path


NAMES = [
    ("smollm2-135m", "alias"),
    ("models/m", "local"), ("./models/m", "local"), ("~/models/m", "local"), ("w.gguf", "local"),
    ("~/w.gguf", "local"),
    ("mistralai/Mistral-7B-Instruct-v0.2", "hub"), ("McGill-NLP/LLM2Vec-Tiny", "hub"), ("Qwen/Qwen2.5-0.5B", "hub"),
    ("a_b/c.d-e", "hub"),
    ("outputs/run1", "missing"),  # beside outputs/: a mistyped run, not user "outputs"
    ("run1", "missing"), ("gpt2", "missing"),  # one part: a path (the hub's legacy names have org/name forms)
    ("./org/name", "missing"), ("/org/name", "missing"), ("~/org/name", "missing"), ("a/b/c", "missing"),
    ("org--x/name", "missing"), ("org/na..me", "missing"), (".org/name", "missing"), ("org/name-", "missing"),
    ("org/na me", "missing"), ("org/", "missing"), ("o/" + "n" * 95, "missing"),
]


@pytest.mark.parametrize("name,expected", NAMES)
def test_kind(here, name, expected):
    assert refs.kind(name) == expected
    assert refs.is_local(name) == (expected in ("local", "missing"))


def test_a_local_path_is_made_absolute_and_found_from_any_folder(here, monkeypatch):
    path = refs.local_path("models/m")
    assert os.path.isabs(path) and path == str(here / "models" / "m")
    assert refs.local_path("~/models/m") == str(here / "home" / "models" / "m")
    monkeypatch.chdir(here / "outputs")
    # from elsewhere the relative name reads as a hub id, which is why a run records the absolute path
    assert refs.kind(path) == "local" and refs.kind("models/m") == "hub"


def test_hub_id_of(here):
    assert refs.hub_id_of("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert refs.hub_id_of("mistralai/Mistral-7B-Instruct-v0.2") == "mistralai/Mistral-7B-Instruct-v0.2"
    assert refs.hub_id_of("outputs/run1") is None and refs.hub_id_of(None) is None and refs.hub_id_of("") is None
    assert refs.hub_id_of("models/m") is None  # a folder that does not say where it came from

    def folder(rel, name_or_path):
        (here / rel).mkdir(parents=True)
        (here / rel / "config.json").write_text(json.dumps({"_name_or_path": name_or_path}))
        return str(here / rel)

    # config.json's _name_or_path (what llm2vec reads) when it is a hub id, and not when it is a path
    assert refs.hub_id_of(folder("saved", "meta-llama/Meta-Llama-3-8B-Instruct")) == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert refs.hub_id_of(folder("resaved", str(here / "saved"))) is None
    assert refs.hub_id_of(folder("rel", "models/m")) is None  # names a folder that exists here
    # a huggingface_hub cache snapshot says its id in its path, whatever its config.json holds
    snap = folder("hub/models--mistralai--Mistral-7B-Instruct-v0.2/snapshots/0123abc", None)
    assert refs.hub_id_of(snap) == "mistralai/Mistral-7B-Instruct-v0.2"
    assert refs.hub_id_of(snap + "/") == "mistralai/Mistral-7B-Instruct-v0.2"
    # the engine's cached copy of an alias is that alias's hub model
    assert refs.hub_id_of(folder("cache/smollm2-135m/hf", None)) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for bad in ("{broken", "[1, 2]"):  # a config.json that does not read is named, not a bare JSON error
        (here / "models" / "m" / "config.json").write_text(bad)
        with pytest.raises(ValueError, match=r"models/m/config.json does not read as a model config.json"):
            refs.hub_id_of("models/m")


@pytest.mark.parametrize("name,expected", NAMES)
def test_every_reader_reads_a_name_the_same_way(here, name, expected):
    """resolve_model_path (training and encode load through it), check_model_path (evaluate's early check),
    resolve_ref (adapters), the checkpoint's adapter reference and the export's labels all follow engine.refs."""
    from engine.encoder import ModelPathError, check_model_path, resolve_ref
    from engine.export import _adapter_label
    from engine.modeling import resolve_model_path

    if expected == "missing":
        with pytest.raises(FileNotFoundError, match=f"model not found: {name}"):
            resolve_model_path(name)
        with pytest.raises(ModelPathError, match="model not found"):
            check_model_path(name)
        with pytest.raises(FileNotFoundError, match="not found") as e:
            resolve_ref(name)
        beside = name == "outputs/run1"  # the one name here that only a local folder keeps from being a hub id
        assert ("outputs/ is a local folder" in str(e.value)) == beside
        assert ("neither a local path nor a hub id org/name" in str(e.value)) == (not beside)
    elif expected == "hub":
        assert resolve_model_path(name) == (name, None)
        check_model_path(name)
        assert _adapter_label(name) == name
    elif expected == "local":
        path, gguf = resolve_model_path(name)
        assert os.path.isabs(path) and os.path.exists(os.path.join(path, gguf) if gguf else path)
        check_model_path(name)
        assert _adapter_label(name) == "/".join(refs.local_path(name).split(os.sep)[-2:])


def test_the_chat_wrap_and_the_card_name_the_same_base(here):
    """A local copy of an Instruct base that llm2vec wraps gets the wrap when it says which model it is, and the
    export card names that model: both come from engine.refs.hub_id_of."""
    from engine.config import ContrastiveConfig, ModelConfig, TrainConfig
    from engine.encoding import training_wrap
    from engine.export import _base_names

    hub = "mistralai/Mistral-7B-Instruct-v0.2"
    snap = here / "hf" / "models--mistralai--Mistral-7B-Instruct-v0.2" / "snapshots" / "41b61a3"
    copy = here / "mistral-copy"
    plain = here / "mistral-plain"
    for folder, said in ((snap, None), (copy, hub), (plain, None)):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"_name_or_path": said}))
    for folder, wrap, names in ((snap, "inst", (hub, hub)), (copy, "inst", ("mistral-copy", hub)),
                                (plain, None, ("mistral-plain", None)), (hub, "inst", (hub, hub))):
        cfg = TrainConfig(stage="supervised", model=ModelConfig(name_or_path=str(folder)),
                          contrastive=ContrastiveConfig(chat="auto"))
        assert training_wrap(cfg) == wrap
        assert _base_names({"base": str(folder), "engine_meta": {}}) == names


def test_a_run_started_elsewhere_records_its_relative_local_base_absolute(tmp_path):
    """A base named relative to where the run started is recorded absolute in the adapter (``engine_encoder.json``
    and PEFT's ``adapter_config.json``), so the adapter loads from any folder. Random-init: only the name is read."""
    (tmp_path / "models" / "base").mkdir(parents=True)
    shutil.copy(os.path.join(assets.fetch("smollm2-135m", quiet=True), "config.json"), tmp_path / "models" / "base")
    r = run_cmd([sys.executable, os.path.join(ROOT, "engine", "train.py"), "--config",
                 os.path.join(ROOT, "configs", "tiny", "mntp.yaml"), "model.name_or_path=models/base", "output_dir=out",
                 "max_steps=2", "save_every=0", "eval_every=0", f"data={STS}/sts-dev.csv",
                 f"eval_data={STS}/sts-test.csv"], cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    adapter = tmp_path / "out" / "adapter"
    recorded = (json.loads((adapter / "engine_encoder.json").read_text())["base_model"],
                json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert recorded == (str(tmp_path / "models" / "base"),) * 2
