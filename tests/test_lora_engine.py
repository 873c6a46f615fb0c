"""engine.lora: PEFT's LoRA layers swapped for grouped fused ones; same losses and LoRA grads, same adapter."""
import copy

import pytest
import torch

import engine.lora as elora
from engine.config import LoraConfig
from engine.lora import fuse_lora
from engine.memory import enable_recompute
from engine.modeling import add_lora, describe_lora_targets, lora_targets

from .helpers import perturb_lora_b, tiny_llama_config


def _model(family, dropout, seed=0):
    from transformers import AutoModelForCausalLM, Phi3Config, Qwen2Config

    torch.manual_seed(seed)
    if family == "qwen2":  # q/k/v carry biases
        cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    elif family == "phi3":  # one qkv_proj, one gate_up_proj
        cfg = Phi3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=None, bos_token_id=1, eos_token_id=2)
    else:
        cfg = tiny_llama_config()
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model = add_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout))
    return perturb_lora_b(model, 0.1)  # LoRA B starts at zero; non-zero B, so A gets gradients too


def _loss_and_grads(model, ids, seed=5):
    torch.manual_seed(seed)
    out = model(input_ids=ids).logits
    loss = out.float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_fused_lora_matches_peft_with_dropout_off(family, impl, monkeypatch):
    model = _model(family, dropout=0.0).train()
    fused = copy.deepcopy(model)
    info = fuse_lora(fused, impl)
    # per layer: q/k/v, o, gate/up, down; Phi3's default targets are its 4 projections, each a group of one
    projections = 4 if family == "phi3" else 7
    assert info == {"groups": 8, "layers": 2 * projections}
    calls = []
    real = elora.lora_group
    monkeypatch.setattr(elora, "lora_group", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    l0, g0 = _loss_and_grads(model, ids)
    l1, g1 = _loss_and_grads(fused, ids)
    # q/k/v read their input once per layer, gate/up too (in one Linear on Phi3)
    assert sorted(calls) == ([1] * 8 if family == "phi3" else [1, 1, 1, 1, 2, 2, 3, 3])
    assert torch.allclose(l0, l1, rtol=1e-5, atol=1e-7)
    assert g0.keys() == g1.keys() and len(g0) == 4 * projections  # names unchanged: the adapter stays a PEFT one
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-6), n
    from peft import get_peft_model_state_dict

    assert get_peft_model_state_dict(model).keys() == get_peft_model_state_dict(fused).keys()


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_fused_lora_dropout_replays_under_recompute(policy, monkeypatch):
    """LoRA dropout on: with recompute the masks are regenerated identically (same loss, same grads)."""
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    plain = _model("llama", dropout=0.2)
    fuse_lora(plain, "torch")
    plain.train()
    ckpt = copy.deepcopy(plain)
    enable_recompute(ckpt, policy)
    ckpt.train()
    calls = []
    real = elora.lora_group
    monkeypatch.setattr(elora, "lora_group", lambda *a, **k: calls.append(1) or real(*a, **k))
    l0, g0 = _loss_and_grads(plain, ids)
    assert len(calls) == 8
    l1, g1 = _loss_and_grads(ckpt, ids)
    assert len(calls) == 8 + 16  # the recompute really ran the layers again
    assert torch.equal(l0, l1)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-6, atol=1e-8), n
    l2, _ = _loss_and_grads(plain, ids, seed=6)  # the dropout is real: another seed, another loss
    assert not torch.equal(l0, l2)


@pytest.mark.parametrize("policy", ["none", "full", "selective"])
def test_no_gradient_for_the_first_layers_input_under_any_recompute(policy, monkeypatch):
    """The input embeddings are frozen, so autograd asks no grad x of the first layer's q/k/v group (the fused
    backward then skips its base GEMMs): transformers' gradient checkpointing hooks the embeddings to require grad,
    which only the reentrant checkpoint needs, and enable_recompute removes that hook. Every LoRA gradient stays
    that of the run without recompute."""
    from llm2vec_kernels import lora as klora

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    plain = _model("llama", dropout=0.0)
    fuse_lora(plain, "torch")
    model = copy.deepcopy(plain)
    enable_recompute(model, policy)
    plain.train(), model.train()
    asked = []
    real = klora._LoraGroupFn.backward
    monkeypatch.setattr(klora._LoraGroupFn, "backward",
                        staticmethod(lambda ctx, *g: asked.append((ctx.n, ctx.needs_input_grad[0])) or real(ctx, *g)))
    _, g0 = _loss_and_grads(plain, ids)
    asked.clear()
    _, g1 = _loss_and_grads(model, ids)
    # backward order: layer 1's down, gate/up, o, q/k/v, then layer 0's; only layer 0's q/k/v input is frozen
    assert asked == [(1, True), (2, True), (1, True), (3, True), (1, True), (2, True), (1, True), (3, False)], asked
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-6, atol=1e-8), n


def test_fused_lora_falls_back_when_adapters_disabled():
    model = _model("llama", dropout=0.0).eval()
    fused = copy.deepcopy(model)
    fuse_lora(fused, "torch")
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), model.disable_adapter(), fused.disable_adapter():
        assert torch.equal(model(input_ids=ids).logits, fused(input_ids=ids).logits)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, fused(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_a_lora_bias_layer_falls_back_to_peft_not_fused_without_its_bias():
    """PEFT's ``lora_bias`` adds a bias on B that the fused op does not compute: such layers run PEFT's forward."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_llama_config(), dtype=torch.float32)
    model = get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                                lora_bias=True))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    model.eval()
    fused = copy.deepcopy(model)
    fuse_lora(fused, "torch")
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_fused_ops_triton_refuses_a_group_rank_one_tile_cannot_hold_when_fusing():
    """``model.fused_ops=triton`` holds a group's summed rank in one tile (at most 128): q/k/v at r=48 sum to 144,
    a config error when the model is fused (before the engine starts), where ``auto`` takes the torch path."""
    from transformers import AutoModelForCausalLM

    from engine.config import ConfigError

    def model(r):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(tiny_llama_config(hidden_size=64, intermediate_size=128),
                                             dtype=torch.float32)
        return add_lora(m, LoraConfig(r=r, alpha=8, dropout=0.0))

    with pytest.raises(ConfigError, match=r"q_proj\+k_proj\+v_proj of model\.layers\.0\.self_attn.*144.*at most 42"):
        fuse_lora(model(48), "triton")
    assert fuse_lora(model(48), "auto")["groups"] > 0
    assert fuse_lora(model(42), "triton")["groups"] > 0  # 126 fits


def test_the_train_cli_checks_the_triton_rank_before_any_weight_loads():
    """``engine.train``'s offline pre-load check fuses on the meta model: SmolLM2's q/k/v at r=64 (192) is a
    ConfigError (exit 2) before the weights load; r=32 (96) passes."""
    from engine.config import ConfigError, load_config
    from engine.train import check_targets_offline

    cfg = load_config("configs/smollm2-135m/mntp.yaml", ["model.fused_ops=triton", "lora.r=64"])
    with pytest.raises(ConfigError, match="sums to 192"):
        check_targets_offline(cfg)
    check_targets_offline(load_config("configs/smollm2-135m/mntp.yaml", ["model.fused_ops=triton", "lora.r=32"]))


def test_fused_lora_on_a_bf16_base_is_as_close_to_fp32_as_peft_is():
    """The dtype setup a real run starts in: a bf16 base, where PEFT keeps its adapters in fp32 and computes the
    low-rank path in fp32, while the fused op casts A and B to the input's bf16. Against the same model in fp32,
    the fused path's LoRA gradients and loss are within a small multiple of PEFT's own bf16 error."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_llama_config(hidden_size=64, intermediate_size=128),
                                            dtype=torch.float32)
    ref = perturb_lora_b(add_lora(base, LoraConfig(r=8, alpha=16, dropout=0.0)), 0.05,
                         torch.Generator().manual_seed(2)).train()
    peft16 = copy.deepcopy(ref)
    for n, p in peft16.named_parameters():
        if "lora_" not in n:
            p.data = p.data.to(torch.bfloat16)
    assert {p.dtype for n, p in peft16.named_parameters() if "lora_" in n} == {torch.float32}
    fused16 = copy.deepcopy(peft16)
    fuse_lora(fused16, "torch")
    ids = torch.randint(0, 128, (2, 23), generator=torch.Generator().manual_seed(1))
    l_ref, g_ref = _loss_and_grads(ref, ids)
    l_peft, g_peft = _loss_and_grads(peft16, ids)
    l_fused, g_fused = _loss_and_grads(fused16, ids)

    def err(g):
        num = sum((g[n].float() - g_ref[n]).pow(2).sum() for n in g_ref)
        return (num / sum(g_ref[n].pow(2).sum() for n in g_ref)).sqrt().item()

    e_peft, e_fused = err(g_peft), err(g_fused)
    assert 0 < e_peft < 0.05 and e_fused < 2 * e_peft, (e_peft, e_fused)
    assert abs(l_fused - l_ref) <= 2 * abs(l_peft - l_ref) + 1e-3 * abs(l_ref), (l_ref, l_peft, l_fused)


def test_add_lora_refuses_a_target_the_model_lacks_rather_than_dropping_it():
    # as a library call too (the CLI and the dry run check before loading): a mistyped name among real ones used
    # to be dropped, and the run trained fewer projections than its config and adapter_config said
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_llama_config(), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"lora.target_modules \['qproj'\] name no Linear module of 'llama'"):
        add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["qproj", "v_proj"]))
    peft = add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    assert sorted(peft.peft_config["default"].target_modules) == ["q_proj", "v_proj"]


def test_the_default_targets_adapt_phi3s_fused_projections_and_a_part_alone_is_refused():
    """Phi3 computes q, k, v in one qkv_proj (weight [W_q; W_k; W_v]) and gate, up in one gate_up_proj. The default
    targets (Llama's names) resolve to those modules, so a recipe adapts the same weights on Phi3; the adapter
    records the modules' own names. q_proj without k_proj and v_proj is refused (LoRA on qkv_proj adapts all three
    rows' weights; a plain LoRA adapter cannot hold the q rows alone); a module's own name is taken as it is."""
    default = LoraConfig().target_modules
    assert lora_targets(default, "phi3") == {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "o_proj": ["o_proj"],
                                             "gate_up_proj": ["gate_proj", "up_proj"], "down_proj": ["down_proj"]}
    assert describe_lora_targets(default, "phi3") == ("qkv_proj (q_proj, k_proj, v_proj), o_proj, gate_up_proj "
                                                      "(gate_proj, up_proj), down_proj")
    assert list(lora_targets(default, "llama")) == default and describe_lora_targets(default, "llama") == \
        ", ".join(default)
    assert list(lora_targets(["qkv_proj", "down_proj"], "phi3")) == ["qkv_proj", "down_proj"]
    assert lora_targets(["qkv_proj", "q_proj"], "phi3") == {"qkv_proj": ["qkv_proj", "q_proj"]}  # the module named
    model = _model("phi3", dropout=0.0)
    assert sorted(model.peft_config["default"].target_modules) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    with pytest.raises(ValueError, match=r"names gate_proj without up_proj: phi3 computes gate_proj, up_proj in one "
                                         r"Linear, gate_up_proj .* name all of gate_proj, up_proj \(or gate_up_proj\)"):
        add_lora(model.get_base_model(), LoraConfig(r=4, alpha=8, target_modules=["gate_proj", "down_proj"]))


def test_the_run_says_which_modules_its_lora_adapts(tmp_path):
    """The run's LoRA line names the modules adapted (engine.trainer.setup_model), and the memory plan counts their
    LoRA: r (in + out) per module, qkv_proj H -> Q + 2 KV and gate_up_proj H -> 2I on Phi3."""
    from engine.config import load_config
    from engine.modeling import load_model, load_tokenizer
    from engine.stages import build_stage
    from engine.trainer import setup_model

    cfg = load_config("configs/tiny/mntp.yaml", [
        "model.random_init={model_type: phi3, hidden_size: 32, intermediate_size: 48, num_hidden_layers: 1, "
        "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64, seed: 0}",
        f"output_dir={tmp_path}"])
    tok = load_tokenizer(cfg.model)
    model, _ = load_model(cfg.model, "cpu", tok)
    lines = []
    model, plan, _ = setup_model(cfg, build_stage(cfg, tok), model, 1, 1, torch.device("cpu"), log=lines.append)
    assert ("fused LoRA (auto): 4 projections in 4 groups; targets qkv_proj (q_proj, k_proj, v_proj), o_proj, "
            "gate_up_proj (gate_proj, up_proj), down_proj") in lines, lines
    H, Q, KV, I, r = 32, 32, 16, 48, cfg.lora.r
    assert plan.trainable_params == r * ((H + Q + 2 * KV) + (Q + H) + (H + 2 * I) + (I + H))
