"""Encoder: invariance to batch size and padding side, save -> load -> encode, LLM2Vec layouts, evaluate CLI."""
import json
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from engine import Encoder
from engine.config import ModelConfig
from engine.modeling import load_tokenizer

from .helpers import STS, run_cmd, tiny_llama_config

TEXTS = ["A man is playing a guitar.", "Dogs.", "Three children are playing football in a large green park today.",
         "The stock market fell sharply on Monday after the announcement.", "Hi"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(name_or_path="smollm2-135m"))


def _save_base(path, tok, seed=0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok), hidden_size=48, num_attention_heads=4,
                                               num_key_value_heads=2))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def _save_adapter(base_model, path, base_name, seed):
    torch.manual_seed(seed)
    peft = get_peft_model(base_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    peft.save_pretrained(path)
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = base_name
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    return peft


@pytest.mark.parametrize("pooling", ["mean", "weighted_mean", "eos", "bos"])
def test_encode_invariant_to_batch_size_and_padding_side(tmp_path, tok, pooling):
    base = str(tmp_path / "base")
    _save_base(base, tok)
    enc = Encoder.from_pretrained(base, pooling=pooling, device="cpu")
    ref = enc.encode(TEXTS, batch_size=1, convert_to_tensor=True)
    assert ref.dtype == torch.float32 and ref.shape == (5, 48)
    for bs in (2, 5):
        for side in ("left", "right"):
            out = enc.encode(TEXTS, batch_size=bs, padding_side=side, convert_to_tensor=True)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    np_out = enc.encode(TEXTS, convert_to_numpy=True, normalize=True)
    assert np_out.dtype.name == "float32" and abs(float((np_out ** 2).sum(1).mean()) - 1) < 1e-5
    with_instr = enc.encode(TEXTS[:2], instruction="Represent the sentence: ", convert_to_tensor=True)
    assert (with_instr - ref[:2]).abs().max() > 1e-4  # attended instruction changes the embedding
    with pytest.raises(ValueError, match="empty"):
        enc.encode([])


def test_llm2vec_style_chain_base_mntp_supervised(tmp_path, tok):
    base, mntp, sup = (str(tmp_path / n) for n in ("base", "mntp", "sup"))
    model = _save_base(base, tok)
    p1 = _save_adapter(model, mntp, base, seed=1)
    merged = p1.merge_and_unload()
    _save_adapter(merged, sup, mntp, seed=2)
    with open(os.path.join(sup, "llm2vec_config.json"), "w") as f:
        json.dump({"pooling_mode": "eos_token", "max_length": 32}, f)
    enc = Encoder.from_pretrained(sup, device="cpu")
    assert enc.pooling == "eos" and enc.max_length == 32
    # Build the expected model by hand: base + mntp merged + sup merged, bidirectional.
    from engine.modeling import load_model

    ref_model, _ = load_model(ModelConfig(name_or_path=base, adapters=[mntp, sup]))
    from engine.encoding import encode_texts

    expected = encode_texts(ref_model, tok, TEXTS, pooling="eos", max_len=32)
    torch.testing.assert_close(enc.encode(TEXTS, convert_to_tensor=True), expected, atol=1e-5, rtol=0)
    plain = Encoder.from_pretrained(base, device="cpu", pooling="eos", max_length=32)
    assert (plain.encode(TEXTS, convert_to_tensor=True) - expected).abs().max() > 1e-4  # the adapters really were applied


def test_training_output_round_trip_and_evaluate_cli(tmp_path):
    out = str(tmp_path / "run")
    r = run_cmd(["python", "engine/train.py", "--config", "configs/tiny/simcse.yaml", f"output_dir={out}",
                 "max_steps=2", "save_every=0", "batch_size=8", "micro_batch_size=8", "max_samples=40"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    enc = Encoder.from_pretrained(out, device="cpu")
    enc2 = Encoder.from_pretrained(os.path.join(out, "adapter"), device="cpu")
    a, b = enc.encode(TEXTS, convert_to_tensor=True), enc2.encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(a, b)
    r = run_cmd(["python", "-m", "engine.evaluate", "--model", out, "--task", "sts", "--data", f"{STS}/sts-dev.csv"],
                timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["pairs"] == 1500 and -100 <= res["spearman"] <= 100
    bad = tmp_path / "bad.csv"
    bad.write_text("only\ttwo\n")
    r = run_cmd(["python", "-m", "engine.evaluate", "--model", out, "--task", "sts", "--data", str(bad)], timeout=300)
    assert r.returncode != 0 and "expected >= 7 tab-separated columns" in r.stderr
