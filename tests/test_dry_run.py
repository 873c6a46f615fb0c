"""``engine/train.py --dry-run`` on every shipped config at full size (meta device, offline, no tokenizer)."""
import dataclasses
import glob
import os
import sys

import pytest
import yaml

from engine.config import load_config, to_dict
from engine.train import main

from .helpers import ROOT, run_cmd

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
ARCHITECTURES = sorted(glob.glob(os.path.join(ROOT, "configs", "architectures", "*.json")))


@pytest.fixture
def offline(monkeypatch):
    """No hub, and no tokenizer: a dry run that reached for either would fail here."""
    import huggingface_hub.constants

    import engine.modeling

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_tokenizer(*a, **k):
        raise AssertionError("a dry run must not load a tokenizer")

    monkeypatch.setattr(engine.modeling, "load_tokenizer", no_tokenizer)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_shipped_config_dry_runs_at_full_size(path, offline, capsys):
    assert main(["--config", path, "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    cfg = load_config(path)
    assert f"dry run: stage {cfg.stage}" in out
    for what in ("zero stage ", "recompute ", "meta forward: hidden", "trainable parameters", "batch: global "):
        assert what in out, (what, out)
    if cfg.memory_budget_gb <= 0:  # the default card: an 80 GB H100 reports 79.65 GiB, which a run there plans for
        assert " of 79.65 GiB (" in out, out
    if cfg.stage == "mntp":
        assert f"input_ids ({cfg.micro_batch_size}, {cfg.max_seq_len})" in out
    assert "context window" not in out  # every shipped config stays within its model's positions


def test_texts_beyond_the_context_window_are_warned_about_in_the_plan_and_the_run(tmp_path, offline, capsys):
    """max_seq_len=16384 on Llama-2 (4096 positions) was planned and trained without a word (the positions past
    4096 were never trained). The dry run and the run each say so in one warning line; the run still trains."""
    assert main(["--config", os.path.join(ROOT, "configs/llama2-7b/mntp.yaml"), "--dry-run",
                 "max_seq_len=16384"]) == 0
    assert ("WARNING: texts of up to 16384 tokens exceed the model's context window of 4096 positions "
            "(max_position_embeddings)" in capsys.readouterr().out)
    assert main(["--config", os.path.join(ROOT, "configs/mistral-7b/supervised.yaml"), "--dry-run",
                 "contrastive.doc_max_len=40000"]) == 0
    assert "contrastive.max_len / contrastive.doc_max_len <= 32768" in capsys.readouterr().out
    cfg = load_config("configs/tiny/mntp.yaml")
    limit = cfg.model.random_init["max_position_embeddings"]
    r = run_cmd([sys.executable, "engine/train.py", "--config", "configs/tiny/mntp.yaml", f"output_dir={tmp_path}",
                 f"max_seq_len={limit + 8}", "max_steps=1", "save_every=0", "eval_every=0"])
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() + r.stdout.splitlines() if "context window" in line]
    assert len(warned) == 1 and f"{limit + 8} tokens exceed the model's context window of {limit}" in warned[0]


def test_the_recipe_configs_are_there():
    names = {os.path.relpath(p, os.path.join(ROOT, "configs")) for p in CONFIGS}
    for model in ("llama2-7b", "mistral-7b", "llama3-8b", "llama3.1-8b", "sheared-llama-1.3b", "qwen2-0.5b"):
        for stage in ("mntp", "simcse", "supervised"):
            assert f"{model}/{stage}.yaml" in names


def _broken(tmp_path, base, **changes):
    with open(os.path.join(ROOT, base)) as f:
        raw = yaml.safe_load(f)
    for key, value in changes.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("changes,msg", [
    ({"lora.target_modules": ["q_proj", "qkv_proj"]}, "lora.target_modules ['qkv_proj'] name no Linear module"),
    # Phi3's qkv_proj holds q, k and v: LoRA on it would adapt k too, which the config does not name
    ({"model.name_or_path": "microsoft/Phi-3-mini-4k-instruct", "lora.target_modules": ["q_proj", "v_proj"]},
     "lora.target_modules names q_proj, v_proj without k_proj: phi3 computes q_proj, k_proj, v_proj in one Linear, "
     "qkv_proj"),
    ({"model.name_or_path": "no-such-org/no-such-7b"}, "no architecture for 'no-such-org/no-such-7b' offline"),
    ({"batch_size": 30}, "batch_size 30 is not divisible"),
])
def test_a_broken_7b_config_fails_the_dry_run(tmp_path, offline, capsys, changes, msg):
    path = _broken(tmp_path, "configs/mistral-7b/supervised.yaml", **changes)
    args = ["--config", path, "--dry-run"] + (["--world", "4"] if "batch_size" in changes else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("path", ARCHITECTURES, ids=os.path.basename)
def test_shipped_architectures_have_the_published_parameter_counts(path):
    # The models' published sizes (their safetensors indexes' parameter totals) check the shipped config values.
    from engine.config import ModelConfig
    from engine.modeling import architecture_config, meta_model

    published = {"meta-llama/Llama-2-7b-chat-hf": 6_738_415_616, "mistralai/Mistral-7B-Instruct-v0.2": 7_241_732_096,
                 "meta-llama/Meta-Llama-3-8B-Instruct": 8_030_261_248,
                 "meta-llama/Meta-Llama-3.1-8B-Instruct": 8_030_261_248,
                 "princeton-nlp/Sheared-LLaMA-1.3B": 1_345_423_360, "Qwen/Qwen2-0.5B-Instruct": 494_032_768,
                 "google/gemma-2-9b-it": 9_241_705_984, "Qwen/Qwen3-8B": 8_190_735_360,
                 "google/gemma-7b-it": 8_537_680_896, "microsoft/Phi-3-mini-4k-instruct": 3_821_079_552}
    hub = os.path.basename(path)[:-len(".json")].replace("__", "/")
    arch, source = architecture_config(ModelConfig(name_or_path=hub))
    assert source == path or source == "the hub cache"
    model = meta_model(arch)
    assert sum(p.numel() for p in model.parameters()) == published[hub]


@pytest.mark.parametrize("stage", ["mntp", "simcse", "supervised"])
@pytest.mark.parametrize("hub", ["google/gemma-2-9b-it", "Qwen/Qwen3-8B", "google/gemma-7b-it",
                                 "microsoft/Phi-3-mini-4k-instruct"])
def test_the_other_families_plan_every_stage_at_full_size(hub, stage, offline, capsys):
    # No recipe config names Gemma2, Qwen3 or Phi3 (llm2vec ships none), so the 7B recipe runs on them by override,
    # its default LoRA targets included: on Phi3 they adapt the fused qkv_proj and gate_up_proj, and the line says so.
    from engine.dry_run import dry_run

    cfg = load_config(os.path.join(ROOT, "configs", "mistral-7b", f"{stage}.yaml"),
                      [f"model.name_or_path={hub}", "model.adapters=[]"])
    out = dry_run(cfg, world=8, gpu_memory_gb=80, out=print)
    printed = capsys.readouterr().out
    family = {"google/gemma-2-9b-it": "gemma2", "Qwen/Qwen3-8B": "qwen3", "google/gemma-7b-it": "gemma",
              "microsoft/Phi-3-mini-4k-instruct": "phi3"}[hub]
    assert f"model {hub} ({family}, architecture from" in printed
    if family == "phi3":  # r (in + out) a module: qkv_proj H -> 3H (as many KV heads as heads), gate_up_proj H -> 2I
        H, I, r = 3072, 8192, cfg.lora.r
        assert out["plan"].trainable_params == 32 * r * ((H + 3 * H) + (H + H) + (H + 2 * I) + (I + H))
        assert (f"r {r}, alpha {cfg.lora.alpha}, targets qkv_proj (q_proj, k_proj, v_proj), o_proj, gate_up_proj "
                "(gate_proj, up_proj), down_proj)") in printed, printed
    assert out["plan"].total("full", out["zero_stage"]) <= out["plan"].budget_bytes
    assert (out["plan"].per_token("none") > out["plan"].per_token("selective") > out["plan"].per_token("full"))
    assert "torch path" not in printed, printed  # Gemma2's soft-capping runs in the kernels; no window is that short


def test_print_config_prints_the_resolved_config(capsys):
    path = os.path.join(ROOT, "configs", "mistral-7b", "supervised.yaml")
    assert main(["--config", path, "--print-config", "learning_rate=1e-4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(load_config(path, ["learning_rate=1e-4"]))
    assert printed["learning_rate"] == 1e-4 and printed["contrastive"]["temperature"] == 0.02


def test_dry_run_plans_for_the_given_gpu(offline, capsys):
    # An 8B model on one 17 GiB GPU does not fit replicated with training state and activations: ZeRO-3 shards it
    # over the world and fits. On 80 GiB the replicated base is chosen. On 16 GiB nothing fits: the whole bf16
    # base (15 GiB) is placed on each GPU before ZeRO-3 shards it, and the dry run says so.
    path = os.path.join(ROOT, "configs", "llama3-8b", "mntp.yaml")
    from engine.dry_run import dry_run

    lines = []
    mid = dry_run(load_config(path, ["memory_budget_gb=17"]), world=8, out=lambda *_: None)
    big = dry_run(load_config(path), world=8, gpu_memory_gb=80, out=lambda *_: None)
    small = dry_run(load_config(path, ["memory_budget_gb=16"]), world=8, out=lines.append)
    assert mid["zero_stage"] == 3 and mid["fits"] and big["zero_stage"] in (0, 1) and big["fits"]
    assert mid["plan"].budget_bytes == 17 << 30 and big["plan"].budget_bytes == 80 << 30
    plan = small["plan"]
    assert small["zero_stage"] == 3 and not small["fits"]
    assert plan.total(small["recompute"], 3) < plan.budget_bytes < plan.startup()  # the start alone is too big
    warn = [x for x in lines if "WARNING: the memory plan does not fit" in x]
    assert len(warn) == 1 and "at the start" in warn[0] and "which does not fit" in warn[0], lines
    assert any("NOTHING FITS" in x for x in lines if x.startswith("  zero stage 3"))


def test_a_causal_model_is_planned_padded_to_its_longest_text(offline):
    """model.bidirectional=false runs the batch padded (packing needs the engine's attention): every text costs
    the longest one's tokens, not its own."""
    from engine.memory import tokens_per_micro_batch

    path = os.path.join(ROOT, "configs/mistral-7b/supervised.yaml")
    over = ["contrastive.doc_max_len=640", "contrastive.grad_cache_chunk=0"]
    packed, padded = (load_config(path, over + [f"model.bidirectional={b}"]) for b in ("true", "false"))
    mb, n = packed.micro_batch_size, packed.contrastive.num_hard_negatives
    assert tokens_per_micro_batch(packed) == mb * packed.contrastive.max_len + mb * (1 + n) * 640
    assert tokens_per_micro_batch(padded) == mb * (2 + n) * 640


@pytest.mark.parametrize("args,msg", [
    (["micro_batch_size=3"], "batch_size 512 is not a multiple of micro_batch_size 3"),
    (["--world", "-1"], "--world must be >= 1, got -1"),
    (["--gpu-memory-gb", "0"], "--gpu-memory-gb must be a finite number > 0, got 0.0"),
    (["--gpu-memory-gb", "inf"], "--gpu-memory-gb must be a finite number > 0, got inf"),
])
def test_bad_dry_run_input_is_one_line_and_exit_2(args, msg, offline, capsys):
    assert main(["--config", os.path.join(ROOT, "configs/mistral-7b/supervised.yaml"), "--dry-run", *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1, err


def test_the_dry_run_makes_the_model_training_makes_and_the_batch_training_collates(offline):
    """Bidirectional attention and the fused LoRA on the meta model (engine.trainer.setup_model's changes); texts
    padded to the longer of max_len and doc_max_len; scored pairs (cosent, angle) are two texts per example with
    one score each, as engine/stages/supervised.py collates them, and the memory plan counts those texts."""
    from engine.bidirectional import is_bidirectional
    from engine.dry_run import build_meta, micro_batch_shapes, meta_step
    from engine.lora import FusedLoraLinear
    from engine.memory import tokens_per_micro_batch
    from engine.modeling import decoder_of

    import torch

    path = os.path.join(ROOT, "configs/mistral-7b/supervised.yaml")
    cfg = load_config(path, ["contrastive.doc_max_len=640", "contrastive.pooling=eos", "contrastive.grad_cache_chunk=0"])
    model, arch, _ = build_meta(cfg, torch.bfloat16)
    assert is_bidirectional(decoder_of(model))
    assert sum(isinstance(m, FusedLoraLinear) for m in model.modules()) == 7 * arch.num_hidden_layers
    mb, n = cfg.micro_batch_size, cfg.contrastive.num_hard_negatives
    shapes = micro_batch_shapes(cfg, 8)
    assert shapes == {"input_ids": (mb * (2 + n), 640), "scores": (mb, mb * (1 + n) * 8)}
    assert meta_step(model, cfg, shapes, arch)["embeddings"] == (mb * (2 + n), arch.hidden_size)
    assert tokens_per_micro_batch(cfg) == mb * cfg.contrastive.max_len + mb * (1 + n) * 640
    scored = load_config(path, ["contrastive.loss=cosent", "contrastive.grad_cache_chunk=0"])
    assert micro_batch_shapes(scored, 8) == {"input_ids": (2 * mb, scored.contrastive.max_len), "scores": (mb,)}
    assert tokens_per_micro_batch(scored) == 2 * mb * scored.contrastive.max_len


def test_full_fine_tuning_reports_its_base_parameters(offline, capsys):
    path = os.path.join(ROOT, "configs/qwen2-0.5b/mntp.yaml")
    assert main(["--config", path, "--dry-run", "lora.enabled=false"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "0.494B base parameters" in out and "full fine-tuning: 494," in out, out


def test_a_constant_schedule_prints_no_decay_horizon(offline, capsys):
    """lr_schedule=constant on a config with lr_decay_epochs printed "decay horizon 3 epochs of the data" for a
    schedule that never decays."""
    path = os.path.join(ROOT, "configs/mistral-7b/supervised.yaml")
    assert main(["--config", path, "--dry-run", "lr_schedule=constant"]) == 0
    out = capsys.readouterr().out
    assert "schedule: constant, peak 0.0002, warmup 300, no decay, stop at 1000" in out and "decay horizon" not in out
    assert "WARNING: lr_decay_epochs 3 is ignored: lr_schedule constant does not decay" in out
    assert main(["--config", path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "decay horizon 3 epochs of the data" in out and "is ignored" not in out


def test_offload_params_below_zero_3_is_warned_about(offline, capsys):
    path = os.path.join(ROOT, "configs/mistral-7b/mntp.yaml")
    assert main(["--config", path, "--dry-run", "offload_params=true"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "zero stage 1" in out and "WARNING: offload_params is set, but ZeRO stage 1 keeps the parameters" in out
    assert main(["--config", path, "--dry-run", "offload_params=true", "zero_stage=3"]) == 0
    assert "offload_params is set" not in capsys.readouterr().out


def test_zero_stages_2_and_3_cost_deepspeeds_buffers(offline):
    """Under ZeRO-3 DeepSpeed gathers whole weights while a module runs: the running and the prefetched bucket (a
    decoder layer each at 8B) and the embedding table at once, 1 GiB of it at Llama-3-8B's 128k vocabulary; stages
    2 and 3 also keep a contiguous gradient buffer of one reduce bucket (the LoRA parameters rounded up to 2^20: the
    buffer DeepSpeed allocates, tests/test_memory_plan.py). The workspace's flat reserve used to stand in for them."""
    from engine.dry_run import dry_run
    from engine.memory import GIB

    lines = []
    out = dry_run(load_config(os.path.join(ROOT, "configs/llama3-8b/mntp.yaml"), ["memory_budget_gb=17"]), world=8,
                  out=lines.append)
    plan = out["plan"]
    assert out["zero_stage"] == 3 and plan.max_param_numel == 128256 * 4096  # the embedding table
    layer, lora = plan.layer_numel, plan.trainable_params
    bucket = -(-lora // 2**20) * 2**20  # fewer LoRA parameters than a 5e7 or 5e8 bucket
    assert plan.zero_buffers(0) == plan.zero_buffers(1) == 0  # stage 1 in bf16: the flat bf16 optimizer, no bucket
    assert plan.zero_buffers(2) == 2 * bucket
    assert plan.zero_buffers(3) == 2 * bucket + 2 * (2 * max(50_000_000, layer) + 128256 * 4096)
    assert 1.8 * GIB < plan.zero_buffers(3) < 1.9 * GIB
    assert dataclasses.replace(plan, offload_optimizer=True).zero_buffers(1) == 4 * bucket  # ZeRO-1: fp32
    assert any(f"DeepSpeed buffers {plan.zero_buffers(3) / GIB:.2f}" in x for x in lines
               if x.startswith("  recompute")), lines


def test_a_cached_alias_whose_config_json_does_not_read_is_one_line_and_exit_2(tmp_path):
    """The dry run reads a fetched alias's config.json (hf/ in LLM2VEC_ENGINE_CACHE): one that is not JSON (a
    power cut, a disk error) is one line naming the folder and exit 2, not a traceback and exit 1."""
    import sys

    from .helpers import run_cmd

    hf = tmp_path / "cache" / "smollm2-135m" / "hf"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text('{"model_type": "llama", ')
    (hf / ".complete").write_text("")
    r = run_cmd([sys.executable, "engine/train.py", "--config", "configs/smollm2-135m/mntp.yaml", "--dry-run"],
                env={"LLM2VEC_ENGINE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}, timeout=170)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: could not load the model config in") and str(hf) in lines[0], lines


def test_a_file_the_dry_run_cannot_read_is_one_line_and_exit_2(offline, monkeypatch, capsys):
    """An OSError while the plan reads its files (a config.json or shipped architecture it may not read) is one
    line and exit 2."""
    import errno

    import engine.dry_run

    def unreadable(mcfg, vocab_size=None):
        raise PermissionError(errno.EACCES, "Permission denied", "/models/x/config.json")

    monkeypatch.setattr(engine.dry_run, "architecture_config", unreadable)
    assert main(["--config", os.path.join(ROOT, "configs/mistral-7b/supervised.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Permission denied: '/models/x/config.json'" in err[0], err


def test_the_dry_run_plans_fused_ops_triton_as_auto_plans_it_on_the_gpu(offline, monkeypatch):
    """model.fused_ops=triton in a dry run (no GPU here): LoRA is fused as the run fuses it (the kernels' rank limit
    checked), the meta forward launches nothing (auto: the torch path on meta tensors, the same shapes), and the plan
    is auto's on the planned GPU, the fused path. It was a traceback: the fused LoRA refused impl='triton' on a
    non-CUDA tensor."""
    from engine.dry_run import dry_run

    monkeypatch.delenv("TRITON_INTERPRET")  # a user's machine without a GPU (the suite runs the interpreter)
    path = os.path.join(ROOT, "configs", "mistral-7b", "mntp.yaml")
    lines = []
    auto = dry_run(load_config(path), world=8, out=lines.append)["plan"]
    triton = dry_run(load_config(path, ["model.fused_ops=triton"]), world=8, out=lines.append)["plan"]
    assert triton.per_token("none") == auto.per_token("none")
    assert triton.paths == auto.paths and triton.paths[0] == "fused"
