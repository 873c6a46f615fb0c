"""engine.files: a whole-file write is seen whole or not at all, and a failed one leaves the old file."""
import json
import os

import pytest

from engine.files import atomic_open, write_json, write_text


def _listing(folder):
    return sorted(os.listdir(folder))


def test_write_json_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    p = str(tmp_path / "run.json")
    write_json(p, {"step": 1})
    write_json(p, {"step": 2, "x": [1.5]}, indent=1)
    text = open(p).read()
    assert json.loads(text) == {"step": 2, "x": [1.5]} and text.endswith("}\n") and '\n "step"' in text
    assert _listing(tmp_path) == ["run.json"]


def test_a_reader_sees_the_old_file_until_the_block_ends(tmp_path):
    p = str(tmp_path / "latest")
    write_text(p, "step_0000010")
    with atomic_open(p) as f:
        f.write("step_0000020")
        f.flush()
        assert open(p).read() == "step_0000010"
    assert open(p).read() == "step_0000020" and _listing(tmp_path) == ["latest"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    p = str(tmp_path / "metrics.csv")
    write_text(p, "step,loss\n1,2.0\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_open(p, newline="") as f:
            f.write("step,loss\n")
            raise RuntimeError("disk full")
    with pytest.raises(TypeError):
        write_json(p, {"bad": object()})  # JSON cannot hold it: raised before any file is opened
    assert open(p).read() == "step,loss\n1,2.0\n" and _listing(tmp_path) == ["metrics.csv"]


def test_a_new_file_that_fails_is_never_made(tmp_path):
    p = str(tmp_path / "scores.tsv")
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(p) as f:
            f.write("pair\tgold\tcosine\n")
            raise KeyboardInterrupt
    assert _listing(tmp_path) == []


def test_binary_writes_and_appends_refused(tmp_path):
    p = str(tmp_path / "blob")
    with atomic_open(p, "wb") as f:
        f.write(b"\x00\x01")
    assert open(p, "rb").read() == b"\x00\x01"
    with pytest.raises(ValueError, match="whole files"):
        with atomic_open(p, "a"):
            pass


def test_sync_tree_fsyncs_the_files_it_is_asked_for_and_every_folder(tmp_path, monkeypatch):
    """A checkpoint's COMPLETE promises its state files are on disk: sync_tree fsyncs them (DeepSpeed writes with
    plain torch.save) and the folders holding them."""
    from engine import files

    (tmp_path / "sub").mkdir()
    for name in ("zero_pp_rank_1_optim.pt", "zero_pp_rank_0_optim.pt", "sub/adapter.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    files.sync_tree(str(tmp_path), only=lambda name: "zero_pp_rank_1_" in name or name.endswith(".safetensors"))
    assert sorted(synced) == sorted([str(tmp_path / "zero_pp_rank_1_optim.pt"), str(tmp_path / "sub" / "adapter.safetensors"),
                                     str(tmp_path), str(tmp_path / "sub")])


def test_an_adapter_write_leaves_safetensors_readable_by_other_accounts(tmp_path):
    """engine.checkpoint.write_adapter: safetensors 0.8 writes 0600 whatever the umask; under umask 022 the adapter
    a run hands to evaluate, export or another account is 0644 (engine.files.share_safetensors)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from engine.checkpoint import write_adapter
    from engine.config import TrainConfig

    from .helpers import tiny_llama_config

    class Tok:
        def save_pretrained(self, folder):
            write_json(os.path.join(folder, "tokenizer_config.json"), {})

    torch.manual_seed(0)
    peft = get_peft_model(LlamaForCausalLM(tiny_llama_config()), LoraConfig(r=2, target_modules=["q_proj"]))
    cfg = TrainConfig()
    cfg.model.random_init = True
    old = os.umask(0o022)
    try:
        write_adapter(peft, None, str(tmp_path / "adapter"), cfg, Tok())
    finally:
        os.umask(old)
    modes = {n: oct(os.stat(tmp_path / "adapter" / n).st_mode & 0o777) for n in os.listdir(tmp_path / "adapter")
             if n.endswith(".safetensors")}
    assert modes == {"adapter_model.safetensors": oct(0o644)}, modes
