"""The CPU proxy of the GPU train step (benchmarks/bench_step_ops.py, step_census.py, step_cost.py,
step_paths.py): its counters, its cost model, the
llm2vec reference path against the engine's loss, and a reduced end-to-end run of all three paths."""
import json
import sys

import pytest
import torch

from benchmarks import bench_step_ops as so
from benchmarks import step_census, step_cost, step_paths
from benchmarks.harness import hf_reference_forward

from .helpers import run_cmd


def test_census_counts_kernels_and_device_syncs_not_host_seeds():
    mode = step_census.OpCensus()
    x = torch.randn(8, 16)
    drop = torch.nn.Dropout(0.1)
    with step_census.gpu_like_ops(), step_census.patched_tolist(mode), mode:
        mode.count_syncs = True
        y = drop(x)  # one aten::native_dropout, as on CUDA
        z = (y * 2).sum()
        float(z)  # a device -> host sync
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # a host-side seed draw: neither launch nor sync
        (x > 0).nonzero()  # a sync (and a launch)
        x[:2].tolist()  # a sync
        x.view(16, 8).t()  # views launch nothing
    assert seed >= 0
    assert mode.ops["aten.native_dropout"] == 1 and "aten.bernoulli_" not in mode.ops
    assert mode.syncs == {"aten._local_scalar_dense": 1, "aten.nonzero": 1, "tolist": 1}
    assert "aten.randint" not in mode.ops and "aten.view" not in mode.ops and "aten.t" not in mode.ops
    assert mode.ops["aten.mul"] == 1 and mode.ops["aten.sum"] == 1 and mode.ops["aten.gt"] == 1


def test_triton_launches_are_counted_and_skipped():
    import kernels

    launches = step_census.TritonLaunches()
    q = torch.randn(2, 16, 4, 8, requires_grad=True)
    k = torch.randn(2, 16, 2, 8, requires_grad=True)
    with launches.active():
        out = kernels.flash_attention(q, k, k, impl="triton")
        out.sum().backward()
    assert launches.calls[0] == "_attn_fwd" and "_attn_bwd_dkdv" in launches.calls and len(launches.calls) >= 3
    # nothing ran: a real interpreter launch would take seconds and fill the output
    assert launches.calls.count("_attn_fwd") == 1


def test_cost_model_on_one_mlp_gemm():
    phase = ["fwd_bwd"]
    mode = step_cost.CostMode({"V": 32000, "r": 16}, [512], phase)
    a = torch.empty(16384, 4096, dtype=torch.bfloat16, device="meta")
    w = torch.empty(4096, 14336, dtype=torch.bfloat16, device="meta")
    idx = mode.to_meta(torch.tensor([0, 2, 5]))
    with mode:
        a @ w
        a.index_select(0, idx)  # shadowed index: still costed as a gather on the meta tensor
        n = int((idx > 1).sum())  # real values from the shadow
    assert n == 2
    name, cat, flops, nbytes = mode.rows[0]
    assert (name, cat, flops) == ("mm", "gemm", 2 * 16384 * 4096 * 14336)
    assert nbytes == 2 * (16384 * 4096 + 4096 * 14336 + 16384 * 14336)
    pred, n_ops = step_cost.predicted(mode.rows[:1], floor_us=4.0)
    assert pred["gemm"] == pytest.approx(flops / step_cost.PEAK_FLOPS * 1e3 + 4e-3) and n_ops["gemm"] == 1
    assert pred["gemm"] == pytest.approx(2.4396, rel=1e-4)  # ms: 1.924 TFLOP at 790 TFLOP/s + 4 us


def test_reference_path_computes_the_engines_mntp_loss():
    """llm2vec's recipe (HF model + PEFT, SDPA without a mask, HF's loss on unshifted labels) and the engine's
    MNTP stage on the same weights and batch: the same loss before any step (LoRA B starts at zero)."""
    import kernels

    spec = dict(step_paths.TINY, num_hidden_layers=2, vocab_size=256)
    sets = ["model.attention=torch", "model.loss=torch", "model.dtype=fp32"]
    try:
        ref = step_paths.Path("reference", spec, "cpu", sets, 4)
        eng = step_paths.Path("engine", spec, "cpu", sets, 4)
        batch = step_paths.Batch(4, 32, spec["vocab_size"], 0.3, "all")
        ref.model.eval()
        eng.module.eval()
        with torch.no_grad():
            lr = float(hf_reference_forward(ref.model, batch.hf))
            le = float(eng.module(batch.engine)[0])
    finally:
        for op in ("attention", "masked_ce", "contrastive"):
            kernels.set_default_impl(op, "auto")
    assert batch.masked > 0
    assert abs(lr - le) < 1e-5 * abs(le), (lr, le)


def test_bad_override_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        so.main(["--set", "model.no_such_key=1"])
    assert e.value.code == 2 and "no_such_key" in capsys.readouterr().err


def det_zero(path, name):
    with open(path) as f:
        return json.load(f)[name]["zero"]


@pytest.mark.slow
def test_reduced_run_all_paths(tmp_path):
    full = str(tmp_path / "full.json")
    r = run_cmd([sys.executable, "-m", "benchmarks.bench_step_ops", "--reduced", "--jobs", "3", "--json", full],
                timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    res = json.loads(lines[-1])
    assert set(res) == {"reference", "reference-zero3", "engine"}
    # the table's header (DeepSpeed may log a line to stdout when it is imported)
    assert any("predicted_ms" in ln for ln in lines[:4]) and any(ln.startswith("census engine:") for ln in lines)
    for p, v in res.items():
        assert set(v) == {"launches", "syncs", "zero_hooks", "host_ms", "predicted_ms"}, (p, v)
        assert v["launches"] > 100 and v["predicted_ms"] > 0 and 0 < v["host_ms"]["min"] <= v["host_ms"]["median"]
    assert res["reference"]["zero_hooks"] == 0 and res["reference-zero3"]["zero_hooks"] > 0
    # the engine's own setup: zero_stage auto replicates a bf16 base that fits (stage 1 for DeepSpeed's flat bf16
    # optimizer, no ZeRO-3 hooks), and collate hands packing and the masked rows over from the host (no sync
    # inside forward and backward)
    assert res["engine"]["zero_hooks"] == 0 and det_zero(full, "engine") == "1"
    assert res["engine"]["syncs"] == 0
    assert res["engine"]["launches"] < 0.5 * res["reference"]["launches"]  # fused LoRA groups and decoder ops
    det = json.load(open(full))
    for p, v in det.items():
        # every counted and timed step was a real step: DeepSpeed skips the optimizer on a non-finite gradient,
        # which the garbage outputs of skipped Triton launches used to cause now and then
        assert v["skipped_steps"] == 0 and v["host_skipped_steps"] == 0, p
        # the op stream does not depend on the batch: the same count at two batch sizes
        small = v["census_host_batch"]
        assert v["launches"] == v["launches_host_batch"], (p, {k: (n, small.get(k)) for k, n in v["census"].items()
                                                               if small.get(k) != n})
        if p == "engine":
            # DeepSpeed's flat bf16 optimizer with the engine's flat gradient norm: one norm and one clip for all
            # 28 LoRA tensors, and two host reads (the inf/NaN check and the clip test), not one per tensor
            opt = v["optimizer_census"]
            assert opt["aten.linalg_vector_norm"] == 1 and opt.get("aten.mul_", 0) <= 1
            assert v["optimizer_syncs"] == 2 and v["optimizer_launches"] < 40, v["optimizer_census"]
            # LoRA dropout is drawn inside the fused LoRA kernels: no dropout op at all
            assert "aten.native_dropout" not in v["census"] and "aten.native_dropout" not in v["census_full_nozero"]
            assert v["census"]["triton:_lora_down_kernel"] > 0
        else:  # 2 layers x 7 LoRA projections x (forward + checkpoint recompute) dropouts, at both sizes
            assert v["census"]["aten.native_dropout"] == 28 and v["census_full_nozero"]["aten.native_dropout"] == 28
    # the engine's attention runs in Triton: per layer 1 forward launch (2 when recomputed: the selective policy
    # cannot see Triton kernels, so they rerun too) + 1 dK/dV launch in the backward
    tri = {k: n for k, n in det["engine"]["census"].items() if k.startswith("triton:")}
    fwd_per_layer = 1 if det["engine"]["recompute"] == "none" else 2
    assert tri["triton:_attn_fwd"] == 2 * fwd_per_layer and tri["triton:_attn_bwd_dkdv"] == 2, tri
    assert not any(k.startswith("triton:") for k in det["reference"]["census"])


def test_readme_step_figures_are_the_committed_run():
    """The README's CPU-proxy sentence quotes benchmarks/results/2026-11-30-cpu-step-ops-optimizer/."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = os.path.join(root, "benchmarks", "results", "2026-11-30-cpu-step-ops-optimizer")
    with open(os.path.join(res, "results.json")) as f:
        run = json.load(f)
    with open(os.path.join(res, "results-engine-stage0.json")) as f:
        stage0 = json.load(f)["engine"]
    with open(os.path.join(root, "README.md")) as f:
        readme = " ".join(f.read().split())
    eng, ref = run["engine"], run["reference"]
    assert eng["zero"] == "1" and stage0["zero"] == "0"
    assert all(v["skipped_steps"] == 0 and v["host_skipped_steps"] == 0 for v in [*run.values(), stage0])
    ratio = eng["launches"] / ref["launches"]
    assert (f"{ratio:.2f}x the launches of llm2vec's one-GPU recipe ({eng['launches']} vs {ref['launches']}; "
            f"{eng['optimizer_launches']} of them in the optimizer step)") in readme
    assert eng["syncs"] == 0 and f"({eng['optimizer_syncs']} in the optimizer step)" in readme
    pred = eng["predicted_ms"] / ref["predicted_ms"]
    assert f"{pred:.2f}x ({eng['predicted_ms']:.0f} vs {ref['predicted_ms']:.0f} ms)" in readme
    assert (f"launched {stage0['optimizer_launches']} kernels with {stage0['optimizer_syncs']} host syncs per step"
            in readme)
    assert "ZeRO stage 1 with DeepSpeed's flat bf16 optimizer" in readme
