"""The engine's model path with every Triton kernel against the torch references: attention, masked CE, the
contrastive loss, the fused decoder ops (RMSNorm, RoPE, GLU) and the fused LoRA projections, each switched
between its Triton and torch implementation (``OPS``).

On CPU the kernels run in the Triton interpreter in fp32 on a tiny model (the frozen LM head takes the eager
masked-CE strategy, exactly as under LoRA on a GPU). On a GPU the same step runs in bf16 (marked ``gpu``,
skipped cleanly without one; run with LLM2VEC_TEST_GPU=1 pytest -m gpu).
"""
import importlib

import pytest
import torch

import llm2vec_kernels
from engine.config import load_config
from engine.lora import fuse_lora
from engine.modeling import add_lora, load_model, load_tokenizer
from engine.stages import build_stage
from engine.trainer import EngineModule
from llm2vec_kernels import masked_ce
from .helpers import count_launches, perturb_lora_b


OPS = ("attention", "masked_ce", "contrastive", "fused_ops", "lora")  # every kernel the engine's step can take


def _loss_and_grads(module, batch, impl):
    for op in OPS:
        llm2vec_kernels.set_default_impl(op, impl)
    try:
        module.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss, _ = module(batch)
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in module.named_parameters() if p.requires_grad}
        return loss.float().item(), grads
    finally:
        for op in OPS:
            llm2vec_kernels.set_default_impl(op, "auto")


def _parity(stage_name, device, dtype, n_items, hidden, heads):
    cfg = load_config(f"configs/tiny/{stage_name}.yaml", [
        f"model.dtype={dtype}", "model.gradient_checkpointing=false", "lora.dropout=0.0",
        f"model.random_init={{model_type: llama, hidden_size: {hidden}, intermediate_size: {2 * hidden}, "
        f"num_hidden_layers: 2, num_attention_heads: {heads}, num_key_value_heads: 2, max_position_embeddings: 512, "
        "seed: 0}"])
    tok = load_tokenizer(cfg.model)
    stage = build_stage(cfg, tok)
    # Synthetic text (the GPU machine has no shared/ data): varied lengths, in the stage's item format.
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "music", "green", "quick"]

    def sentence():
        return " ".join(words[i] for i in torch.randint(0, 10, (int(torch.randint(4, 40, (1,), generator=g)),),
                                                        generator=g).tolist())

    if stage_name == "supervised":
        items = [{"query": sentence(), "positive": sentence(), "negatives": [sentence()], "instruction": "Find: ",
                  "source": "s"} for _ in range(8)]
    else:
        from engine.data import chunk_documents

        items = chunk_documents([sentence() for _ in range(64)], tok, cfg.max_seq_len)
    model, _ = load_model(cfg.model, device, tok)
    model = stage.prepare_model(model)
    model = perturb_lora_b(add_lora(model, cfg.lora), 0.02)
    assert fuse_lora(model)["layers"] > 0  # as the trainer does: the grouped LoRA projections, its kernels
    module = EngineModule(model.to(device), stage).train()
    batch = stage.collate(items[:n_items], torch.Generator().manual_seed(0))
    batch.pop("truncated", None)
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    lt, gt = _loss_and_grads(module, batch, "triton")
    lr, gr = _loss_and_grads(module, batch, "torch")
    return lt, gt, lr, gr


@pytest.mark.gpu
@pytest.mark.parametrize("stage_name", ["mntp", "supervised"])
def test_engine_step_triton_matches_torch_bf16(stage_name):
    lt, gt, lr, gr = _parity(stage_name, "cuda", "bf16", 8, 256, 8)
    assert abs(lt - lr) <= 2e-2 * max(1.0, abs(lr)), (lt, lr)
    for name, g in gr.items():
        err = (gt[name] - g).norm() / (g.norm() + 1e-12)
        assert err < 5e-2, (name, float(err))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter variant of the GPU test above")
@pytest.mark.parametrize("stage_name", ["mntp", "supervised"])
def test_engine_step_triton_matches_torch_in_the_interpreter(stage_name, monkeypatch):
    # Wide interpreter blocks over the 49k vocabulary keep the interpreted row kernel to a few steps per row.
    monkeypatch.setitem(masked_ce._INTERP_CONFIG, "grad_rows", dict(BLOCK_V=8192, num_warps=4))
    launches = count_launches(monkeypatch, masked_ce, "_ce_grad_rows_kernel")
    norms = count_launches(monkeypatch, importlib.import_module("llm2vec_kernels.rms_norm"), "_rms_norm_fwd_kernel")
    loras = count_launches(monkeypatch, importlib.import_module("llm2vec_kernels.lora"), "_lora_down_kernel")
    lt, gt, lr, gr = _parity(stage_name, "cpu", "fp32", 4, 64, 4)
    assert (len(launches) > 0) == (stage_name == "mntp")  # the frozen LM head took the eager strategy
    assert norms and loras  # the fused decoder ops and LoRA kernels ran in the Triton pass (none in torch's)
    assert abs(lt - lr) <= 1e-4 * max(1.0, abs(lr)), (lt, lr)
    assert gr and set(gt) == set(gr)
    for name, g in gr.items():
        err = (gt[name] - g).norm() / (g.norm() + 1e-12)
        assert err < 1e-3, (name, float(err))
