"""``model.adapters``: adapters in llm2vec's layout (keyed on the bare decoder) merge into training's causal LM."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from engine.modeling import ModelLoadError, merge_adapter

from .helpers import tiny_llama_config


def _causal_lm():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config(), dtype=torch.float32)


def _write_adapter(folder, prefix, targets, r=4, alpha=8, seed=1):
    """A PEFT LoRA adapter folder whose tensor keys start with ``prefix``: llm2vec saves on the bare decoder
    (``base_model.model.layers.0...``), the engine on the causal LM (``base_model.model.model.layers.0...``)."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out_f, in_f) in targets.items():
        sd[f"{prefix}{name}.lora_A.weight"] = torch.randn(r, in_f, generator=g)
        sd[f"{prefix}{name}.lora_B.weight"] = torch.randn(out_f, r, generator=g)
    save_file(sd, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "down_proj"],
                   "base_model_name_or_path": "tiny", "fan_in_fan_out": False, "task_type": None}, f)
    return sd


TARGETS = {"layers.0.self_attn.q_proj": (32, 32), "layers.1.mlp.down_proj": (32, 64)}


@pytest.mark.parametrize("prefix", ["base_model.model.", "base_model.model.model."], ids=["llm2vec", "engine"])
def test_adapter_merges_into_the_causal_lm(tmp_path, prefix):
    model = _causal_lm()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sd = _write_adapter(str(tmp_path / "a"), prefix, TARGETS)
    merged = merge_adapter(model, str(tmp_path / "a"))
    assert merged is model
    after = dict(model.named_parameters())
    for name in TARGETS:
        w = f"model.{name}.weight"
        delta = (sd[f"{prefix}{name}.lora_B.weight"] @ sd[f"{prefix}{name}.lora_A.weight"]) * (8 / 4)
        assert not torch.equal(after[w], before[w])
        torch.testing.assert_close(after[w], before[w] + delta)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {f"model.{n}.weight" for n in TARGETS}  # nothing else moved


def test_adapter_matching_no_weight_is_an_error(tmp_path):
    model = _causal_lm()
    _write_adapter(str(tmp_path / "a"), "base_model.model.", {"encoder.block.0.q": (32, 32)})
    with pytest.raises(ModelLoadError, match="does not exist in the model"):
        merge_adapter(model, str(tmp_path / "a"))


def test_adapter_of_another_shape_is_an_error(tmp_path):
    model = _causal_lm()
    _write_adapter(str(tmp_path / "a"), "base_model.model.", {"layers.0.self_attn.q_proj": (64, 32)})
    with pytest.raises(ModelLoadError, match="has shape"):
        merge_adapter(model, str(tmp_path / "a"))


def test_the_readme_names_the_merge_the_encoder_and_training_call(monkeypatch, tmp_path):
    """README: one function folds the adapters, ``engine.modeling.merge_loras`` (merge_lora is its one-adapter
    wrapper), at alpha/r or alpha/sqrt(r) under rsLoRA."""
    import engine.encoder
    import engine.modeling

    readme = " ".join(open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md"),
                           encoding="utf-8").read().split())
    assert "(W += alpha/r · B A, alpha/√r under rsLoRA) by one function, `engine.modeling.merge_loras`" in readme
    calls = []
    monkeypatch.setattr(engine.modeling, "merge_loras", lambda model, folders: calls.append(folders) or [2])
    _write_adapter(str(tmp_path / "a"), "base_model.model.", TARGETS)
    engine.modeling.merge_lora(_causal_lm().model, str(tmp_path / "a"))
    assert calls == [[str(tmp_path / "a")]]


def test_encoder_and_training_merge_the_same_way(tmp_path):
    # The encoder (a bare decoder) and training (a causal LM) fold one llm2vec adapter into equal weights.
    from engine.modeling import merge_lora

    _write_adapter(str(tmp_path / "a"), "base_model.model.", TARGETS)
    lm = _causal_lm()
    bare = _causal_lm().model
    merge_adapter(lm, str(tmp_path / "a"))
    assert merge_lora(bare, str(tmp_path / "a")) == 2
    for name in TARGETS:
        torch.testing.assert_close(dict(lm.named_parameters())[f"model.{name}.weight"],
                                   dict(bare.named_parameters())[f"{name}.weight"])


def test_cli_exits_2_when_the_adapter_merges_nothing(tmp_path):
    from .helpers import run_cmd

    _write_adapter(str(tmp_path / "a"), "base_model.model.", {"encoder.block.0.q": (32, 32)})
    r = run_cmd(["python", "engine/train.py", "--config", "configs/tiny/mntp.yaml", f"output_dir={tmp_path / 'o'}",
                 f"model.adapters=[{tmp_path / 'a'}]", "max_steps=1"], timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "could not merge adapter" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]


def test_a_run_started_from_a_hub_adapter_names_it_by_its_hub_id(tmp_path):
    # The chain an encoder follows: a published llm2vec adapter stays a hub id (it was made a local path before);
    # a local one becomes absolute.
    from peft import get_peft_model_state_dict

    from engine.config import load_config
    from engine.modeling import add_lora, load_tokenizer
    from engine.checkpoint import write_adapter

    local = tmp_path / "mntp"
    local.mkdir()
    hub = "McGill-NLP/LLM2Vec-Mistral-7B-Instruct-v2-mntp"
    cfg = load_config("configs/tiny/supervised.yaml", [f"model.adapters=[{local},{hub}]"])
    model = add_lora(_causal_lm(), cfg.lora)
    sd = get_peft_model_state_dict(model)
    write_adapter(model, sd, str(tmp_path / "adapter"), cfg, load_tokenizer(cfg.model))
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == hub
    with open(tmp_path / "adapter" / "engine_encoder.json") as f:
        assert json.load(f)["prior_adapters"] == [str(local), hub]


@pytest.mark.parametrize("how", ["config", "tensor"])
def test_an_adapter_with_a_lora_bias_is_refused_not_merged_without_it(tmp_path, how):
    """PEFT's lora_bias puts a bias on B (``lora_B.bias``); merging only A and B would drop it silently."""
    from safetensors.torch import load_file

    folder = str(tmp_path / "a")
    sd = _write_adapter(folder, "base_model.model.", TARGETS)
    if how == "tensor":
        sd["base_model.model.layers.0.self_attn.q_proj.lora_B.bias"] = torch.ones(32)
        save_file(sd, os.path.join(folder, "adapter_model.safetensors"))
        assert "base_model.model.layers.0.self_attn.q_proj.lora_B.bias" in load_file(
            os.path.join(folder, "adapter_model.safetensors"))
    else:
        with open(os.path.join(folder, "adapter_config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(dict(cfg, lora_bias=True), f)
    with pytest.raises(ModelLoadError, match="lora_bias|is not a LoRA weight"):
        merge_adapter(_causal_lm(), folder)


def test_training_merges_a_chain_with_one_rounding_as_the_encoder_and_export_do(tmp_path):
    """A later stage trains on the weights that are served: ``load_model`` folds a chain of earlier adapters into
    a bf16 model with one rounding per weight (``merge_loras``), bit for bit what the encoder and the export
    get, not one rounding per adapter."""
    from types import SimpleNamespace

    from engine.config import ModelConfig
    from engine.modeling import load_model, merge_loras

    spec = dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, seed=0)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _write_adapter(a, "base_model.model.model.", TARGETS, seed=1)
    _write_adapter(b, "base_model.model.model.", TARGETS, seed=2)
    class Tok(SimpleNamespace):
        def __len__(self):
            return 128

    tok = Tok(pad_token_id=0)

    def load(adapters=()):
        return load_model(ModelConfig(random_init=spec, dtype="bf16", bidirectional=False, adapters=list(adapters)),
                          tokenizer=tok)[0]

    trained_on = dict(load([a, b]).named_parameters())
    served = load()
    merge_loras(served, [a, b])
    stepwise = load()
    merge_loras(stepwise, [a])
    merge_loras(stepwise, [b])
    served, stepwise = dict(served.named_parameters()), dict(stepwise.named_parameters())
    names = [f"model.{n}.weight" for n in TARGETS]
    for n in names:
        assert trained_on[n].dtype == torch.bfloat16
        assert torch.equal(trained_on[n], served[n]), n
    assert any(not torch.equal(served[n], stepwise[n]) for n in names)  # the rounding the test tells apart


def test_an_adapter_config_without_lora_alpha_merges_with_peft_default(tmp_path):
    """PEFT's loader fills a missing ``lora_alpha`` with LoraConfig's default (8): the merge reads it the same way,
    so a hand-written config merges to the model PEFT would load."""
    from peft import LoraConfig

    folder = str(tmp_path / "a")
    sd = _write_adapter(folder, "base_model.model.", TARGETS, r=2)
    with open(os.path.join(folder, "adapter_config.json")) as f:
        cfg = json.load(f)
    cfg.pop("lora_alpha")
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    model = _causal_lm()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merge_adapter(model, folder)
    scale = LoraConfig().lora_alpha / 2
    for name in TARGETS:
        delta = (sd[f"base_model.model.{name}.lora_B.weight"] @ sd[f"base_model.model.{name}.lora_A.weight"]) * scale
        torch.testing.assert_close(dict(model.named_parameters())[f"model.{name}.weight"],
                                   before[f"model.{name}.weight"] + delta)


@pytest.mark.parametrize("record,refused", [
    ({"model_type": "mistral"}, True),                          # a run's record: trained on another family
    ({"random_init": {"model_type": "qwen2", "seed": 0}}, True),  # a random test base's spec, before the key
    ({"model_type": "llama"}, False),
    ({}, False),                                                # a record that names no family: not checked
    (None, False),                                              # a plain PEFT adapter: no record
])
def test_an_adapter_recorded_on_another_family_is_refused_though_its_shapes_fit(tmp_path, record, refused):
    """Mistral-7B's and Llama-3-8B's projections have the same names and shapes: an adapter of one merged silently
    into the other. The engine records the family it trained (engine_encoder.json model_type; random_init for a random
    test base) and refuses a merge into another, before any weight moves."""
    model = _causal_lm()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    folder = str(tmp_path / "a")
    _write_adapter(folder, "base_model.model.model.", TARGETS)
    if record is not None:
        with open(os.path.join(folder, "engine_encoder.json"), "w") as f:
            json.dump({"format": "llm2vec-engine/1", **record}, f)
    if refused:
        with pytest.raises(ModelLoadError, match=r"the adapter was trained on a (mistral|qwen2) model; this model is "
                                                 r"a llama"):
            merge_adapter(model, folder)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    else:
        merge_adapter(model, folder)
        assert not torch.equal(dict(model.named_parameters())["model.layers.0.self_attn.q_proj.weight"],
                               before["model.layers.0.self_attn.q_proj.weight"])
