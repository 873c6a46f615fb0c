"""engine.memory against measurement: the bytes each recompute policy saves per decoder layer, counted with
saved-tensor hooks (unique storages), next to the plan's formulas; the selective policy's cache; and the plans
for the shipped 7B configs on an 80 GB card and on an H200.

A decoder layer runs as on a GPU: Triton attention, and on the fused paths Triton RMSNorm / RoPE / GLU and the
fused LoRA's Triton kernel, with every Triton launch skipped (only the shapes of what autograd keeps matter), and
dropout dispatched as CUDA does (one ``native_dropout``, which keeps a bool mask). Full size on the meta device
(Mistral-7B's per-token shape), small size on real CPU tensors. Bytes per token are the slope between two token
counts, so per-layer constants (the concatenated LoRA A of each group) do not count as per-token bytes.
"""
import contextlib
import dataclasses
import json
import os

import pytest
import torch

import llm2vec_kernels
from engine.config import load_config
from engine.lora import fuse_lora
from engine.memory import (GIB, activation_bytes, choose_recompute, choose_zero_stage, fused_lora_limit, layer_shape,
                           lora_rank, plan_memory, selective_context_fn, selective_recompute_supported)
from engine.modeling import add_lora, load_model, shipped_architecture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Architectures of the shipped 7B configs (values of their HF config.json files; no hub here)
MISTRAL_7B = dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=32768, sliding_window=None, tie_word_embeddings=False)
LLAMA2_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 tie_word_embeddings=False)
LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_theta=500000.0, tie_word_embeddings=False)
SHIPPED = {"mistral-7b": MISTRAL_7B, "llama2-7b": LLAMA2_7B, "llama3-8b": LLAMA3_8B}
SMALL = dict(MISTRAL_7B, vocab_size=256, hidden_size=64, intermediate_size=224, head_dim=16, num_attention_heads=4,
             num_key_value_heads=2)
# (fused_ops, LoRA fused with impl, or PEFT's layers) per path of engine.memory.PATHS
PATH_SETUP = {"fused": ("triton", "triton"), "fused-torch": ("torch", "torch"), "peft": ("triton", None),
              "peft-torch": ("torch", None)}
# total_memory as the cards report it: H100 SXM 80 GB (81559 MiB), H200 (143771 MiB)
CARDS = {"80 GB": 81559 / 1024, "H200": 143771 / 1024}


@pytest.fixture(autouse=True)
def _restore_impl_defaults():
    saved = dict(llm2vec_kernels._backend._DEFAULTS)
    yield
    llm2vec_kernels._backend._DEFAULTS.update(saved)


@contextlib.contextmanager
def gpu_like():
    """Triton launches skipped (the interpreter's launcher returns at once) and dropout as CUDA dispatches it."""
    from triton.runtime.interpreter import InterpretedFunction
    import torch.nn.functional as F

    run, dropout = InterpretedFunction.run, F.dropout

    def cuda_dropout(x, p=0.5, training=True, inplace=False):
        return torch.ops.aten.native_dropout(x, p, True)[0] if training and p > 0 else x

    InterpretedFunction.run = lambda self, *a, grid, warmup, **k: None
    F.dropout = torch.nn.modules.dropout.F.dropout = cuda_dropout
    try:
        yield
    finally:
        InterpretedFunction.run = run
        F.dropout = torch.nn.modules.dropout.F.dropout = dropout


class _Tok:
    pad_token_id = eos_token_id = 0
    eos_token = "</s>"

    def __len__(self):  # load_model's default vocab size; the architectures here set theirs
        return 0

    def __bool__(self):
        return True



@pytest.fixture(autouse=True)
def _torch_linear(monkeypatch):
    """Measure with torch's own F.linear unless a test says otherwise. An in-process ZeRO-3 engine (another
    test's) replaces torch.nn.functional.linear process-wide with DeepSpeed's memory-efficient linear ("This will
    persist unless manually reset"), which saves more on the PEFT path (``zero3_linear`` in engine/memory.py,
    measured below)."""
    monkeypatch.setattr(torch.nn.functional, "linear", torch._C._nn.linear)


def build(arch, path, device, layers=1, overrides=(), config="configs/mistral-7b/mntp.yaml"):
    """(cfg, model): ``arch`` with random weights on ``device``, LoRA from ``config``, set up as ``path`` runs."""
    fused_ops, lora_impl = PATH_SETUP[path]
    spec = dict(arch, num_hidden_layers=layers, seed=0)
    dtype = "bf16" if device == "meta" else "fp32"
    cfg = load_config(os.path.join(ROOT, config), [
        f"model.random_init={json.dumps(spec)}", f"model.dtype={dtype}", "model.attention=triton",
        f"model.fused_ops={fused_ops}", "mntp.mask_token=eos", *overrides])
    llm2vec_kernels.set_default_impl("attention", "triton")
    with torch.device(device):
        model, _ = load_model(cfg.model, "cuda", _Tok())
    model = add_lora(model, cfg.lora)
    if lora_impl is not None:
        fuse_lora(model, lora_impl)
    return cfg, model.train()


def _key(t):
    return t.untyped_storage()._cdata


def saved_bytes(model, policy, tokens):
    """Bytes one decoder layer keeps for backward after its forward on ``tokens`` tokens, under ``policy``:
    what saved-tensor hooks see packed (policy none), else the checkpoint's inputs and the selective cache. Unique
    storages; parameters and the RoPE tables (one per model) are not counted."""
    from engine.memory import enable_recompute

    base = model.get_base_model()
    if policy == "none":
        base.gradient_checkpointing_disable()
    else:
        enable_recompute(model, policy)
    layer = base.model.layers[0]
    dev, dt = base.model.embed_tokens.weight.device, base.model.embed_tokens.weight.dtype
    x = torch.randn(1, tokens, base.config.hidden_size, device=dev, dtype=dt, requires_grad=True)
    cos, sin = base.model.rotary_emb(x, torch.arange(tokens, device=dev)[None])
    skip = {_key(p) for p in base.parameters()} | {_key(cos), _key(sin)}
    seen = {}

    def note(t):
        if isinstance(t, torch.Tensor) and _key(t) not in skip:
            seen[_key(t)] = t.untyped_storage().nbytes()

    caches = []
    if policy != "none":
        ckpt = layer._gradient_checkpointing_func

        def recording(fn, *args, **kw):
            for a in (*args, *kw.values()):
                note(a)  # the checkpoint keeps its inputs for the recompute
            context_fn = ckpt.keywords.get("context_fn")
            if context_fn is None:
                return ckpt(fn, *args, **kw)

            def keep_context():
                fwd, recompute = context_fn()
                caches.append(fwd)
                return fwd, recompute
            return ckpt.func(fn, *args, **{**ckpt.keywords, "context_fn": keep_context}, **kw)
        layer._gradient_checkpointing_func = recording

    def pack(t):
        note(t)
        return t

    with gpu_like(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=None, position_embeddings=(cos, sin))
    for mode in caches:  # torch's selective-checkpoint cache: {op key: {call index: wrapped outputs}}
        for calls in mode.storage.values():
            for entry in calls.values():
                for leaf in torch.utils._pytree.tree_leaves(entry):
                    note(getattr(leaf, "val", None))
    return sum(seen.values())


def measured_per_token(model, policy, tokens=(128, 256)):
    lo, hi = (saved_bytes(model, policy, t) for t in tokens)
    return (hi - lo) / (tokens[1] - tokens[0])


@pytest.mark.parametrize("size", ["mistral-7b", "small"])
@pytest.mark.parametrize("path", list(PATH_SETUP))
def test_plan_formulas_match_measured_saved_bytes(size, path):
    arch, device = (MISTRAL_7B, "meta") if size == "mistral-7b" else (SMALL, "cpu")
    _, model = build(arch, path, device)
    formula = activation_bytes(layer_shape(model), path)
    measured = {p: measured_per_token(model, p) for p in ("none", "selective", "full")}
    print(f"{size} {path}: measured " + ", ".join(f"{p} {v / 1024:.2f} KiB" for p, v in measured.items())
          + " per token per layer; planned " + ", ".join(f"{p} {v / 1024:.2f}" for p, v in formula.items()))
    for p in measured:
        assert abs(formula[p] - measured[p]) <= 0.10 * measured[p], (p, formula[p], measured[p])
    assert measured["none"] > measured["selective"] > measured["full"] > 0


@pytest.mark.parametrize("size", ["mistral-7b", "small"])
def test_the_plan_costs_transformers_mlp_where_no_kernel_has_its_activation(size):
    """Exact GELU, a(g) = g Phi(g), has no GLU kernel, so fused_ops leaves the MLP in transformers' code, which
    keeps act(gate) as well as gate and up: 3 b I per token, not the kernel's 2 b I. transformers 5.17 runs
    Gemma-1's released hidden_act="gelu" so (5.25 maps it to the tanh form), and the plan, which costed the fused
    MLP, was 19% low under `none` at Gemma-7B. Here the same activation on the Mistral shape, full size and small."""
    arch, device = (MISTRAL_7B, "meta") if size == "mistral-7b" else (SMALL, "cpu")
    _, model = build(dict(arch, hidden_act="gelu"), "fused", device)
    mlp = model.get_base_model().model.layers[0].mlp
    assert "forward" not in vars(mlp) and "forward" in vars(model.get_base_model().model.norm)  # the MLP alone
    shape = layer_shape(model)
    formula = activation_bytes(shape, "fused")
    for p in ("none", "selective", "full") if selective_recompute_supported() else ("none", "full"):  # torch 2.11
        measured = measured_per_token(model, p)
        assert abs(formula[p] - measured) <= 0.02 * measured, (p, formula[p], measured)
    assert shape.torch_glu and not layer_shape(build(arch, "fused", device)[1]).torch_glu  # silu: the kernel's


def _shipped_arch(name, **changes):
    with open(shipped_architecture(name.replace("__", "/"))) as f:
        values = {k: v for k, v in json.load(f).items() if not k.startswith("_") and k != "architectures"}
    return dict(values, **changes)


# Gemma2 has four norms a layer and a query width of 4096 over a hidden size of 3584 (Gemma 1: two norms, 16 KV heads
# of 256 over a hidden size of 3072); Qwen3 normalises q and k per
# head; a sliding window shorter than the sequence sends a layer's attention to the exact torch path (Gemma2's
# first layer is a sliding one: soft-capped there too).
OTHER = {"gemma2-9b": lambda: _shipped_arch("google__gemma-2-9b-it"),
         "gemma-7b": lambda: _shipped_arch("google__gemma-7b-it"),  # multi-head: 16 KV heads, Q width 4096 > 3072
         "qwen3-8b": lambda: _shipped_arch("Qwen__Qwen3-8B"),
         "mistral-7b-window64": lambda: dict(MISTRAL_7B, sliding_window=64),
         "gemma2-9b-window64": lambda: _shipped_arch("google__gemma-2-9b-it", sliding_window=64),
         "gemma2-small": lambda: _shipped_arch("google__gemma-2-9b-it", vocab_size=256, hidden_size=48, head_dim=16,
                                                intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                                                query_pre_attn_scalar=16),
         # Phi3 makes q, k, v in one qkv_proj: the v the attention saves is a view that keeps all of [q | k | v]
         # (the kernels' path; the torch path's fp32 v is a copy in bf16, the view itself in fp32), and the default
         # LoRA targets adapt qkv_proj and gate_up_proj (one rank each). The fp32 case is wide enough that the
         # band mask the plan leaves out stays under the tolerance.
         "phi3-mini": lambda: _shipped_arch("microsoft__Phi-3-mini-4k-instruct"),
         "phi3-mini-window64": lambda: _shipped_arch("microsoft__Phi-3-mini-4k-instruct", sliding_window=64),
         "phi3-small-window64": lambda: _shipped_arch(
             "microsoft__Phi-3-mini-4k-instruct", vocab_size=256, hidden_size=384, head_dim=96, intermediate_size=384,
             num_attention_heads=4, num_key_value_heads=2, sliding_window=64, pad_token_id=None, eos_token_id=2)}


@pytest.mark.parametrize("attn_dropout", [0.0, 0.3])
@pytest.mark.parametrize("path", ["fused", "fused-torch"])
@pytest.mark.parametrize("size", list(OTHER))
def test_torch_attention_and_per_head_norms_match_measured_saved_bytes(size, path, attn_dropout):
    """The torch attention path keeps fp32 q, k, v and L x L scores per head, so a token's bytes grow with the
    sequence: saved bytes are A + L (alpha + beta L) for one sequence of L tokens, and their slope between L1 and
    L2 is alpha + beta (L1 + L2), the formula at L = L1 + L2 (on the kernels' path beta = 0)."""
    device = "cpu" if "small" in size else "meta"
    _, model = build(OTHER[size](), path, device, overrides=[f"model.attention_dropout={attn_dropout}"])
    lens = (128, 256)
    shape = layer_shape(model, seq_len=sum(lens), attn_dropout=attn_dropout > 0)
    assert shape.torch_attention == (1.0 if size.endswith("window64") else 0.0)
    assert shape.v_width == (shape.q_width + 2 * shape.kv if size.startswith("phi3") else 0)
    formula = activation_bytes(shape, path)
    for p in ("none", "selective", "full"):
        measured = measured_per_token(model, p, lens)
        assert abs(formula[p] - measured) <= 0.02 * measured, (p, formula[p], measured)


def test_the_torch_attention_path_keeps_k_and_v_once_per_kv_head():
    """flash_attention_reference stacks a group's query heads instead of repeating K and V to every query head:
    backward keeps fp32 q (4Q), k and v (4KV each) and the softmax (4nL), 16 KiB per token less than 12Q at
    Gemma2-9B's shape (16 query heads, 8 KV heads, head dim 256), as the README says."""
    n, kv_heads, D, L = 16, 8, 256, 128
    q = torch.empty(1, L, n, D, device="meta", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.empty(1, L, kv_heads, D, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    inputs, seen = {_key(t) for t in (q, k, v)}, {}

    def pack(t):
        if _key(t) not in inputs:
            seen[_key(t)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        llm2vec_kernels.flash_attention_reference(q, k, v)
    Q, KV = n * D, kv_heads * D
    assert sum(seen.values()) == L * (4 * Q + 8 * KV + 4 * n * L)
    assert 12 * Q - (4 * Q + 8 * KV) == 16 * 1024
    assert "without repeating K and V (16 KiB per token per layer less at Gemma2-9B's shape)" in " ".join(
        open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().split())


def test_the_plan_costs_the_torch_attention_path_and_says_so():
    cfg = load_config(os.path.join(ROOT, "configs", "mistral-7b", "simcse.yaml"), ["memory_budget_gb=80"])
    plan = lambda model: plan_memory(cfg, model, 8, 8, torch.device("cuda"), torch.bfloat16)  # noqa: E731
    _, gemma2 = build(OTHER["gemma2-9b"](), "fused", "meta", layers=2)
    assert plan(gemma2).torch_attention == 0.0 and "torch path" not in plan(gemma2).describe("none", 1)
    # Gemma2 alternates sliding and global layers: with a window under the 128-token SimCSE texts, half the layers
    # take the torch path, soft-capped and with attention dropout (four L x L tensors per head)
    _, windowed = build(OTHER["gemma2-9b-window64"](), "fused", "meta", layers=2)
    p = plan(windowed)
    assert p.seq_len == cfg.contrastive.max_len == 128 and p.torch_attention == 0.5
    n, L = gemma2.config.num_attention_heads, p.seq_len
    assert p.per_token("none") - plan(gemma2).per_token("none") >= 0.5 * 4 * n * L * 4
    assert "torch path in 50% of the layers (a sliding window under 128 tokens)" in p.describe("none", 1)


def test_the_plan_follows_the_attention_dispatch_where_no_kernel_runs(monkeypatch):
    """model.attention=torch, and auto on a GPU before sm_80 (where the dispatch sends no call to a kernel), run the
    exact torch attention path in every layer; auto there also runs the MNTP loss on its torch path. The plan used
    to cost both as kernels. It now asks the dispatch's own rule, costs them and says why; an explicit
    model.attention=triton there is refused (the kernels' tiles exceed sm_75's 64 KB of shared memory)."""
    from engine import memory
    from engine.dry_run import dry_run

    path = os.path.join(ROOT, "configs/mistral-7b/mntp.yaml")
    run = lambda *over: dry_run(load_config(path, list(over)), world=8, out=lines.append)["plan"]  # noqa: E731
    lines = []
    kernels = run()
    assert kernels.torch_attention == 0.0 and kernels.loss_bytes == 0 and not kernels.torch_attention_why
    forced = run("model.attention=torch")
    assert forced.torch_attention == 1.0 and forced.loss_bytes == 0  # the loss keeps its kernel
    L, n = forced.seq_len, 32
    assert L == 512 and forced.per_token("none") - kernels.per_token("none") > 4 * n * L  # fp32 scores per head
    assert any("torch path in 100% of the layers (model.attention=torch)" in x for x in lines), lines
    monkeypatch.setattr(memory, "device_arch", lambda device: 75 if device.type == "cuda" else 0)  # a T4
    lines.clear()
    t4 = run()
    assert t4.torch_attention == 1.0 and t4.per_token("none") == forced.per_token("none")
    mistral = type("TextConfig", (), {"vocab_size": 32000, "hidden_size": 4096})()  # the MNTP loss as off CUDA
    assert t4.loss_bytes == memory.mntp_torch_loss_bytes(load_config(path), mistral, torch.bfloat16,
                                                         torch.device("cpu")) > 1 * GIB
    assert any("torch path in 100% of the layers (model.attention=auto on sm_75, before sm_80)" in x
               for x in lines), lines
    assert memory.kernel_arch_error(load_config(path), torch.device("cuda")) is None  # auto: the torch path
    refused = memory.kernel_arch_error(load_config(path, ["model.attention=triton"]), torch.device("cuda"))
    assert refused.startswith("model.attention=triton needs a GPU of compute capability 8.0 or later (this one is "
                              "sm_75"), refused
    assert memory.kernel_arch_error(load_config(path, ["model.attention=triton"]), torch.device("cpu")) is None
    monkeypatch.setattr(memory, "device_arch", lambda device: 80 if device.type == "cuda" else 0)
    assert run().torch_attention == 0.0
    assert memory.kernel_arch_error(load_config(path, ["model.attention=triton"]), torch.device("cuda")) is None


def test_the_trainer_refuses_triton_attention_on_an_older_gpu_before_anything_else(monkeypatch, tmp_path):
    from engine import config as config_mod, memory, trainer

    monkeypatch.setattr(trainer, "init_distributed", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(memory, "device_arch", lambda device: 75)
    cfg = load_config(os.path.join(ROOT, "configs/tiny/mntp.yaml"),
                      [f"output_dir={tmp_path / 'run'}", "model.attention=triton"])
    with pytest.raises(config_mod.ConfigError, match="needs a GPU of compute capability 8.0 or later"):
        trainer.Trainer(cfg).setup()
    assert not (tmp_path / "run").exists()  # nothing was held or written


@pytest.mark.parametrize("key", ["attention", "loss", "fused_ops"])
def test_the_trainer_refuses_triton_kernels_off_cuda_without_the_interpreter(key, monkeypatch, tmp_path):
    """model.<key>=triton on a CPU run (no TRITON_INTERPRET) is one line before the model loads; it failed at the
    first forward with a traceback from the kernels' dispatch. The interpreter (the suite's own setting) runs them."""
    from engine import config as config_mod, memory, trainer

    cfg = load_config(os.path.join(ROOT, "configs/tiny/mntp.yaml"),
                      [f"output_dir={tmp_path / 'run'}", f"model.{key}=triton"])
    assert memory.kernel_arch_error(cfg, torch.device("cpu")) is None  # TRITON_INTERPRET=1 (conftest)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert memory.kernel_arch_error(load_config(os.path.join(ROOT, "configs/tiny/mntp.yaml")),
                                    torch.device("cpu")) is None  # auto: the torch paths
    monkeypatch.setattr(trainer, "init_distributed", lambda: torch.device("cpu"))
    with pytest.raises(config_mod.ConfigError, match=rf"^model.{key}=triton runs Triton kernels, which need a CUDA GPU "
                                                     r"\(this run is on the cpu; TRITON_INTERPRET=1"):
        trainer.Trainer(cfg).setup()
    assert not (tmp_path / "run").exists()  # nothing was held or written


@pytest.mark.parametrize("size", ["mistral-7b", "llama2-7b", "small"])
@pytest.mark.parametrize("path", ["peft", "peft-torch"])
@pytest.mark.parametrize("dropout", [0.05, 0.0])
def test_zero3_linear_term_matches_measured_saved_bytes(size, path, dropout, monkeypatch):
    """Under ZeRO-3 the model runs DeepSpeed's memory-efficient linear: measured with it in place of F.linear, the
    saved bytes are the PEFT path's formula with ``zero3_linear`` (b (2H + I) more with no recompute, unless p = 0
    and the adapters share the base's dtype, as on the small fp32 model), and torch's linear keeps the formula
    without it."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    arch, device = {"mistral-7b": (MISTRAL_7B, "meta"), "llama2-7b": (LLAMA2_7B, "meta"), "small": (SMALL, "cpu")}[size]
    _, model = build(arch, path, device, overrides=[f"lora.dropout={dropout}"])
    shape = layer_shape(model)
    plain, zero3 = activation_bytes(shape, path), activation_bytes(shape, path, zero3_linear=True)
    extra = shape.b * (2 * shape.hidden + shape.inter)
    shared = dropout == 0 and (shape.adapter_b or shape.b) == shape.b
    assert zero3["none"] - plain["none"] == (0 if shared else extra) and shape.dropout == (dropout > 0)
    assert {p: zero3[p] for p in ("selective", "full")} == {p: plain[p] for p in ("selective", "full")}
    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
    measured = {p: measured_per_token(model, p) for p in ("none", "selective", "full")}
    print(f"{size} {path} p={dropout}: measured with ZeRO-3's linear " + ", ".join(
        f"{p} {v / 1024:.2f} KiB" for p, v in measured.items()) + "; planned " + ", ".join(
        f"{p} {v / 1024:.2f}" for p, v in zero3.items()))
    for p in measured:
        assert abs(zero3[p] - measured[p]) <= 0.02 * measured[p], (p, zero3[p], measured[p])
    if not shared:  # the term is needed: the formula without it is more than 10% low
        assert measured["none"] - plain["none"] > 0.1 * plain["none"]


# ----------------------------------------------------------------------------------------------
# The selective policy's cache: what it keeps of a fused LoRA projection, in both forms of the add
# ----------------------------------------------------------------------------------------------

class _Projection(torch.autograd.Function):
    """y = x W^T + (x A^T) B^T with a frozen W, in the fused LoRA's two forms: the low-rank product formed apart and
    added by the base GEMM (``addmm(low, x, W^T)``), or the base GEMM's output taking it in place (``addmm_``)."""

    @staticmethod
    def forward(ctx, x, w, a, b, inplace):
        h = torch.mm(x, a.t())
        if inplace:
            y = torch.mm(x, w.t())
            y.addmm_(h, b.t())
        else:
            y = torch.addmm(torch.mm(h, b.t()), x, w.t())
        ctx.save_for_backward(x, h, w, a, b)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, h, w, a, b = ctx.saved_tensors
        gh = gy @ b
        return gy @ w + gh @ a, None, gh.t() @ x, gy.t() @ h, None


def _projection_step(inplace, checkpointed, r=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 32, generator=g, requires_grad=True)
    w = torch.randn(48, 32, generator=g)
    a = torch.randn(r, 32, generator=g, requires_grad=True)
    b = torch.randn(48, r, generator=g, requires_grad=True)
    caches = []

    def fn(x_):
        return torch.nn.functional.silu(_Projection.apply(x_, w, a, b, inplace))

    def context():
        fwd, rec = selective_context_fn(r)
        caches.append(fwd)
        return fwd, rec
    y = torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False, context_fn=context) if checkpointed else fn(x)
    cached = {}
    for mode in caches:
        for calls in mode.storage.values():
            for entry in calls.values():
                for leaf in torch.utils._pytree.tree_leaves(entry):
                    if isinstance(getattr(leaf, "val", None), torch.Tensor):
                        cached[_key(leaf.val)] = tuple(leaf.val.shape)
    y.pow(2).sum().backward()
    return y.detach(), [t.grad for t in (x, a, b)], sorted(cached.values())


@pytest.mark.parametrize("inplace", [False, True])
def test_selective_cache_keeps_the_output_not_the_low_rank_product(inplace):
    y0, g0, _ = _projection_step(inplace, checkpointed=False)
    y1, g1, cached = _projection_step(inplace, checkpointed=True)
    assert torch.allclose(y0, y1)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    # x A^T (K = 32 > r) and the output; never a second (8, 48) tensor for the rank-4 product h B^T
    assert cached == [(8, 4), (8, 48)]


def test_lora_rank_read_from_peft_layers():
    _, model = build(SMALL, "peft", "cpu")
    assert lora_rank(model) == 16
    assert lora_rank(torch.nn.Linear(2, 2)) == 0


# ----------------------------------------------------------------------------------------------
# The plan at 7B: auto on an 80 GB card and on an H200, checked against the measured bytes
# ----------------------------------------------------------------------------------------------

def _measured_total(plan, model_1layer, policy, stage):
    """The plan's total with its activation formula replaced by the measured bytes per token per layer."""
    none, chosen = (measured_per_token(model_1layer, p) for p in ("none", policy))
    acts = plan.tokens * (plan.layers * none if policy == "none" else (plan.layers - 1) * chosen + none)
    return plan.total(policy, stage) - plan.activations(policy, stage) + acts


@pytest.mark.parametrize("name", list(SHIPPED))
@pytest.mark.parametrize("micro", [None, 32])  # the shipped micro-batch (4 x 512), and 32 x 512 as benchmarked
def test_auto_plan_fits_measured_bytes_at_7b(name, micro):
    arch = SHIPPED[name]
    over = [] if micro is None else [f"micro_batch_size={micro}", f"batch_size={micro}"]
    config = f"configs/{name}/mntp.yaml"
    _, layer_model = build(arch, "fused", "meta", overrides=over, config=config)
    picks, limits = {}, {}
    for card, gib in CARDS.items():
        cfg, model = build(arch, "fused", "meta", layers=arch["num_hidden_layers"], config=config,
                           overrides=[*over, f"memory_budget_gb={gib}"])
        plan = plan_memory(cfg, model, world=1, local_world=1, device=torch.device("cuda"))
        stage = choose_zero_stage(cfg, plan)[0]
        policy, why = choose_recompute(cfg, plan, stage)
        assert stage == 1 and plan.path(stage) == "fused"  # a 7B bf16 base stays replicated: the fused LoRA runs
        total = _measured_total(plan, layer_model, policy, stage)
        print(f"{name} micro {cfg.micro_batch_size}, {card}: {policy} ({why}); with measured activations "
              f"{total / GIB:.1f} GiB")
        assert total <= plan.budget_bytes
        for less in ("none", "selective")[:("none", "selective", "full").index(policy)]:
            # auto took the least recompute that fits: what it passed over does not fit by measurement either
            assert _measured_total(plan, layer_model, less, stage) > plan.budget_bytes, less
        picks[card] = policy
        if name == "mistral-7b" and micro is None:  # the README's sizes that keep the fused LoRA (bf16: 2 B each)
            limits[card] = fused_lora_limit(plan) / 2
            limits[card + " start"] = (plan.budget_bytes - plan.workspace()) / 2  # the largest base that starts
    if micro is None:
        assert picks == {"80 GB": "none", "H200": "none"}
    else:  # 32 x 512 tokens: no recompute on an H200; an 80 GB card needs selective
        assert picks == {"80 GB": "selective", "H200": "none"}
    if limits:  # about 38B parameters on 80 GB and 68B on an H200 (a 69B Llama-2-70B falls back to PEFT)
        assert 36e9 < limits["80 GB"] < 40e9 and 65e9 < limits["H200"] < 69e9, limits
        # ZeRO-3 runs a base only while it fits one GPU whole at the start (MemoryPlan.startup)
        assert round(limits["80 GB start"] / 1e9) == 40 and round(limits["H200 start"] / 1e9) == 71, limits
        readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
        assert "up to about 40B parameters in bf16 on an 80 GB card and about\n71B on an H200" in readme


def test_zero3_plan_costs_peft_and_says_so():
    cfg, model = build(SMALL, "fused", "cpu", layers=2, overrides=["memory_budget_gb=0.001"])
    plan = plan_memory(cfg, model, world=4, local_world=4, device=torch.device("cuda"))
    stage, why = choose_zero_stage(cfg, plan)
    assert stage == 3 and plan.path(3) == "peft" and plan.path(1) == "fused"
    assert "PEFT" in why
    shape = layer_shape(model)
    assert plan.per_token("none", 3) == activation_bytes(shape, "peft", zero3_linear=True)["none"]
    assert plan.per_token("none", 3) > activation_bytes(shape, "peft")["none"] != plan.per_token("none", 1)


def test_readme_states_the_planned_bytes_per_path():
    """The README's per-token figures at Mistral-7B's shape are the plan's formulas (held to measurement above)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = " ".join(f.read().split())
    kib = {}
    for path in ("fused", "peft"):
        _, model = build(MISTRAL_7B, path, "meta")
        shape = layer_shape(model)
        kib[path] = {p: round(v / 1024, 1) for p, v in activation_bytes(shape, path).items()}
        if path == "peft":
            kib["zero3"] = round(activation_bytes(shape, path, zero3_linear=True)["none"] / 1024, 1)
    f, p = kib["fused"], kib["peft"]
    assert (f"on the fused path {f['none']} KiB per token per layer under `none`, {f['selective']} under "
            f"`selective`, {f['full']} under `full` (PEFT's LoRA: {p['none']} / {p['selective']} / {p['full']}, "
            f"and {kib['zero3']} under `none` with ZeRO-3's memory-efficient linear") in readme
    # the engine's ZeRO-3 run: DeepSpeed casts PEFT's fp32 adapters to bf16 at initialize, and the plan says so
    _, model = build(MISTRAL_7B, "peft", "meta")
    engine_zero3 = activation_bytes(dataclasses.replace(layer_shape(model), adapter_b=2), "peft", zero3_linear=True)
    assert (f"({round(engine_zero3['none'] / 1024, 1)} vs {f['none']} KiB per token per layer at Mistral-7B's "
            f"shape, the adapters in bf16 as DeepSpeed casts every parameter at initialize; {kib['zero3']} with "
            f"PEFT's own fp32 adapters)") in readme
    _, gemma = build(OTHER["gemma2-9b"](), "fused", "meta")
    planned = activation_bytes(layer_shape(gemma, seq_len=512), "fused")["none"] / 1024
    # Llama's terms (two norms of width H, the attention's width H): what the plan counted before
    llama_terms = dataclasses.replace(layer_shape(gemma), q_width=0, norms=())
    assert (f"Gemma2-9B plans {planned:.1f} KiB per token per layer under `none` (measured "
            f"{measured_per_token(gemma, 'none') / 1024:.1f}), where Llama's terms gave "
            f"{activation_bytes(llama_terms, 'fused')['none'] / 1024:.1f}") in readme


def test_the_zero3_plan_counts_the_adapters_in_the_runs_dtype():
    """PEFT keeps adapters in fp32 over a bf16 base, but DeepSpeed casts every parameter to bf16 at initialize: the
    PEFT layers under ZeRO-3 then keep bf16 inputs. The plan read the fp32 adapters before initialize and
    overstated ZeRO-3's activations by about 30% (more recompute than needed)."""
    cfg, model = build(MISTRAL_7B, "peft", "meta", layers=2, overrides=["memory_budget_gb=80"])
    assert layer_shape(model).adapter_b == 4  # PEFT's own
    plan = plan_memory(cfg, model, 8, 8, torch.device("cuda"), torch.bfloat16)  # an sm_80+ GPU (PLANNED_ARCH)
    want = activation_bytes(dataclasses.replace(layer_shape(model), adapter_b=2), "peft", zero3_linear=True)
    assert plan.per_token("none", 3) == want["none"] < activation_bytes(layer_shape(model), "peft",
                                                                          zero3_linear=True)["none"]


def test_a_base_whose_weights_exceed_one_gpu_is_refused_before_any_weight_loads():
    """Llama-3-70B on 80 GB cards: the plan said NOTHING FITS and the run went on, every rank reading the whole
    model into host RAM, to an out-of-memory error at model.to(device). The check runs on the meta-built model."""
    import pytest
    from transformers import AutoConfig

    from engine.config import ConfigError, load_config
    from engine.modeling import architecture_config, meta_model
    from engine.train import check_base_fits_gpu

    gib = 1024**3
    cfg = load_config(os.path.join(ROOT, "configs", "mistral-7b", "mntp.yaml"))
    mistral = meta_model(architecture_config(cfg.model)[0])
    check_base_fits_gpu(cfg, mistral, device_bytes=int(79.65 * gib))  # 13.5 GiB: fits
    with pytest.raises(ConfigError, match=r"weights \(13\.5 GiB in bfloat16\) do not fit one GPU \(12\.0 GiB\)"):
        check_base_fits_gpu(cfg, mistral, device_bytes=12 * gib)
    llama70 = meta_model(AutoConfig.for_model("llama", hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                                              num_attention_heads=64, num_key_value_heads=8, vocab_size=128256))
    with pytest.raises(ConfigError, match=r"\(131\.4 GiB in bfloat16\) do not fit one GPU \(79\.6 GiB\)"):
        check_base_fits_gpu(cfg, llama70, device_bytes=int(79.65 * gib))
    check_base_fits_gpu(cfg, llama70, device_bytes=int(139.8 * gib))  # an H200 holds it whole at the start
    check_base_fits_gpu(cfg, llama70)  # no CUDA here: nothing to check against


def test_a_run_on_a_gpu_too_small_for_its_base_stops_before_the_trainer_starts(monkeypatch, capsys):
    """The call site: engine/train.py checks the meta-built base against this rank's GPU before the trainer (and so
    any weight) loads. Here a 12 GiB card is simulated for Mistral-7B; the trainer must never be reached."""
    import types

    import engine.train as train_mod
    import engine.trainer

    gib = 1024**3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=12 * gib))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # dtype auto: bf16

    def trainer_started(cfg):
        raise AssertionError("the trainer started: the weights would load")

    monkeypatch.setattr(engine.trainer, "train", trainer_started)
    cfg = load_config(os.path.join(ROOT, "configs", "mistral-7b", "mntp.yaml"))
    assert train_mod._train(cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights (13.5 GiB in bfloat16) do not fit one GPU (12.0 GiB)" in err[0], err


def test_zero3_shards_the_base_but_keeps_every_lora_tensor_whole_on_each_rank():
    """The persistence threshold (engine.config) keeps each LoRA tensor whole on every rank under ZeRO-3; the plan
    divided them by the world size with the base (0.36 GiB short per rank at 70B with rank 16 on 8 GPUs)."""
    from engine.memory import MemoryPlan

    gib = 1024**3
    base, lora = 70_553_706_496, 207_093_760  # Llama-3-70B and its rank-16 LoRA on the seven projections
    plan = MemoryPlan(weights_bytes=2 * (base + lora), trainable_params=lora, tokens=0, layers=80, hidden=8192,
                      per_token_layer={"full": 0, "none": 0}, budget_bytes=80 * gib, world=8, device_type="cuda",
                      dtype="bfloat16")
    held = plan.total("full", 3) - plan.state_bytes(3) - plan.zero_buffers(3) - plan.workspace()
    assert held == pytest.approx(2 * base / 8 + 2 * lora, rel=1e-12)
    assert held - 2 * (base + lora) / 8 == pytest.approx(2 * lora * 7 / 8) and 2 * lora * 7 / 8 / gib > 0.33


def _reduce_buffer_check():
    """Run in a process of its own (DeepSpeed caches its process groups): per (ZeRO stage, offload_optimizer), the
    contiguous gradient buffer DeepSpeed allocates in the backward against the plan's ``reduce_buffer_bytes``."""
    import sys

    import deepspeed

    from engine.config import deepspeed_config
    from engine.distributed import init_distributed
    from engine.memory import plan_memory
    from tests.test_step_structure import _setup

    init_distributed()  # a world of one (gloo)
    for zero, offload in ((1, "true"), (1, "false"), (2, "false"), (3, "false")):
        cfg, stage, items, module = _setup("mntp", ["model.gradient_checkpointing=false", "model.dtype=bf16",
                                                    f"zero_stage={zero}", f"offload_optimizer={offload}"])
        plan = plan_memory(cfg, module.model, 1, 1, torch.device("cpu"), torch.bfloat16)
        params = [p for p in module.parameters() if p.requires_grad]
        engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=torch.optim.AdamW(params, lr=1e-3),
            config=deepspeed_config(cfg, 1, use_bf16=True, stage=zero, **plan.deepspeed_sizes()))
        opt, seen = engine.optimizer, {}  # id -> bytes of every buffer seen (the hook runs once per gradient)

        def record(setup=getattr(engine.optimizer, "setup_buckets", None)):
            if setup is not None:
                setup()
            seen.update((id(t), t.numel() * t.element_size()) for bucket in getattr(opt, "ipg_buckets", {}).values()
                        for t in (bucket.buffer if isinstance(bucket.buffer, list) else [bucket.buffer])
                        if t is not None)

        if hasattr(opt, "setup_buckets"):  # stages 1 and 2 make the buffer at the backward's start, and drop it
            opt.setup_buckets = record
        else:
            record()  # the flat bf16 optimizer has none; ZeRO-3 makes its buffer at initialize
        batch = stage.collate(items[:2], torch.Generator().manual_seed(0))
        batch.pop("truncated", None)
        stage.train_micro_step(engine, batch)
        flat = type(opt).__name__ == "BF16_Optimizer"
        assert flat == plan.flat_bf16_optimizer(zero), (zero, offload, type(opt).__name__)
        print(f"stage {zero} offload {offload}: {type(opt).__name__} allocated {sum(seen.values())} planned "
              f"{plan.reduce_buffer_bytes(zero)}")
        assert sum(seen.values()) == plan.reduce_buffer_bytes(zero), (zero, offload, seen)
        del engine
    sys.stdout.flush()


def test_the_planned_reduce_buffer_is_the_one_deepspeed_allocates():
    """DeepSpeed 0.19 allocates a whole reduce bucket as a contiguous gradient buffer on its ZeRO optimizers, whatever
    the bucket holds: at stage 1 under bf16 with offload_optimizer (ZeRO-1, not the flat bf16 optimizer) 5e8 fp32
    elements, 1.86 GiB, at stage 2 5e8 bf16 ones, which the plan counted as 0 and as two fp32 buckets of the LoRA
    parameters. engine.config now sizes the bucket to the trainable parameters (rounded up to 2^20) and the plan
    costs what DeepSpeed makes: here, on the tiny LoRA model, the buffer DeepSpeed allocated in a real backward."""
    import sys

    from .helpers import run_cmd

    r = run_cmd([sys.executable, "-m", "tests.run_check", "tests.test_memory_plan:_reduce_buffer_check"],
                timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [x for x in r.stdout.splitlines() if x.startswith("stage ")]
    assert lines == [
        "stage 1 offload true: DeepSpeedZeroOptimizer allocated 4194304 planned 4194304",
        "stage 1 offload false: BF16_Optimizer allocated 0 planned 0",
        "stage 2 offload false: DeepSpeedZeroOptimizer allocated 2097152 planned 2097152",
        "stage 3 offload false: DeepSpeedZeroOptimizer_Stage3 allocated 2097152 planned 2097152"], r.stdout[-3000:]


def test_zero_reduce_bucket_is_the_trainable_parameters_rounded_up_and_capped():
    from engine.config import deepspeed_config, zero_reduce_bucket

    mistral_lora = 41_943_040
    assert zero_reduce_bucket(1, mistral_lora) == zero_reduce_bucket(2, mistral_lora) == 40 << 20
    assert zero_reduce_bucket(3, mistral_lora) == 40 << 20 and zero_reduce_bucket(3, 10**9) == 50_000_000
    assert zero_reduce_bucket(2, 7 * 10**9) == 500_000_000 and zero_reduce_bucket(2, 0) == 500_000_000
    assert zero_reduce_bucket(1, 1) == 1 << 20
    cfg = load_config(os.path.join(ROOT, "configs/mistral-7b/mntp.yaml"))
    for stage in (1, 2, 3):
        zero = deepspeed_config(cfg, 8, use_bf16=True, stage=stage, trainable_numel=mistral_lora)["zero_optimization"]
        assert zero["reduce_bucket_size"] == 40 << 20, stage
    assert "reduce_bucket_size" not in deepspeed_config(cfg, 8, use_bf16=True, stage=0)["zero_optimization"]


def test_full_fine_tuning_under_zero3_shards_the_trainable_base():
    """Without LoRA the persistence threshold took the largest trainable tensor, the embedding table, + 1: DeepSpeed
    then kept every parameter whole on every rank while the plan divided the weights by the ranks. The threshold is
    now LoRA's alone (1e4 without it) and the plan's weights term is the one the total uses."""
    from engine.config import deepspeed_config
    from engine.dry_run import dry_run

    lines = []
    # (auto replicates at stage 1 here: 8 ranks shard its fp32 state enough; the ZeRO-3 plan is forced)
    cfg = load_config(os.path.join(ROOT, "configs/mistral-7b/mntp.yaml"), ["lora.enabled=false", "zero_stage=3"])
    out = dry_run(cfg, world=8, out=lines.append)
    plan = out["plan"]
    assert out["zero_stage"] == 3 and plan.lora_max_numel == 0 and not plan.lora
    zero = deepspeed_config(cfg, 8, use_bf16=True, stage=3, **plan.deepspeed_sizes())["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 10_000 < plan.max_param_numel
    assert plan.weights(3) == pytest.approx(plan.weights_bytes / 8)
    assert any(f"(weights {plan.weights_bytes / 8 / GIB:.2f}, " in x for x in lines if x.startswith("  recompute"))
    lora = load_config(os.path.join(ROOT, "configs/mistral-7b/mntp.yaml"))
    plan = dry_run(lora, world=8, out=lambda line: None)["plan"]
    zero = deepspeed_config(lora, 8, use_bf16=True, stage=3, **plan.deepspeed_sizes())["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == plan.lora_max_numel + 1 > 10_000


def _peak_bytes_of(fn):
    """Most bytes alive at once among the tensors ``fn`` makes (ops dispatched while it runs, the backward's
    included; each storage counted once, from its first tensor until that tensor is freed). A lower bound of the
    allocator's peak: CPU tensors have no allocator statistics."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    state = {"live": 0, "peak": 0, "seen": set()}

    class Live(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in state["seen"]:
                    key, n = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                    state["seen"].add(key)
                    state["live"] += n
                    state["peak"] = max(state["peak"], state["live"])

                    def freed(key=key, n=n):
                        state["live"] -= n
                        state["seen"].discard(key)

                    weakref.finalize(t, freed)
            return out

    with Live():
        fn()
    return state["peak"]


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_mntp_on_the_torch_loss_path_plans_its_peak(softcap):
    """model.loss=torch (or auto off CUDA) runs masked_cross_entropy_reference: fp32 logits of the masked rows and
    their gradients, and the fp32 copy of the head weight, 2.9 GiB at Llama-3-8B's shipped 4 x 512 micro-batch,
    which the plan left to the 4 GiB workspace. The planned peak is held to the one measured on the reference."""
    from engine.memory import masked_ce_reference_peak
    from llm2vec_kernels.masked_ce import masked_cross_entropy_reference

    n, v, h = 96, 4096, 32
    hidden = torch.randn(n, h, dtype=torch.bfloat16, requires_grad=True)
    weight, labels = torch.randn(v, h, dtype=torch.bfloat16), torch.randint(0, v, (n,))
    measured = _peak_bytes_of(lambda: masked_cross_entropy_reference(hidden, weight, labels, all_labelled=True,
                                                                     softcap=softcap).backward())
    planned = masked_ce_reference_peak(n, v, h, 2)
    assert measured <= planned <= 1.05 * measured, (measured, planned)


def test_mntp_on_the_torch_loss_path_is_in_the_plan():
    from engine.dry_run import dry_run
    from engine.memory import masked_ce_reference_peak, mntp_torch_loss_bytes

    path = os.path.join(ROOT, "configs/llama3-8b/mntp.yaml")
    triton = dry_run(load_config(path), world=8, out=lambda line: None)["plan"]
    lines = []
    torch_plan = dry_run(load_config(path, ["model.loss=torch"]), world=8, out=lines.append)["plan"]
    rows = -(-2 * 2048 // 10)  # mask_prob 0.2 of 4 x 512 tokens
    assert triton.loss_bytes == 0 and torch_plan.loss_bytes == masked_ce_reference_peak(rows, 128256, 4096, 2)
    assert torch_plan.total("full", 1) - triton.total("full", 1) == torch_plan.loss_bytes
    assert any(f"MNTP loss on the torch path {torch_plan.loss_bytes / GIB:.2f}" in x for x in lines), lines
    assert 2.9 * GIB < torch_plan.loss_bytes < 3.0 * GIB
    cfg = load_config(os.path.join(ROOT, "configs/tiny/mntp.yaml"))
    text = type("TextConfig", (), {"vocab_size": 301, "hidden_size": 24})()
    assert mntp_torch_loss_bytes(cfg, text, torch.bfloat16, torch.device("cuda")) == 0  # auto on CUDA: the kernel
    assert mntp_torch_loss_bytes(cfg, text, torch.bfloat16, torch.device("cpu")) == (
        mntp_torch_loss_bytes(cfg, text, torch.float32, torch.device("cpu")) + 301 * 24 * 4)  # no copy in fp32


def test_auto_takes_a_replicated_stage_only_when_that_stage_fits():
    """bf16 and fp16 replicate at stage 1, which can cost more than stage 0 (ZeRO-1's reduce buffer with
    offload_optimizer or in fp16; on one rank its state is stage 0's). The choice checked stage 0 and returned 1: a
    budget between the two took stage 1, whose plan did not fit."""
    from engine.dry_run import dry_run

    cfg = load_config(os.path.join(ROOT, "configs/mistral-7b/mntp.yaml"), ["offload_optimizer=true"])
    plan = dry_run(cfg, world=1, out=lambda line: None)["plan"]
    assert plan.total("full", 1) - plan.total("full", 0) == plan.reduce_buffer_bytes(1) > 0
    # the workspace is 5% of the budget + 256 MiB: a budget B fits stage s when the rest of its total <= 0.95 B - 256 MiB
    f0, f1 = (plan.total("full", s) - plan.workspace() for s in (0, 1))
    between = dataclasses.replace(plan, budget_bytes=int(((f0 + f1) / 2 + (256 << 20)) / 0.95))
    assert between.fits("full", 0) and not between.fits("full", 1)
    stage, why = choose_zero_stage(cfg, between)
    assert stage == 3 and f"do not fit one rank's budget ({between.describe('full', 1)})" in why, why
    roomy = dataclasses.replace(plan, budget_bytes=int((f1 + (256 << 20)) / 0.95) + 64)
    assert roomy.fits("full", 1) and choose_zero_stage(cfg, roomy)[0] == 1


def test_the_readme_recompute_choices_for_every_7b_stage():
    """README: MNTP (4 x 512) and SimCSE (32 texts of 128) plan `none` on an 80 GB card and an H200; MNTP at 32 x 512
    `selective` on 80 GB (65 GiB planned) and `none` on an H200 (90 GiB); supervised (gradient caching, 64 texts of
    512 a chunk) `full` on 80 GB and `selective` on an H200. test_auto_plan_fits_measured_bytes_at_7b holds MNTP's
    plan to measured bytes; this holds the README's choices for the other stages."""
    from engine.dry_run import dry_run

    def pick(stage, card, *over):
        cfg = load_config(os.path.join(ROOT, f"configs/mistral-7b/{stage}.yaml"), list(over))
        res = dry_run(cfg, world=1, gpu_memory_gb=CARDS[card], out=lambda line: None)
        return res["recompute"], res["plan"].total(res["recompute"], res["zero_stage"]) / GIB

    for stage, want in (("mntp", ("none", "none")), ("simcse", ("none", "none")),
                        ("supervised", ("full", "selective"))):
        assert tuple(pick(stage, card)[0] for card in CARDS) == want, stage
    big = ("micro_batch_size=32", "batch_size=32")  # one GPU, as test_auto_plan_fits_measured_bytes_at_7b
    (p80, gib80), (p200, gib200) = (pick("mntp", card, *big) for card in CARDS)
    assert (p80, p200) == ("selective", "none")
    assert (round(gib80), round(gib200)) == (65, 90), (gib80, gib200)
    readme = " ".join(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().split())
    assert ("at 32 x 512 it picks `selective` on 80 GB (65 GiB planned) and `none` on an H200 (90 GiB). The "
            "supervised configs (gradient caching, 64 texts of 512 tokens a chunk) plan `full` on 80 GB and "
            "`selective` on an H200") in readme
