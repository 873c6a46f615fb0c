import glob
import os

import pytest

from engine.config import ConfigError, deepspeed_config, grad_accum_steps, load_config

from .helpers import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def test_there_are_configs():
    names = {os.path.relpath(p, os.path.join(ROOT, "configs")) for p in CONFIGS}
    for need in ("tiny/mntp.yaml", "tiny/simcse.yaml", "tiny/supervised.yaml", "smollm2-135m/mntp.yaml",
                 "smollm2-135m/simcse.yaml", "smollm2-135m/supervised.yaml", "mistral-7b/mntp.yaml",
                 "llama3-8b/mntp.yaml", "llama2-7b/mntp.yaml"):
        assert need in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_loads_and_takes_the_standard_overrides(path):
    cfg = load_config(path, ["max_steps=20", "data=some/file.txt", "output_dir=/tmp/x"])
    assert cfg.max_steps == 20 and cfg.data == ["some/file.txt"] and cfg.output_dir == "/tmp/x"
    ds = deepspeed_config(cfg, world_size=1, use_bf16=True)
    assert "auto" not in repr(ds)
    assert ds["train_batch_size"] == cfg.batch_size
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] == cfg.batch_size


def test_paper_settings():
    m = load_config(os.path.join(ROOT, "configs/mistral-7b/mntp.yaml"))
    assert (m.mntp.mask_prob, m.mntp.scheme, m.max_steps, m.batch_size, m.max_seq_len) == (0.8, "all", 1000, 32, 512)
    for name in ("llama3-8b", "llama2-7b"):
        c = load_config(os.path.join(ROOT, f"configs/{name}/mntp.yaml"))
        assert (c.mntp.mask_prob, c.mntp.scheme) == (0.2, "bert")
        assert c.data == ["hf:wikitext:wikitext-103-raw-v1:train"]


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'max_step'.*did you mean 'max_steps'"):
        load_config(None, ["model.name_or_path=x", "max_step=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'lora.rr'.*'lora.r'"):
        load_config(None, ["model.name_or_path=x", "lora.rr=3"])


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stage: mntp\nmodel: {name_or_path: x, atention: torch}\n")
    with pytest.raises(ConfigError, match=r"model.atention.*model.attention"):
        load_config(str(p))


def test_bad_values():
    with pytest.raises(ConfigError, match="expects an integer"):
        load_config(None, ["model.name_or_path=x", "max_steps=abc"])
    with pytest.raises(ConfigError, match="stage must be one of"):
        load_config(None, ["model.name_or_path=x", "stage=pretrain"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent.yaml")
    with pytest.raises(ConfigError, match="model.name_or_path is required"):
        load_config(None, [])


def test_batch_not_divisible_by_world():
    cfg = load_config(None, ["model.name_or_path=x", "batch_size=32", "micro_batch_size=4"])
    assert grad_accum_steps(cfg, 2) == 4
    with pytest.raises(ConfigError, match=r"batch_size 32 is not divisible by micro_batch_size 4 x world size 3"):
        grad_accum_steps(cfg, 3)


def test_list_override_and_nested():
    cfg = load_config(None, ["model.name_or_path=x", "data=a.txt,b.txt", "lora.target_modules=[q_proj, v_proj]",
                             "model.adapters=one"])
    assert cfg.data == ["a.txt", "b.txt"] and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.adapters == ["one"]
