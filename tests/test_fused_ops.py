"""engine/fused_ops.py: all-Triton fused norm / RoPE / GLU against all-torch, for every supported family.

A tiny random model (2 layers) per family goes through load_model (which applies model.fused_ops), the
MNTP stage and LoRA (dropout off, gradient checkpointing on); one step runs with the fused ops resolved to
Triton (interpreter, fp32) and to torch (the modules' original HF forwards), and must give the same loss and
the same LoRA gradients. Norm weights are perturbed so that the (1 + w) and w forms are really exercised.
"""
import importlib

import pytest
import torch

import llm2vec_kernels
from engine.bidirectional import SUPPORTED_ARCHITECTURES
from engine.config import ConfigError, load_config
from engine.fused_ops import apply_fused_ops
from engine.modeling import add_lora, load_model, load_tokenizer
from engine.stages import build_stage
from engine.trainer import EngineModule
from llm2vec_kernels._backend import interpreter_enabled

from .helpers import count_launches

needs_interpreter = pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (CPU tests)")

EXTRA = {
    "llama": "",
    "mistral": "sliding_window: 4096, ",
    "qwen2": "use_sliding_window: false, ",
    "qwen3": "",
    "gemma": "",
    "gemma2": "sliding_window: 4096, attn_logit_softcapping: 50.0, final_logit_softcapping: 30.0, "
              "query_pre_attn_scalar: 16, ",
    "phi3": "sliding_window: 4096, ",  # one gate_up_proj: the fused GLU splits its output
    # Phi-4-mini's partial rotary embedding: cos and sin cover 3/4 of a head, so transformers' RoPE runs, not the kernel
    "phi3-partial-rope": "rope_parameters: {rope_type: default, rope_theta: 10000.0, partial_rotary_factor: 0.75}, ",
}
# the modules (llm2vec_kernels.rms_norm etc. are the functions of the same names)
rms_mod, rope_mod, glu_mod = (importlib.import_module(f"llm2vec_kernels.{m}") for m in ("rms_norm", "rope", "glu"))
KERNELS = [(rms_mod, "_rms_norm_fwd_kernel"), (rms_mod, "_rms_norm_bwd_kernel"), (rope_mod, "_rope_kernel"),
           (glu_mod, "_glu_fwd_kernel"), (glu_mod, "_glu_bwd_kernel")]


def _step(module, batch):
    module.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss, _ = module(batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


def _tiny(model_type, fused_ops="triton", device="cpu", dtype="fp32"):
    cfg = load_config("configs/tiny/mntp.yaml", [
        f"model.dtype={dtype}", "lora.dropout=0.0", "max_seq_len=24", "model.attention=torch", "model.loss=torch",
        f"model.fused_ops={fused_ops}",
        f"model.random_init={{model_type: {model_type.split('-')[0]}, hidden_size: 64, intermediate_size: 96, "
        f"num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16, "
        f"max_position_embeddings: 256, {EXTRA[model_type]}seed: 0}}"])
    tok = load_tokenizer(cfg.model)
    stage = build_stage(cfg, tok)
    model, _ = load_model(cfg.model, device, tok)
    model = stage.prepare_model(model)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = add_lora(model, cfg.lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05, generator=g)
            elif "norm" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "music", "green", "quick"]
    docs = [" ".join(words[i] for i in torch.randint(0, 10, (int(n),), generator=g).tolist())
            for n in torch.randint(3, 30, (12,), generator=g)]
    from engine.data import chunk_documents

    items = chunk_documents(docs, tok, cfg.max_seq_len)
    batch = stage.collate(items[:3], torch.Generator().manual_seed(0))
    batch.pop("truncated", None)
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    return EngineModule(model.to(device), stage).train(), batch


@needs_interpreter
@pytest.mark.parametrize("model_type", sorted(SUPPORTED_ARCHITECTURES) + ["phi3-partial-rope"])
def test_triton_fused_ops_match_torch(model_type, monkeypatch):
    module, batch = _tiny(model_type)
    norms = [n for n, m in module.named_modules() if type(m).__name__.endswith("RMSNorm")]
    unfused = [n for n in norms if getattr(module.get_submodule(n), "_llm2vec_fused", None) != "rms_norm"]
    assert norms and not unfused, unfused  # the family table names every RMSNorm of the model
    launches = {name: count_launches(monkeypatch, mod, name) for mod, name in KERNELS}
    try:
        llm2vec_kernels.set_default_impl("fused_ops", "triton")
        lt, gt = _step(module, batch)
        n_triton = {k: len(v) for k, v in launches.items()}
        llm2vec_kernels.set_default_impl("fused_ops", "torch")
        lr, gr = _step(module, batch)
    finally:
        llm2vec_kernels.set_default_impl("fused_ops", "auto")
    n_layers, n_norms = 2, len(SUPPORTED_ARCHITECTURES[model_type.split("-")[0]]["fused_ops"]["layer_norms"])
    # forward + checkpoint recompute of every norm / MLP / RoPE, one backward each (the final norm is not
    # recomputed: it sits outside the checkpointed layers)
    assert n_triton["_rms_norm_fwd_kernel"] == 2 * n_layers * n_norms + 1, n_triton
    assert n_triton["_rms_norm_bwd_kernel"] == n_layers * n_norms + 1, n_triton
    assert n_triton["_rope_kernel"] == (0 if "partial" in model_type else 3 * n_layers), n_triton
    assert n_triton["_glu_fwd_kernel"] == 2 * n_layers and n_triton["_glu_bwd_kernel"] == n_layers, n_triton
    assert all(len(v) == n_triton[k] for k, v in launches.items()), "the torch run launched Triton kernels"
    assert abs(lt - lr) <= 1e-5 * max(1.0, abs(lr)), (lt, lr)
    assert gt.keys() == gr.keys() and len(gr) > 0 and all("lora_" in n for n in gr)
    for name, g in gr.items():
        assert g.norm() > 0, name
        err = float((gt[name] - g).norm() / g.norm())
        assert err < 1e-4, (name, err)


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2"])
def test_gpu_bf16_triton_fused_ops_match_torch(model_type):
    module, batch = _tiny(model_type, device="cuda", dtype="bf16")
    try:
        llm2vec_kernels.set_default_impl("fused_ops", "triton")
        lt, gt = _step(module, batch)
        llm2vec_kernels.set_default_impl("fused_ops", "torch")
        lr, gr = _step(module, batch)
    finally:
        llm2vec_kernels.set_default_impl("fused_ops", "auto")
    assert abs(lt - lr) <= 2e-2 * max(1.0, abs(lr)), (lt, lr)
    for name, g in gr.items():
        err = float((gt[name].float() - g.float()).norm() / (g.float().norm() + 1e-12))
        assert err < 5e-2, (name, err)


def test_torch_setting_patches_nothing_and_auto_keeps_hf_forwards_on_cpu():
    module, _ = _tiny("qwen3", fused_ops="torch")
    assert not any("forward" in vars(m) for m in module.modules())
    ids = torch.randint(0, 100, (2, 7))
    try:
        with torch.no_grad():
            ref = module.model(input_ids=ids).logits
        counts = apply_fused_ops(module.model, "auto")
        # qwen3: 4 norms per layer (input, post-attention, q, k) + the final norm; the MLPs; RoPE once
        assert counts["rms_norm"] == 2 * 4 + 1 and counts["glu"] == 2 and counts["rope"] == 1, counts
        assert sum("forward" in vars(m) for m in module.modules()) == 2 * 4 + 1 + 2
        assert apply_fused_ops(module.model, "auto")["rms_norm"] == 0  # idempotent
        with torch.no_grad():
            out = module.model(input_ids=ids).logits
        assert torch.equal(out, ref)  # "auto" on CPU runs transformers' own forwards
    finally:
        llm2vec_kernels.set_default_impl("fused_ops", "auto")


def test_models_of_a_fused_family_still_pickle():
    """Sending a model to another process (engine.multi_device) pickles it, and pickle sends a function by its
    module and name, checking that the name still leads to it. transformers 5.2 keeps each attention module's RoPE
    function as ``rotary_fn``: once _patch_rope had put its wrapper under transformers' name, no model of that family,
    fused or not, could be pickled. The original now pickles by a route that any process resolves to its own
    unpatched function (engine.fused_ops._ORIGINAL_ROPE)."""
    import pickle
    import sys

    from transformers import LlamaForCausalLM

    from .helpers import tiny_llama_config

    plain = LlamaForCausalLM(tiny_llama_config())  # built before its family's RoPE is patched
    fused = LlamaForCausalLM(tiny_llama_config())
    try:
        assert apply_fused_ops(fused, "auto")["rope"] == 1
    finally:
        llm2vec_kernels.set_default_impl("fused_ops", "auto")
    for model in (plain, fused):
        assert pickle.dumps(model)
    name = type(fused.model.layers[0].self_attn).__module__
    wrapper = sys.modules[name].apply_rotary_pos_emb
    assert getattr(wrapper, "_llm2vec_fused") == "rope"
    from engine.fused_ops import _ORIGINAL_ROPE

    assert getattr(_ORIGINAL_ROPE, name.replace(".", ":")) is wrapper.__wrapped__
    if isinstance(wrapper.__wrapped__, type(wrapper)):  # a plain function (not the kernels package's module form)
        assert pickle.loads(pickle.dumps(wrapper.__wrapped__)) is wrapper.__wrapped__


def test_config_key():
    assert load_config("configs/tiny/mntp.yaml").model.fused_ops == "auto"
    assert load_config("configs/tiny/mntp.yaml", ["model.fused_ops=triton"]).model.fused_ops == "triton"
    with pytest.raises(ConfigError, match="model.fused_ops"):
        load_config("configs/tiny/mntp.yaml", ["model.fused_ops=liger"])


def test_rms_norm_wider_than_the_kernel_limit_keeps_torch():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from engine.fused_ops import _patch_norm

    limit = importlib.import_module("llm2vec_kernels.rms_norm").MAX_H
    skipped = set()
    wide, ok = LlamaRMSNorm(limit + 1), LlamaRMSNorm(limit)
    assert _patch_norm(wide, "llama", skipped) is False and "forward" not in vars(wide) and skipped
    assert _patch_norm(ok, "llama", set()) is True and "forward" in vars(ok)


def _fp64_calls():
    from llm2vec_kernels.glu import glu, glu_reference
    from llm2vec_kernels.lora import lora_group, lora_group_reference
    from llm2vec_kernels.rms_norm import rms_norm, rms_norm_reference
    from llm2vec_kernels.rope import rope, rope_reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    w = torch.randn(16, generator=g, dtype=torch.float64)
    q, k = torch.randn(1, 4, 5, 16, generator=g, dtype=torch.float64), torch.randn(1, 2, 5, 16, generator=g,
                                                                                    dtype=torch.float64)
    cos, sin = torch.randn(1, 5, 16, generator=g, dtype=torch.float64), torch.randn(1, 5, 16, generator=g,
                                                                                    dtype=torch.float64)
    lw, la, lb = ([torch.randn(8, 16, generator=g, dtype=torch.float64)], [torch.randn(2, 16, generator=g,
                  dtype=torch.float64)], [torch.randn(8, 2, generator=g, dtype=torch.float64)])
    return {"rms_norm": (lambda **kw: rms_norm(x, w, 1e-6, **kw), lambda: rms_norm_reference(x, w, 1e-6)),
            "glu": (lambda **kw: glu(x, w.expand_as(x), **kw), lambda: glu_reference(x, w.expand_as(x))),
            "rope": (lambda **kw: rope(q, k, cos, sin, **kw), lambda: rope_reference(q, k, cos, sin)),
            "lora": (lambda **kw: lora_group(x, lw, la, lb, 2.0, **kw),
                     lambda: lora_group_reference(x, lw, la, lb, 2.0))}


@pytest.mark.parametrize("op", ["rms_norm", "glu", "rope", "lora"])
def test_fp64_runs_the_reference_under_torch_and_auto_and_is_refused_by_triton_alone(op, monkeypatch):
    """fp64 (which the kernels do not take) raised TypeError even with impl="torch", and under impl="auto" on a
    CUDA tensor, though each op's reference computes it; attention, masked CE and contrastive already ran it."""
    from llm2vec_kernels import _backend

    call, reference = _fp64_calls()[op]
    want = reference()
    for impl in ("torch", "auto"):
        monkeypatch.setattr(_backend, "_on_cuda", lambda t: True)  # auto as on a GPU
        got = call(impl=impl)
        monkeypatch.undo()
        seq = (tuple, list)
        for a, b in zip(got if isinstance(got, seq) else (got,), want if isinstance(want, seq) else (want,)):
            assert a.dtype == torch.float64
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    if interpreter_enabled():
        with pytest.raises(TypeError):
            call(impl="triton")
