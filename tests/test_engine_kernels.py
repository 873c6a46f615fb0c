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


def _parity(stage_name, device, dtype, n_items, hidden, heads, between=lambda: None):
    """(Triton loss, grads, torch loss, grads); ``between`` runs after the Triton pass."""
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
    between()
    lr, gr = _loss_and_grads(module, batch, "torch")
    return lt, gt, lr, gr


def _count_kernels(monkeypatch, stage_name):
    """Launch lists of the kernels each op takes on this stage's step (the frozen LM head's masked CE on MNTP, the
    contrastive loss on supervised): a Triton pass must launch each, a torch pass none."""
    kernels = [("llm2vec_kernels.attention.flash", "_attn_fwd"), ("llm2vec_kernels.rms_norm", "_rms_norm_fwd_kernel"),
               ("llm2vec_kernels.lora", "_lora_down_kernel"),
               ("llm2vec_kernels.masked_ce", "_ce_grad_rows_kernel") if stage_name == "mntp"
               else ("llm2vec_kernels.contrastive", "_contrastive_fwd_kernel")]
    return {name: count_launches(monkeypatch, importlib.import_module(mod), name) for mod, name in kernels}


def _check_launches(counts, after_triton):
    assert all(after_triton.values()), after_triton  # each kernel ran in the Triton pass
    grew = {name: len(grids) - after_triton[name] for name, grids in counts.items() if len(grids) > after_triton[name]}
    assert not grew, f"the torch pass launched Triton kernels: {grew}"


@pytest.mark.gpu
@pytest.mark.parametrize("stage_name", ["mntp", "supervised"])
def test_engine_step_triton_matches_torch_bf16(stage_name, monkeypatch):
    counts, after_triton = _count_kernels(monkeypatch, stage_name), {}
    lt, gt, lr, gr = _parity(stage_name, "cuda", "bf16", 8, 256, 8,
                             between=lambda: after_triton.update({n: len(g) for n, g in counts.items()}))
    _check_launches(counts, after_triton)
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
    counts, after_triton = _count_kernels(monkeypatch, stage_name), {}
    lt, gt, lr, gr = _parity(stage_name, "cpu", "fp32", 4, 64, 4,
                             between=lambda: after_triton.update({n: len(g) for n, g in counts.items()}))
    # every op's kernel ran in the Triton pass (MNTP's frozen LM head: the eager masked-CE strategy), none in torch's
    _check_launches(counts, after_triton)
    assert abs(lt - lr) <= 1e-4 * max(1.0, abs(lr)), (lt, lr)
    assert gr and set(gt) == set(gr)
    for name, g in gr.items():
        err = (gt[name] - g).norm() / (g.norm() + 1e-12)
        assert err < 1e-3, (name, float(err))


@pytest.mark.parametrize("arch,auto", [(70, "torch"), (75, "torch"), (80, "triton"), (86, "triton"), (90, "triton")])
def test_auto_takes_triton_from_sm_80_only(monkeypatch, arch, auto):
    """"auto" runs a Triton kernel on GPUs whose launch configs are compile-checked (sm_80 and later); on a T4
    (sm_75) the attention configs ask for more shared memory than the card has, so every op family, attention's
    dispatch included, takes the torch path there unless impl="triton" is asked for. (A CUDA tensor is stood in
    for by an object with its fields; the capability query is stubbed.)"""
    import types

    from llm2vec_kernels import _backend
    from llm2vec_kernels.attention import dispatch

    monkeypatch.setattr(_backend, "cuda_arch", lambda index: arch)
    fake = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.bfloat16)
    for op in ("masked_ce", "contrastive", "fused_ops", "lora"):
        assert _backend.resolve_impl(op, "auto", fake) == auto
        assert _backend.resolve_impl(op, "triton", fake) == "triton"
    call = dispatch.AttentionCall(impl="auto", device_type="cuda", arch=arch, dtype=torch.bfloat16, head_dim=128,
                                  layout="varlen")
    assert dispatch.choose_backend(call) == auto
    assert dispatch.choose_backend(dispatch.AttentionCall(**{**call.__dict__, "impl": "triton"})) == "triton"
