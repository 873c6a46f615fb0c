"""Step structure: no host sync inside forward/backward, the memory plan's choices, ZeRO stage auto on 2 ranks,
and exact resume with fused LoRA + selective recompute."""
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.config import deepspeed_config, load_config
from engine.memory import choose_recompute, choose_zero_stage, plan_memory
from engine.modeling import add_lora, load_model, load_tokenizer
from engine.lora import fuse_lora
from engine.stages import build_stage
from engine.stages.base import to_device
from engine.trainer import EngineModule

from .helpers import STS, PlainEngine, deepspeed_cmd, perturb_lora_b, rewind_run, run_cmd

aten = torch.ops.aten


class SyncCounter(TorchDispatchMode):
    """Records every op that makes the host wait for device data: reading a scalar (item / bool / int:
    aten._local_scalar_dense, is_nonzero, equal), data-dependent shapes (nonzero, masked_select, unique),
    and copies from a non-CPU tensor to the CPU (tolist / .cpu() on a GPU). On a CPU-only machine the last
    kind cannot occur; the rest are what a GPU run would wait on."""

    SYNC = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default, aten.equal.default,
            aten.masked_select.default, aten._unique2.default, aten.unique_consecutive.default}

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SYNC:
            self.syncs.append(str(func))
        elif func in (aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else args[0]
            dst_cpu = (args[0].device.type == "cpu") if func is aten.copy_.default else (
                kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu")
            if dst_cpu and torch.is_tensor(src) and src.device.type != "cpu":
                self.syncs.append(f"{func} to cpu")
        return func(*args, **kwargs)


def _setup(stage_name, overrides=()):
    cfg = load_config(f"configs/tiny/{stage_name}.yaml", ["lora.dropout=0.1", *overrides])
    tok = load_tokenizer(cfg.model)
    stage = build_stage(cfg, tok)
    items, _, _ = stage.load([f"{STS}/sts-dev.csv"] if stage_name != "supervised" else cfg.data, 40)
    model, _ = load_model(cfg.model, "cpu", tok)
    model = stage.prepare_model(model)
    model = add_lora(model, cfg.lora)
    fuse_lora(model, cfg.model.fused_ops)
    return cfg, stage, items, EngineModule(model, stage).train()


@pytest.mark.parametrize("stage_name,overrides", [
    ("mntp", ["model.gradient_checkpointing=full"]),
    ("mntp", ["model.gradient_checkpointing=selective"]),
    # attention dropout off: the attention kernel draws its seed with .item() from the CPU generator, which on a
    # GPU run is host-only (not a device sync) but on this CPU-only test is indistinguishable from one
    ("simcse", ["model.attention_dropout=0.0"]),
    ("supervised", ["contrastive.grad_cache_chunk=5"]),
])
def test_no_host_sync_in_forward_and_backward(stage_name, overrides):
    from engine.memory import enable_recompute

    cfg, stage, items, module = _setup(stage_name, overrides)
    if cfg.model.gradient_checkpointing in ("full", "selective"):
        enable_recompute(module.model, cfg.model.gradient_checkpointing)
        module.train()
    batch = stage.collate(items[:4], torch.Generator().manual_seed(0))
    batch.pop("truncated", None)
    batch = to_device(batch, "cpu")
    with SyncCounter() as counter:
        loss, metrics = stage.train_micro_step(PlainEngine(module), batch)
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters() if p.requires_grad)
    assert counter.syncs == [], counter.syncs

    # the path for callers without collate's host-side layout still works (and syncs, as documented)
    for key in ("layout", "label_rows", "chunk_layouts", "tokens"):
        batch.pop(key, None)
    with SyncCounter() as counter:
        stage.train_micro_step(PlainEngine(module), batch)
    assert counter.syncs


def test_memory_plan_choices():
    cfg = load_config("configs/tiny/mntp.yaml", ["memory_budget_gb=64", "model.gradient_checkpointing=auto"])
    _, stage, _, module = _setup("mntp", ["memory_budget_gb=64"])
    plan = plan_memory(cfg, module.model, world=2, local_world=2, device=torch.device("cpu"))
    assert plan.layers == 2 and plan.hidden == 64 and plan.tokens == 2 * 64
    assert plan.lora_max_numel == 8 * 128  # the largest LoRA tensor: gate/up's B (128 x r=8) or down's A
    assert plan.per_token_layer["none"] > plan.per_token_layer["selective"] > plan.per_token_layer["full"]
    assert plan.dtype == "float32" and choose_zero_stage(cfg, plan)[0] == 0
    # a bf16 base that fits: stage 1 and fp32 gradient accumulation, DeepSpeed's flat bf16 optimizer
    bf16 = plan_memory(cfg, module.model, world=2, local_world=2, device=torch.device("cpu"), dtype=torch.bfloat16)
    stage_id, why = choose_zero_stage(cfg, bf16)
    assert stage_id == 1 and "flat bf16 optimizer" in why
    assert deepspeed_config(cfg, 2, use_bf16=True, stage=1)["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in deepspeed_config(cfg, 2, use_bf16=False, stage=1)
    for z in (2, 3):  # stages 2 and 3 accumulate in fp32 too (_accumulation_check: their optimizers take it)
        assert deepspeed_config(cfg, 2, use_bf16=True, stage=z)["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in deepspeed_config(cfg, 2, use_bf16=False, stage=3)
    p = plan.trainable_params  # the optimizer side per rank, stage by stage (MemoryPlan.state_bytes)
    assert [plan.state_bytes(z) for z in range(4)] == [16 * p, 4 * p + 6 * p, 8 * p, 8 * p]
    assert choose_recompute(cfg, plan, 0)[0] == "full"  # auto on CPU
    plan.budget_bytes = 1 << 20  # 1 MiB: the replicated base no longer fits
    stage_id, why = choose_zero_stage(cfg, plan)
    assert stage_id == 3 and "do not fit" in why
    # on a GPU, auto picks the least recompute that fits
    plan.device_type, plan.budget_bytes = "cuda", 64 << 30
    assert choose_recompute(cfg, plan, 0)[0] == "none"
    plan.tokens, plan.layers = 10**6, 32  # a deep model: with 2 layers full recompute is not the smallest
    need = {p: plan.total(p, 0) - plan.workspace() for p in ("none", "selective", "full")}
    assert need["none"] > need["selective"] > need["full"]
    between = lambda a, b: int(((need[a] + need[b]) / 2 + (256 << 20)) / 0.95)  # noqa: E731 (workspace: 5% + 256 MiB)
    plan.budget_bytes = between("selective", "none")
    assert choose_recompute(cfg, plan, 0)[0] == "selective"
    plan.budget_bytes = between("full", "selective")
    assert choose_recompute(cfg, plan, 0)[0] == "full"
    # a torch before 2.12 gives the selective policy no op output (its first forward raised AttributeError there):
    # auto takes full recompute instead, saying why, and an explicit selective is refused in one line
    from engine import memory
    from engine.config import ConfigError

    assert memory.selective_recompute_supported()  # the torch this suite pins (2.13)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(memory, "selective_recompute_supported", lambda: False)
        plan.budget_bytes = between("selective", "none")
        policy, why = choose_recompute(cfg, plan, 0)
        assert policy == "full" and "selective needs torch 2.12+" in why
        explicit = load_config("configs/tiny/mntp.yaml", ["model.gradient_checkpointing=selective"])
        assert "needs torch 2.12 or later" in memory.selective_recompute_error(explicit)
        with pytest.raises(ConfigError, match="needs torch 2.12 or later"):
            choose_recompute(explicit, plan, 0)
        assert memory.selective_recompute_error(cfg) is None  # auto
    with pytest.raises(Exception, match="model.fused_ops must be one of"):
        load_config("configs/tiny/mntp.yaml", ["model.fused_ops=cuda"])
    with pytest.raises(Exception, match="model.gradient_checkpointing must be one of"):
        load_config("configs/tiny/mntp.yaml", ["model.gradient_checkpointing=some"])
    # ZeRO-3 settings from the plan: LoRA tensors persistent, prefetch >= one decoder layer
    ds = deepspeed_config(cfg, 1, use_bf16=False, stage=3, lora_max_numel=3_000_000, layer_numel=218_000_000)
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_param_persistence_threshold"] > 3_000_000
    assert z["stage3_prefetch_bucket_size"] >= 218_000_000
    explicit = load_config("configs/tiny/mntp.yaml", ["zero_stage=3", "model.gradient_checkpointing=false"])
    assert choose_zero_stage(explicit, plan)[0] == 3 and explicit.model.gradient_checkpointing == "none"


def test_the_trainer_refuses_selective_recompute_on_an_old_torch_before_the_model_loads(tmp_path, monkeypatch):
    """On a torch without op_output (before 2.12) an explicit selective recompute is refused by Trainer.setup before
    the run folder is taken or the base loads (minutes at 7B), not by the plan after it."""
    from engine import memory, trainer
    from engine.config import ConfigError

    monkeypatch.setattr(memory, "selective_recompute_supported", lambda: False)
    monkeypatch.setattr(trainer, "init_distributed", lambda: torch.device("cpu"))
    monkeypatch.setattr(trainer, "load_model", lambda *a, **k: pytest.fail("the base was loaded"))
    out = tmp_path / "run"
    cfg = load_config("configs/tiny/mntp.yaml", [f"output_dir={out}", "model.gradient_checkpointing=selective"])
    with pytest.raises(ConfigError, match="needs torch 2.12 or later"):
        trainer.Trainer(cfg).setup()
    assert not out.exists()  # nothing held or written


@pytest.mark.slow
def test_zero_stage_auto_two_ranks_takes_stage_3_when_the_base_does_not_fit(tmp_path):
    # The other side, a base that fits (stage 0, torch AdamW without a DeepSpeed wrapper), is asserted on
    # test_train's two-rank MNTP run, which runs the same config at a 64 GB budget.
    out = str(tmp_path / "o")
    r = run_cmd(deepspeed_cmd(2, "--config", "configs/tiny/mntp.yaml", f"output_dir={out}", "max_steps=2",
                              "batch_size=4", "eval_every=0", "save_every=0", "memory_budget_gb=0.01"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[engine] zero stage 3: " in r.stdout, r.stdout[-3000:]
    assert ("[engine] optimizer: DeepSpeed DeepSpeedZeroOptimizer_Stage3 over torch AdamW, ZeRO stage 3, float32 "
            "parameters") in r.stdout, r.stdout[-3000:]
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors"))


@pytest.mark.slow
def test_resume_exact_with_fused_lora_selective_recompute_and_the_flat_bf16_optimizer(tmp_path):
    # zero_stage auto on a bf16 base that fits: stage 1, fp32 gradient accumulation -> DeepSpeed's BF16_Optimizer
    # (flat fp32 master weights; stage 0 would step every LoRA tensor on its own, with a host sync each). Resumed
    # from its step-2 checkpoint (helpers.rewind_run; the kill itself is test_train's and test_fault_suite's): the
    # fp32 master weights and Adam state come back, and so do the fused LoRA's dropout masks under selective
    # recompute: the same losses.
    import csv

    def losses(out):
        with open(os.path.join(out, "metrics.csv")) as f:
            return {int(x["step"]): float(x["loss"]) for x in csv.DictReader(f)}

    args = ["--config", "configs/tiny/mntp.yaml", "max_steps=4", "save_every=2", "batch_size=4", "eval_every=0",
            "model.gradient_checkpointing=selective", "model.fused_ops=torch", "lora.dropout=0.1", "model.dtype=bf16",
            "memory_budget_gb=64"]
    ref, crash = str(tmp_path / "ref"), str(tmp_path / "crash")
    r = run_cmd(deepspeed_cmd(2, *args, f"output_dir={ref}"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for line in ("recompute selective", "fused LoRA (torch): 14 projections in 8 groups",
                 "[engine] zero stage 1: the replicated",
                 "[engine] optimizer: DeepSpeed BF16_Optimizer over torch AdamW, ZeRO stage 1, bfloat16 parameters; "
                 "gradient norm and clipping on the flat fp32 gradient buffer"):
        assert line in r.stdout, (line, r.stdout[-3000:])
    rewind_run(ref, crash, 2)
    r = run_cmd(deepspeed_cmd(2, *args, f"output_dir={crash}"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from step_0000002: step 2" in r.stdout
    want, got = losses(ref), losses(crash)
    assert sorted(got) == [1, 2, 3, 4] and want[4] < want[1]  # it trains
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


def _flat_norm_check():
    """Run in a process of its own (DeepSpeed caches its process groups, so it must not meet another test's)."""
    import deepspeed
    from deepspeed.runtime.utils import get_global_norm_of_tensors

    from engine.distributed import init_distributed
    from engine.optim import tune_optimizer_step

    init_distributed()  # a world of one (gloo)
    cfg, stage, items, module = _setup("mntp", ["model.dtype=bf16", "model.gradient_checkpointing=false"])
    perturb_lora_b(module.model, 0.05, torch.Generator().manual_seed(0))  # B = 0 would leave A without gradient
    params = [p for p in module.parameters() if p.requires_grad]
    assert len(params) == 28
    opt = torch.optim.AdamW(params, lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt,
                                           config=deepspeed_config(cfg, 1, use_bf16=True, stage=1))
    assert params[0].dtype == torch.bfloat16  # DeepSpeed's bf16 casts the LoRA weights too
    line = tune_optimizer_step(engine)
    assert type(engine.optimizer).__name__ == "BF16_Optimizer" and "flat fp32 gradient buffer" in line, line
    batch = to_device(stage.collate(items[:2], torch.Generator().manual_seed(0)), torch.device("cpu"))
    batch.pop("truncated", None)
    stage.train_micro_step(engine, batch)
    engine.optimizer.update_hp_grads(clear_lp_grads=False)  # what engine.step() does first at the boundary
    flat, _ = engine.optimizer.get_grads_for_norm()
    per_tensor, _ = type(engine.optimizer).get_grads_for_norm(engine.optimizer)  # DeepSpeed's own method
    assert len(flat) == 1 and len(per_tensor) == 28
    want, got = float(get_global_norm_of_tensors(per_tensor)), float(get_global_norm_of_tensors(flat))
    assert want > 0 and abs(got - want) <= 1e-6 * want, (got, want)
    clip = engine.optimizer.get_grads_for_norm(for_clipping=True)
    assert sum(t.numel() for t in clip) == sum(p.numel() for p in params)  # no alignment padding in the norm
    print(f"flat norm {got:.8g} per-tensor norm {want:.8g}")


@pytest.mark.slow
def test_flat_bf16_grad_norm_equals_deepspeeds_per_tensor_norm():
    """The engine hands DeepSpeed's BF16_Optimizer its flat fp32 gradient buffers for the norm and the clipping
    (engine.optim._flat_bf16_grad_norm): the norm must be the one DeepSpeed's per-tensor path computes."""
    import sys

    r = run_cmd([sys.executable, "-m", "tests.run_check", "tests.test_step_structure:_flat_norm_check"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "flat norm" in r.stdout


def _stage0_skip_check():
    """Run in a process of its own (as _flat_norm_check)."""
    import deepspeed

    from engine.config import load_config
    from engine.distributed import init_distributed
    from engine.optim import lr_lambda, tune_optimizer_step

    init_distributed()
    cfg = load_config("configs/tiny/mntp.yaml", ["max_steps=10", "warmup_steps=0", "learning_rate=1.0"])
    torch.manual_seed(0)
    m = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(m.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=m, optimizer=opt, lr_scheduler=sched, config={
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 0}})
    tune_optimizer_step(engine)
    seen = []
    for step in range(3):  # step 2's gradient is NaN
        before = m.weight.detach().clone()
        engine.backward(engine(torch.full((1, 2), float("nan") if step == 1 else 1.0)).sum())
        engine.step()
        seen.append((engine.skipped_steps, sched.last_epoch, torch.equal(before, m.weight.detach())))
    assert seen == [(0, 1, False), (1, 1, True), (1, 2, False)], seen
    print("stage 0 skip ok")


def _fp16_update_check():
    """Run in a process of its own (as _flat_norm_check). DeepSpeed's CPU accelerator refuses fp16, so it is told
    it may: the optimizer code under test is the same on a GPU."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from engine.distributed import init_distributed
    from engine.optim import tune_optimizer_step

    get_accelerator().is_fp16_supported = lambda: True
    init_distributed()
    overrides = ["model.dtype=fp16", "batch_size=1", "micro_batch_size=1", "max_grad_norm=1000"]
    cfg = load_config("configs/tiny/mntp.yaml", overrides)
    model = add_lora(load_model(cfg.model, "cpu", load_tokenizer(cfg.model))[0], cfg.lora)
    plan = plan_memory(cfg, model, world=1, local_world=1, device=torch.device("cpu"), dtype=torch.float16)
    stage = choose_zero_stage(cfg, plan)[0]
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 1, bias=False).half()
    before = m.weight.detach().float().clone()
    engine, _, _, _ = deepspeed.initialize(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=100.0),
                                           config=deepspeed_config(cfg, 1, use_bf16=False, use_fp16=True, stage=stage))
    tune_optimizer_step(engine)
    # d/dW 0.01 sum(W x) = 0.01 x = 0.01 (the output's gradient scaled by 2^16 stays finite in fp16); SGD at lr 100
    # moves each weight by -1
    engine.backward(0.01 * engine(torch.ones((1, 4), dtype=torch.float16)).float().sum())
    engine.step()
    moved = (engine.module.weight.detach().float() - before).flatten().tolist()
    assert engine.skipped_steps == 0 and all(abs(d + 1.0) < 2e-3 for d in moved), (stage, moved)
    print(f"fp16 update ok at stage {stage}")


def _accumulation_check():
    """Run in a process of its own (as _flat_norm_check)."""
    import deepspeed

    from engine.distributed import init_distributed

    init_distributed()
    cfg, _, _, module = _setup("mntp", ["model.dtype=bf16", "model.gradient_checkpointing=false", "batch_size=4",
                                        "micro_batch_size=2"])
    for stage in (2, 3):
        params = [p for p in module.parameters() if p.requires_grad]
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(params, lr=1e-3),
                                               config=deepspeed_config(cfg, 1, use_bf16=True, stage=stage))
        assert engine.optimizer.gradient_accumulation_dtype == torch.float32, stage
        if stage == 2:
            assert engine.optimizer.use_separate_grad_accum
        engine.destroy()
    print("fp32 accumulation ok")


@pytest.mark.slow
def test_bf16_gradients_accumulate_in_fp32_at_zero_stages_2_and_3():
    r = run_cmd([sys.executable, "-m", "tests.run_check", "tests.test_step_structure:_accumulation_check"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "fp32 accumulation ok" in r.stdout


@pytest.mark.slow
def test_a_skipped_stage_0_step_leaves_the_schedule_where_it_was():
    """A non-finite step under stage 0 (engine.optim's own skip) is counted in skipped_steps, leaves the weights,
    and does not advance the LR schedule: what DeepSpeed does with the steps it skips itself under ZeRO."""
    import sys

    r = run_cmd([sys.executable, "-m", "tests.run_check", "tests.test_step_structure:_stage0_skip_check"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "stage 0 skip ok" in r.stdout


def test_fp16_trains_at_a_zero_stage_whose_optimizer_scales_the_loss():
    """fp16 with a replicated base is stage 1 (zero_stage auto), and its first update is the gradient's, not
    2^-16 of it as under DeepSpeed's stage-0 fp16 optimizer; zero_stage 0 with fp16 is a config error."""
    r = run_cmd([sys.executable, "-m", "tests.run_check", "tests.test_step_structure:_fp16_update_check"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "fp16 update ok at stage 1" in r.stdout
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="fp16 needs zero_stage 1, 2, 3 or auto"):
        load_config("configs/tiny/mntp.yaml", ["model.dtype=fp16", "zero_stage=0"])
    load_config("configs/tiny/mntp.yaml", ["model.dtype=fp16", "zero_stage=1"])


def test_the_held_out_loss_weighs_each_batch_by_its_masked_tokens():
    """Stage.evaluate's held_out_mean: the mean over every loss unit (MNTP's masked tokens), as the training step's
    loss is; a batch with no unit weighs nothing; a stage without units (contrastive) averages its batches; no
    unit at all leaves the cell empty (None)."""
    from engine.stages.base import held_out_mean

    assert held_out_mean([(2.0, 1), (4.0, 3)]) == pytest.approx(3.5)  # the mean of the batch means would be 3.0
    assert held_out_mean([(2.0, 1), (0.0, 0), (4.0, 3)]) == pytest.approx(3.5)
    assert held_out_mean([(2.0, None), (4.0, None)]) == pytest.approx(3.0)
    assert held_out_mean([(0.0, 0), (0.0, 0)]) is None


def test_cpu_ranks_split_the_cores(monkeypatch):
    # torch gives every process one thread per core; two DeepSpeed CPU ranks on two cores then ran four OpenMP
    # threads that spin-wait on each other (a SmolLM2 step took 112 s instead of 4 s). Each rank gets its share.
    from engine import distributed

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
        for local, want in (("2", 4), ("3", 2), ("8", 1), ("16", 1)):
            torch.set_num_threads(8)
            monkeypatch.setenv("LOCAL_SIZE", local)
            distributed.split_cpu_threads()
            assert torch.get_num_threads() == want, local
        torch.set_num_threads(8)
        monkeypatch.setenv("OMP_NUM_THREADS", "8")  # the user's explicit choice stands
        distributed.split_cpu_threads()
        assert torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(before)


def test_ranks_per_host_read_from_the_deepspeed_launcher_or_torchrun(monkeypatch):
    """The host-RAM budget and the CPU thread split are per host: torchrun says LOCAL_WORLD_SIZE, DeepSpeed's launcher
    LOCAL_SIZE. The trainer read LOCAL_SIZE alone, so a multi-node torchrun run divided a host's RAM by the world."""
    from engine.distributed import local_world_size

    for var in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert local_world_size() == 1 and local_world_size(16) == 16
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert local_world_size() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert local_world_size() == 8 and local_world_size(16) == 8
    monkeypatch.setenv("LOCAL_SIZE", "4")
    assert local_world_size(16) == 4


@pytest.mark.parametrize("stage_name", ["mntp", "supervised"])
def test_held_out_eval_batches_go_to_the_engines_device(stage_name):
    """DeepSpeed's forward moves nothing: the held-out batches go to the engine's device as training batches do
    (CPU ids met a GPU embedding at the first eval of every GPU run with a held-out eval_data)."""
    cfg, stage, items, _ = _setup(stage_name)
    seen = []

    class Engine:  # what Stage.evaluate uses of a DeepSpeed engine: its device and its forward
        device = torch.device("meta")

        def __call__(self, batch):
            assert "truncated" not in batch
            seen.extend({v.device.type for v in batch.values() if torch.is_tensor(v)})
            return torch.tensor(1.0), {}

    assert stage.evaluate(Engine(), items, 1, 0, 2) == {"eval_loss": 1.0}
    assert seen and set(seen) == {"meta"}


def test_held_out_contrastive_loss_gathers_nothing_and_dev_sts_reads_the_recorded_instruction(monkeypatch):
    """Every rank evaluates the same batches, so the held-out loss gathers nothing across ranks (W copies of one
    batch read log W too high); training still gathers. The dev STS score that picks best/ encodes with the
    instruction the adapter records and its encoder applies by default."""
    import llm2vec_kernels

    import engine.encoder
    from engine.checkpoint import sts_spearman

    cfg, stage, items, module = _setup("supervised", ["lora.dropout=0"])
    assert cfg.contrastive.gather_across_ranks and cfg.contrastive.instruction
    gathers = []
    real = llm2vec_kernels.contrastive_loss
    monkeypatch.setattr(llm2vec_kernels, "contrastive_loss",
                        lambda *a, **k: gathers.append(k["gather_across_ranks"]) or real(*a, **k))
    module.eval()
    stage.evaluate(PlainEngine(module), items, 1, 0, 2)
    assert gathers == [False, False]
    batch = stage.collate(items[:cfg.micro_batch_size], torch.Generator().manual_seed(0))
    batch.pop("truncated")
    module(batch)
    assert gathers[-1] is True

    class Seen(Exception):
        pass

    def encoder(*a, **k):
        raise Seen(k["instruction"])

    monkeypatch.setattr(engine.encoder, "Encoder", encoder)
    with pytest.raises(Seen, match=cfg.contrastive.instruction):
        sts_spearman(module, stage, f"{STS}/sts-dev.csv", 10)
