"""The 7B recipe's own configs run for real at tiny width: each stage's file with ``model.random_init`` (the same
model family, a few layers of width 64), a short schedule and the shipped sample data, chained as the README's
commands chain them (MNTP adapter -> SimCSE, MNTP adapter -> supervised on the E5-layout sample)."""
import json
import os

import pytest

from .helpers import ROOT, STS, run_cmd

pytestmark = pytest.mark.slow


def tiny_overrides(config, out, adapters=()):
    from engine.config import load_config
    from engine.modeling import architecture_config

    cfg = load_config(os.path.join(ROOT, config))
    family = architecture_config(cfg.model)[0].model_type  # from the shipped config.json values, offline
    init = {"model_type": family, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "seed": 0}
    # text stages: STS-B sentences (wikitext / Wiki1M are not shipped); supervised: the E5-layout sample
    data = os.path.join(ROOT, "data", "e5-sample") if cfg.stage == "supervised" else os.path.join(STS, "sts-train.csv")
    return [f"model.random_init={json.dumps(init)}", "model.tokenizer=smollm2-135m", "model.dtype=fp32",
            f"model.adapters=[{','.join(adapters)}]", f"data={data}", "eval_data=[]", "eval_every=0",
            f"output_dir={out}", "max_steps=2", "save_every=0", "batch_size=4", "micro_batch_size=4",
            "max_samples=0" if cfg.stage == "supervised" else "max_samples=64", "max_seq_len=64", "contrastive.max_len=32", "contrastive.grad_cache_chunk=4",
            "progress_bar=false"]


def _train(config, out, adapters=()):
    r = run_cmd(["python", "engine/train.py", "--config", config, *tiny_overrides(config, out, adapters)], timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors"))
    return r


def test_mistral_7b_recipe_runs_at_tiny_width(tmp_path):
    mntp = str(tmp_path / "mntp")
    _train("configs/mistral-7b/mntp.yaml", mntp)
    _train("configs/mistral-7b/simcse.yaml", str(tmp_path / "simcse"), [os.path.join(mntp, "adapter")])
    sup = str(tmp_path / "supervised")
    _train("configs/mistral-7b/supervised.yaml", sup, [os.path.join(mntp, "adapter")])
    import yaml

    with open(os.path.join(sup, "config.yaml")) as f:
        ran = yaml.safe_load(f)
    # the recipe's own hyper-parameters are the ones that ran (only width, data and schedule length overridden)
    assert (ran["learning_rate"], ran["warmup_steps"], ran["lr_decay_epochs"], ran["contrastive"]["temperature"]) == \
        (2e-4, 300, 3, 0.02)
    assert ran["data"] == [os.path.join(ROOT, "data", "e5-sample")]
