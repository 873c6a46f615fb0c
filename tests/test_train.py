"""Real multi-rank DeepSpeed ZeRO-3 runs on CPU (gloo): train, checkpoint, get killed, resume exactly."""
import csv
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from engine.data import EVAL_STS_ORDER
from engine.stages.base import EVAL_LOSS_RULE

from .helpers import deepspeed_cmd, leaked_shm, rewind_run, run_cmd

pytestmark = pytest.mark.slow


def _metrics(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def _check_adapter(path):
    assert os.path.isfile(os.path.join(path, "adapter_model.safetensors"))
    sd = load_file(os.path.join(path, "adapter_model.safetensors"))
    assert sd and all("lora_" in k for k in sd)
    assert any(v.abs().sum() > 0 for k, v in sd.items() if "lora_B" in k), "LoRA B must have moved from zero"
    with open(os.path.join(path, "adapter_config.json")) as f:
        assert json.load(f)["peft_type"] == "LORA"
    with open(os.path.join(path, "engine_encoder.json")) as f:  # the family a merge checks (the tiny configs': llama)
        assert json.load(f)["model_type"] == "llama"


def test_mntp_two_ranks_trains_is_killed_and_resumes_exactly(tmp_path):
    cfg = "configs/tiny/mntp.yaml"
    ref, crash = str(tmp_path / "ref"), str(tmp_path / "crash")
    fits = "memory_budget_gb=64"  # a budget the tiny base fits on any host: zero_stage auto is stage 0 (below)
    cmd = deepspeed_cmd(2, "--config", cfg, fits, f"output_dir={ref}")
    dump = str(tmp_path / "grads")  # the gradients before each optimizer step (test_distributed_equality)
    r = run_cmd(cmd, env={"LLM2VEC_ENGINE_DUMP_GRADS": dump})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not leaked_shm(cmd)  # DeepSpeed's 69 MB-per-rank shm segments do not outlive the run
    # zero_stage auto: the replicated tiny base fits the budget, so stage 0 and plain torch AdamW
    # (test_step_structure holds the other side: stage 3 when it does not fit)
    assert "[engine] zero stage 0: " in r.stdout, r.stdout[-3000:]
    assert "[engine] optimizer: torch AdamW (no DeepSpeed wrapper), ZeRO stage 0, float32 parameters" in r.stdout
    cores = len(os.sched_getaffinity(0))
    if cores >= 2 and "OMP_NUM_THREADS" not in os.environ:  # the two ranks split the cores (no oversubscription)
        assert f"CPU: 2 ranks on {cores} cores, {cores // 2} intra-op thread(s) per rank" in r.stdout
    rows = _metrics(ref)
    assert [int(x["step"]) for x in rows] == list(range(1, 13))
    losses = [float(x["loss"]) for x in rows]
    assert sum(losses[-4:]) / 4 < sum(losses[:2]) / 2 - 0.1, f"loss did not fall: {losses}"
    from engine.config import load_config
    from engine.optim import lr_lambda

    f = lr_lambda(load_config(cfg))  # warmup 2, then linear decay to 0 at step 12; each row: the LR its step applied
    assert [float(x["lr"]) for x in rows] == pytest.approx([1e-2 * f(s) for s in range(0, 12)])
    assert float(rows[0]["lr"]) == pytest.approx(5e-3) and float(rows[1]["lr"]) == pytest.approx(1e-2)
    assert float(rows[-1]["lr"]) == pytest.approx(1e-3)  # step 12 applies f(11); the decay's 0 would be step 13's
    evals = {int(x["step"]): x["eval_loss"] for x in rows if x["eval_loss"]}
    assert sorted(evals) == [6, 12] and all(0 < float(v) < 20 for v in evals.values())  # held-out MNTP loss
    _check_adapter(os.path.join(ref, "adapter"))
    with open(os.path.join(ref, "adapter", "engine_encoder.json")) as f:  # the base as the config named it (an alias)
        meta = json.load(f)
    assert meta["base_model_name"] == load_config(cfg).model.name_or_path == "smollm2-135m"
    assert meta["eval_loss_rule"] == EVAL_LOSS_RULE and meta["step"] == 12  # what engine.pick reads
    assert meta["eval_sts_order"] == EVAL_STS_ORDER
    # Step 1 on two ranks is the step one rank computes on the same global batch: the same loss and gradients
    from .test_distributed_equality import assert_same_step, one_rank_step, step_one

    one = one_rank_step(tmp_path, cfg, fits)
    assert 0 < one[0]
    assert_same_step(one, step_one(ref, dump, steps=12))

    # Same run, rank 0 SIGKILLed at the start of step 8 (checkpoint at 6 exists).
    cmd = deepspeed_cmd(2, "--config", cfg, fits, f"output_dir={crash}", launcher="deepspeed")  # a rank dies
    r = run_cmd(cmd, env={"LLM2VEC_ENGINE_FAIL_AT_STEP": "7"})
    assert r.returncode != 0 and "fault injection" in r.stdout
    assert not leaked_shm(cmd)  # not even from a killed run
    with open(os.path.join(crash, "checkpoints", "latest")) as f:
        assert f.read().strip() == "step_0000006"
    assert os.path.isfile(os.path.join(crash, "checkpoints", "step_0000006", "COMPLETE"))  # marked after the barrier
    assert not os.path.exists(os.path.join(crash, "adapter"))
    _check_adapter(os.path.join(crash, "checkpoints", "step_0000006", "adapter"))

    r = run_cmd(deepspeed_cmd(2, "--config", cfg, fits, f"output_dir={crash}"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from step_0000006: step 6" in r.stdout
    resumed = {int(x["step"]): float(x["loss"]) for x in _metrics(crash)}
    for step in range(7, 13):  # same batches, masks and optimizer state as the uninterrupted run
        assert resumed[step] == pytest.approx(losses[step - 1], rel=1e-5, abs=1e-6), step
    _check_adapter(os.path.join(crash, "adapter"))

    # engine.pick reads both real run folders: the same run, so nothing differs and the held-out losses at step 12
    # agree; the resumed run's reading is its own later row
    from engine.pick import pick

    res = pick([ref, crash])
    assert res["settings_that_differ"] == [] and res["step"] == 12 and len(res["runs"]) == 2
    got = {r["path"]: r["eval_loss"] for r in res["runs"]}
    assert got[ref] == float(evals[12]) and got[crash] == pytest.approx(got[ref], rel=1e-4)
    assert res["picked"]["adapter"] == os.path.join(min(got, key=lambda p: (got[p], p != ref)), "adapter")


@pytest.mark.parametrize("stage,nproc,extra", [
    # SimCSE: 2 ranks, attention dropout 0.3 + LoRA dropout, cross-rank negatives, gradient caching in 3s
    ("simcse", 2, ["contrastive.grad_cache_chunk=3", "eval_every=4"]),
    # supervised: hard negatives, LoRA dropout, gradient caching in 3s (one rank: the cheaper half)
    ("supervised", 1, ["contrastive.grad_cache_chunk=3"]),
])
def test_contrastive_stage_is_killed_and_resumes_exactly(tmp_path, stage, nproc, extra):
    # Dropout masks and the gradient cache's RNG replay are functions of (seed, step, micro-batch slot): a run
    # resumed from its step-2 checkpoint (helpers.rewind_run: the folder a kill just after it leaves; the kill
    # itself is the MNTP test's) continues with exactly the losses, gradient norms and final adapter of the
    # uninterrupted run, and the same STS evaluation at the end. log_every=3: row 3 counts the texts cut in steps
    # 1 to 3, two of them before the checkpoint (the count is carried in it; a resumed run restarted it at 0).
    cfg = f"configs/tiny/{stage}.yaml"
    ref, crash = str(tmp_path / "ref"), str(tmp_path / "crash")
    args = ["--config", cfg, "max_steps=4", "save_every=2", "batch_size=8", "micro_batch_size=2", "eval_every=0",
            "log_every=3", *extra]

    def cmd(out):
        return deepspeed_cmd(nproc, *args, f"output_dir={out}") if nproc > 1 else \
            ["python", "engine/train.py", *args, f"output_dir={out}"]

    r = run_cmd(cmd(ref))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _metrics(ref)
    assert [int(x["step"]) for x in rows] == [3, 4]
    rewind_run(ref, crash, 2)  # (keeps best/: a run killed after a later eval leaves it, of a step it trains again)
    r = run_cmd(cmd(crash))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from step_0000002: step 2" in r.stdout
    resumed = _metrics(crash)
    assert [int(x["step"]) for x in resumed] == [3, 4]
    for a, b in zip(rows, resumed):
        for key in ("loss", "grad_norm"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-5, abs=1e-9), (a["step"], key)
    assert [x["truncated"] for x in resumed] == [x["truncated"] for x in rows]
    if stage == "supervised":  # texts are cut (max_len 32 after the instruction), so the carried count matters
        assert int(rows[0]["truncated"]) > 0
    if stage == "simcse":  # the periodic STS eval runs at step 4 only, on the resumed model as on the other
        assert [int(x["step"]) for x in rows if x.get("eval_sts_spearman")] == [4]
        assert float(resumed[1]["eval_sts_spearman"]) == pytest.approx(float(rows[1]["eval_sts_spearman"]), abs=1e-6)
        # best/: the uninterrupted run wrote it at step 4; the resumed run found the killed run's step-4 best/ and
        # must write it again (best_saved 1, as the uninterrupted row), not tie it, and end with the same best/
        assert [x["best_saved"] for x in resumed] == [x["best_saved"] for x in rows] == ["", "1"]
        recs = []
        for out in (ref, crash):
            with open(os.path.join(out, "best", "engine_best.json")) as f:
                recs.append(json.load(f))
        assert recs[0]["step"] == recs[1]["step"] == 4
        assert recs[1]["spearman"] == pytest.approx(recs[0]["spearman"], abs=1e-6)
        b_ref = load_file(os.path.join(ref, "best", "adapter_model.safetensors"))
        b_res = load_file(os.path.join(crash, "best", "adapter_model.safetensors"))
        assert sorted(b_ref) == sorted(b_res)
        for k in b_ref:
            torch.testing.assert_close(b_res[k], b_ref[k], rtol=1e-5, atol=1e-7)
        # each checkpoint records best/ as of its step (none yet at step 2) and keeps it, for a resume to put back
        with open(os.path.join(crash, "checkpoints", "step_0000002", "run.json")) as f:
            assert json.load(f)["best"] is None
        with open(os.path.join(crash, "checkpoints", "step_0000004", "run.json")) as f:
            assert json.load(f)["best"] == recs[1]
        assert _same_files(os.path.join(crash, "checkpoints", "step_0000004", "best"), os.path.join(crash, "best"))
    _check_adapter(os.path.join(ref, "adapter"))
    a_ref = load_file(os.path.join(ref, "adapter", "adapter_model.safetensors"))
    a_res = load_file(os.path.join(crash, "adapter", "adapter_model.safetensors"))
    assert sorted(a_ref) == sorted(a_res)
    for k in a_ref:
        torch.testing.assert_close(a_res[k], a_ref[k], rtol=1e-5, atol=1e-7)

    # The adapter loads with plain PEFT onto the same base, and with the engine's Encoder.
    from peft import PeftModel

    from engine import Encoder
    from engine.config import load_config
    from engine.modeling import load_model

    base, _ = load_model(load_config(cfg).model, "cpu")
    peft = PeftModel.from_pretrained(base, os.path.join(ref, "adapter"))
    loaded = {k: v for k, v in peft.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(a_ref)
    for k, v in a_ref.items():  # PEFT names the file's keys without the adapter name
        match = [x for name, x in loaded.items() if name.replace(".default", "") == k]
        assert len(match) == 1 and torch.equal(match[0], v), k
    enc = Encoder.from_pretrained(ref, device="cpu")
    emb = enc.encode(["A man is playing a guitar.", "Someone plays an instrument."], convert_to_tensor=True)
    assert emb.shape == (2, 64) and emb.isfinite().all()


def _same_files(a, b):
    names = sorted(os.listdir(a))
    if names != sorted(os.listdir(b)):
        return False
    for n in names:
        with open(os.path.join(a, n), "rb") as x, open(os.path.join(b, n), "rb") as y:
            if x.read() != y.read():
                return False
    return True


def test_bad_inputs_give_clear_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (["data=/does/not/exist.txt"], "data file not found: /does/not/exist.txt"),
        ([f"data={empty}"], "data file is empty"),
        (["max_stepz=3"], "unknown config key 'max_stepz'"),
        (["batch_size=9"], "batch_size 9 is not divisible by micro_batch_size 2 x world size 1"),
    ]
    for overrides, msg in cases:
        r = run_cmd(["python", "engine/train.py", "--config", "configs/tiny/mntp.yaml",
                     f"output_dir={tmp_path / 'o'}", *overrides], timeout=300)
        assert r.returncode == 2, (overrides, r.stderr[-2000:])
        assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, (msg, r.stderr[-2000:])
        assert not os.path.exists(tmp_path / "o")  # said before the output folder was made


def test_unsupported_architecture_run(tmp_path):
    r = run_cmd(["python", "engine/train.py", "--config", "configs/tiny/mntp.yaml", f"output_dir={tmp_path}",
                 "model.random_init={model_type: gpt2, n_layer: 1, n_embd: 16, n_head: 2}"], timeout=300)
    assert r.returncode != 0
    assert "architecture 'gpt2' is not supported" in r.stderr


def test_offload_optimizer_trains_as_without_it(tmp_path):
    """offload_optimizer=true crashed in deepspeed.initialize (ZeRO-Offload refuses a client optimizer unless told
    otherwise) after the model had loaded. It now steps the engine's AdamW on the offloaded state, with the same
    losses as the run without offload; at stage 0, where DeepSpeed cannot offload, it is a warning."""
    import csv

    losses = {}
    for name, extra in (("plain", []), ("offload", ["offload_optimizer=true"])):
        r = run_cmd(["python", "engine/train.py", "--config", "configs/tiny/mntp.yaml", f"output_dir={tmp_path / name}",
                     "max_steps=3", "save_every=3", "eval_every=0", "zero_stage=2", *extra], timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        with open(tmp_path / name / "metrics.csv") as f:
            losses[name] = [float(row["loss"]) for row in csv.DictReader(f) if row.get("loss")]
    assert len(losses["plain"]) == 3 and losses["offload"] == pytest.approx(losses["plain"], rel=1e-5, abs=1e-6)
    from engine.config import deepspeed_config, load_config, offload_warning

    cfg = load_config("configs/tiny/mntp.yaml", ["offload_optimizer=true"])
    assert "ZeRO stage 0" in offload_warning(cfg, 0) and offload_warning(cfg, 1) is None
    assert "offload_optimizer" not in deepspeed_config(cfg, 1, False, stage=0)["zero_optimization"]
    assert deepspeed_config(cfg, 1, False, stage=2)["zero_force_ds_cpu_optimizer"] is False


def test_a_bad_input_on_every_rank_is_said_once(tmp_path):
    """Before the process group exists every rank finds the same bad input; each printed it (8 lines on 8 GPUs).
    The host's first rank says it; the others exit 2 without a line."""
    for overrides, msg in ((["max_stepz=3"], "config error: unknown config key 'max_stepz'"),
                           (["data=/does/not/exist.txt"], "error: data file not found: /does/not/exist.txt")):
        r = run_cmd(deepspeed_cmd(2, "--config", "configs/tiny/mntp.yaml", f"output_dir={tmp_path / 'o'}",
                                  *overrides), timeout=300)
        lines = [x for x in r.stderr.splitlines() if "error" in x]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(msg), r.stderr[-3000:]


def test_a_rank_leaves_through_os_exit_once_main_has_returned(monkeypatch):
    """A multi-rank run's process leaves through os._exit after main returns: the interpreter's exit could abort in
    the destructors of communication threads ("terminate called without an active exception", exit 250) after
    training had finished. A single process exits as usual."""
    import engine.train as T

    class Left(BaseException):
        pass

    def leave(how):
        def f(code):
            seen.append((how, code))
            raise Left  # neither returns
        return f

    seen = []
    monkeypatch.setattr(T.os, "_exit", leave("os._exit"))
    monkeypatch.setattr(T.sys, "exit", leave("sys.exit"))
    for world, code in (("2", 2), ("1", 0)):
        monkeypatch.setenv("WORLD_SIZE", world)
        with pytest.raises(Left):
            T.exit_with(code)
    assert seen == [("os._exit", 2), ("sys.exit", 0)]


def _one_positive_data(tmp_path):
    """16 supervised rows whose positives are all one passage (each with its own query and hard negative)."""
    data = tmp_path / "same-positive.jsonl"
    with open(data, "w") as f:
        for i in range(16):
            f.write(json.dumps({"query": f"question number {i} about the river",
                                "positive": "The river floods in spring.",
                                "negative": f"Unrelated passage {i} on mountains and snow."}) + "\n")
    return data


def test_false_negatives_left_out_are_counted_per_logged_row_and_over_a_resume(tmp_path):
    # contrastive.mask_false_negatives: every row's positive is one passage, so in each micro-batch of 2 queries each
    # query's other candidate copy of it is left out: 2 pairs a micro-batch, 4 micro-batches a step, 8 a step.
    # metrics.csv counts them since the last logged row, as it counts cut texts (log_every=2: row 2 holds steps 1
    # and 2), and a run resumed from step 1's checkpoint carries step 1's count into row 2.
    data = _one_positive_data(tmp_path)
    ref, crash = str(tmp_path / "ref"), str(tmp_path / "crash")
    args = ["python", "engine/train.py", "--config", "configs/tiny/supervised.yaml", f"data={data}", "max_steps=3",
            "save_every=1", "keep_checkpoints=3", "batch_size=8", "micro_batch_size=2", "eval_every=0", "log_every=2",
            "contrastive.mask_false_negatives=true"]
    r = run_cmd([*args, f"output_dir={ref}"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _metrics(ref)
    assert [(int(x["step"]), int(x["false_negatives"])) for x in rows] == [(2, 16), (3, 8)], rows
    rewind_run(ref, crash, 1)
    r = run_cmd([*args, f"output_dir={crash}"])
    assert r.returncode == 0 and "resumed from step_0000001" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert [(x["step"], x["false_negatives"], x["loss"]) for x in _metrics(crash)] == \
        [(x["step"], x["false_negatives"], x["loss"]) for x in rows]


def test_false_negatives_are_counted_over_the_ranks_gathered_texts(tmp_path):
    # Two ranks, the same one-positive data: each micro-step gathers 2 ranks x (2 positives + 2 negatives), 4 of them
    # copies of every query's positive, so each of the 4 queries leaves out 3 (12 pairs), and a step of 2 micro-steps
    # a rank logs 24: the count of the global batch, summed over the ranks (each counts its own queries).
    data = _one_positive_data(tmp_path)
    out = str(tmp_path / "run")
    r = run_cmd(deepspeed_cmd(2, "--config", "configs/tiny/supervised.yaml", f"data={data}", "max_steps=1",
                              "batch_size=8", "micro_batch_size=2", "eval_every=0",
                              "contrastive.mask_false_negatives=true", f"output_dir={out}"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [int(x["false_negatives"]) for x in _metrics(out)] == [24]
