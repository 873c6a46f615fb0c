"""Real multi-rank DeepSpeed ZeRO-3 runs on CPU (gloo): train, checkpoint, get killed, resume exactly."""
import csv
import json
import os

import pytest
from safetensors.torch import load_file

from .helpers import deepspeed_cmd, leaked_shm, run_cmd

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


def test_mntp_two_ranks_trains_is_killed_and_resumes_exactly(tmp_path):
    cfg = "configs/tiny/mntp.yaml"
    ref, crash = str(tmp_path / "ref"), str(tmp_path / "crash")
    cmd = deepspeed_cmd(2, "--config", cfg, f"output_dir={ref}")
    r = run_cmd(cmd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not leaked_shm(cmd)  # DeepSpeed's 69 MB-per-rank shm segments do not outlive the run
    rows = _metrics(ref)
    assert [int(x["step"]) for x in rows] == list(range(1, 13))
    losses = [float(x["loss"]) for x in rows]
    assert sum(losses[-4:]) / 4 < sum(losses[:2]) / 2 - 0.1, f"loss did not fall: {losses}"
    evals = {int(x["step"]): x["eval_loss"] for x in rows if x["eval_loss"]}
    assert sorted(evals) == [6, 12] and all(0 < float(v) < 20 for v in evals.values())  # held-out MNTP loss
    _check_adapter(os.path.join(ref, "adapter"))

    # Same run, rank 0 SIGKILLed at the start of step 8 (checkpoint at 6 exists).
    cmd = deepspeed_cmd(2, "--config", cfg, f"output_dir={crash}")
    r = run_cmd(cmd, env={"LLM2VEC_ENGINE_FAIL_AT_STEP": "7"})
    assert r.returncode != 0 and "fault injection" in r.stdout
    assert not leaked_shm(cmd)  # not even from a killed run
    with open(os.path.join(crash, "checkpoints", "latest")) as f:
        assert f.read().strip() == "step_0000006"
    assert os.path.isfile(os.path.join(crash, "checkpoints", "step_0000006", "COMPLETE"))  # marked after the barrier
    assert not os.path.exists(os.path.join(crash, "adapter"))
    _check_adapter(os.path.join(crash, "checkpoints", "step_0000006", "adapter"))

    r = run_cmd(deepspeed_cmd(2, "--config", cfg, f"output_dir={crash}"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from step_0000006: step 6" in r.stdout
    resumed = {int(x["step"]): float(x["loss"]) for x in _metrics(crash)}
    for step in range(7, 13):  # same batches, masks and optimizer state as the uninterrupted run
        assert resumed[step] == pytest.approx(losses[step - 1], rel=1e-5, abs=1e-6), step
    _check_adapter(os.path.join(crash, "adapter"))


@pytest.mark.parametrize("stage,extra", [("simcse", []), ("supervised", ["contrastive.grad_cache_chunk=5"])])
def test_contrastive_stages_two_ranks(tmp_path, stage, extra):
    out = str(tmp_path / stage)
    r = run_cmd(deepspeed_cmd(2, "--config", f"configs/tiny/{stage}.yaml", f"output_dir={out}", *extra))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _metrics(out)
    assert len(rows) == 6 and all(float(x["loss"]) >= 0 for x in rows)
    if stage == "simcse":  # periodic STS eval (eval_every 3): its column appears, aligned, on steps 3 and 6
        evals = {int(x["step"]): x["eval_sts_spearman"] for x in rows}
        assert [s for s, v in evals.items() if v] == [3, 6]
        assert all(-100 <= float(evals[s]) <= 100 for s in (3, 6))
    _check_adapter(os.path.join(out, "adapter"))
    from engine import Encoder

    enc = Encoder.from_pretrained(out, device="cpu")
    emb = enc.encode(["A man is playing a guitar.", "Someone plays an instrument."], convert_to_tensor=True)
    assert emb.shape == (2, 64) and emb.isfinite().all()


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
        assert msg in r.stderr, (msg, r.stderr[-2000:])


def test_unsupported_architecture_run(tmp_path):
    r = run_cmd(["python", "engine/train.py", "--config", "configs/tiny/mntp.yaml", f"output_dir={tmp_path}",
                 "model.random_init={model_type: gpt2, n_layer: 1, n_embd: 16, n_head: 2}"], timeout=300)
    assert r.returncode != 0
    assert "architecture 'gpt2' is not supported" in r.stderr
