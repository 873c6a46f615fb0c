"""The CPU proxy of the GPU train step (benchmarks/bench_step_ops.py, step_census.py, step_cost.py,
step_paths.py): its counters, its cost model, the
llm2vec reference path against the engine's loss, and a reduced end-to-end run of all three paths."""
import json
import os
import sys

import pytest
import torch

from benchmarks import bench_step_ops as so
from benchmarks import step_calibration, step_census, step_cost, step_paths

from .helpers import ROOT, run_cmd


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
    import llm2vec_kernels

    launches = step_census.TritonLaunches()
    q = torch.randn(2, 16, 4, 8, requires_grad=True)
    k = torch.randn(2, 16, 2, 8, requires_grad=True)
    with launches.active():
        out = llm2vec_kernels.flash_attention(q, k, k, impl="triton")
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
    name, cat, flops, nbytes, triton, peak = mode.rows[0]
    assert not triton
    assert (name, cat, flops) == ("mm", "gemm", 2 * 16384 * 4096 * 14336)
    assert nbytes == 2 * (16384 * 4096 + 4096 * 14336 + 16384 * 14336)
    pred, n_ops = step_cost.predicted(mode.rows[:1], floor_us=4.0)
    assert pred["gemm"] == pytest.approx(flops / step_cost.PEAK_FLOPS * 1e3 + 4e-3) and n_ops["gemm"] == 1
    assert pred["gemm"] == pytest.approx(2.4396, rel=1e-4)  # ms: 1.924 TFLOP at 790 TFLOP/s + 4 us


@pytest.mark.parametrize("arch", ["mistral-7b", "gemma2-9b", "qwen3-8b"])
def test_reference_path_computes_the_engines_mntp_loss(arch):
    """llm2vec's recipe (HF model + PEFT, SDPA without a mask, HF's loss on unshifted labels) and the engine's
    MNTP stage on the same weights and batch: the same loss before any step (LoRA B starts at zero). On Gemma2
    the reference runs transformers' eager attention with all-zero masks (SDPA cannot soft-cap), and both
    soft-cap the scores and the logits."""
    import llm2vec_kernels

    spec = dict(step_paths.tiny_of(step_paths.ARCHS[arch]), num_hidden_layers=2, vocab_size=256)
    sets = ["model.attention=torch", "model.loss=torch", "model.dtype=fp32"]
    try:
        ref = step_paths.Path("reference", spec, "cpu", sets, 4)
        eng = step_paths.Path("engine", spec, "cpu", sets, 4)
        batch = step_paths.Batch(4, 32, spec["vocab_size"], 0.3, "all")
        ref.model.eval()
        eng.module.eval()
        with torch.no_grad():
            lr = float(ref.hf_loss(batch))
            le = float(eng.module(batch.engine)[0])
    finally:
        for op in ("attention", "masked_ce", "contrastive"):
            llm2vec_kernels.set_default_impl(op, "auto")
    assert batch.masked > 0
    assert abs(lr - le) < 1e-5 * abs(le), (lr, le)
    assert ref.hf_eager == (arch == "gemma2-9b")


def test_bad_override_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        so.main(["--set", "model.no_such_key=1"])
    assert e.value.code == 2 and "no_such_key" in capsys.readouterr().err


@pytest.mark.slow
def test_reduced_run_all_paths(tmp_path):
    full = str(tmp_path / "full.json")
    r = run_cmd([sys.executable, "-m", "benchmarks.bench_step_ops", "--reduced", "--tokens", "4x64,2x32", "--jobs", "2",
                 "--json", full], timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    res = json.loads(lines[-1])
    assert list(res) == [f"{p} {t}" for p in ("reference", "reference-bf16", "reference-zero3", "engine")
                         for t in ("4x64", "2x32")]  # by path, then in --tokens order
    # the table's header (DeepSpeed may log a line to stdout when it is imported)
    assert any("best_ms" in ln for ln in lines[:4]) and any(ln.startswith("census engine 4x64:") for ln in lines)
    assert any(ln.startswith("UNCALIBRATED") for ln in lines)  # --reduced runs no calibration, and says so
    det = json.load(open(full))
    for k, v in res.items():
        assert v["launches"] > 100 and 0 < v["host_ms"]["min"] <= v["host_ms"]["median"], (k, v)
        # uncalibrated: the roofline + floor; DeepSpeed's and the optimizer's launches at 2-22 us each
        assert 0 < v["predicted_ms"]["best"] <= v["predicted_ms"]["pessimistic"], (k, v)
        # one recompute policy for counting and costing, printed in the row
        assert v["recompute"] == det[k]["recompute"] and v["recompute"] in ("none", "selective", "full")
        row = next(ln for ln in lines if ln.startswith(k + " "))
        assert f" {v['recompute']} " in row
    for t in ("4x64", "2x32"):
        assert res[f"reference {t}"]["zero_hooks"] == 0 and res[f"reference-zero3 {t}"]["zero_hooks"] > 0
        assert res[f"reference {t}"]["hook_launches"] == 0 and res[f"engine {t}"]["hook_launches"] > 0
        # the engine's own setup: zero_stage auto replicates a bf16 base that fits (stage 1 for DeepSpeed's flat bf16
        # optimizer, no ZeRO-3 hooks), and collate hands packing and the masked rows over from the host (no sync
        # inside forward and backward)
        eng = res[f"engine {t}"]
        assert eng["zero_hooks"] == 0 and eng["zero"] == "1" and eng["syncs"] == 0
        assert eng["launches"] < 0.5 * res[f"reference {t}"]["launches"]  # fused LoRA groups and decoder ops
        # bf16 adapters: no fp32 LoRA and no casts around it, so fewer launches and a cheaper predicted step
        ref, bf = det[f"reference {t}"], det[f"reference-bf16 {t}"]
        assert bf["census"].get("aten._to_copy", 0) < ref["census"].get("aten._to_copy", 0)
        assert bf["predicted_ms"]["best"] < ref["predicted_ms"]["best"]
    for k, v in det.items():
        # every counted and timed step was a real step: DeepSpeed skips the optimizer on a non-finite gradient,
        # which the garbage outputs of skipped Triton launches used to cause now and then
        assert v["skipped_steps"] == 0 and v["host_skipped_steps"] == 0, k
        # the op stream does not depend on the batch: the same count at two batch sizes
        small = v["census_host_batch"]
        assert v["launches"] == v["launches_host_batch"], (k, {c: (n, small.get(c)) for c, n in v["census"].items()
                                                               if small.get(c) != n})
        if v["path"] == "engine":
            # DeepSpeed's flat bf16 optimizer with the engine's flat gradient norm: one norm and one clip for all
            # 28 LoRA tensors, and two host reads (the inf/NaN check and the clip test), not one per tensor
            opt = v["optimizer_census"]
            assert opt["aten.linalg_vector_norm"] == 1 and opt.get("aten.mul_", 0) <= 1
            assert v["optimizer_syncs"] == 2 and v["optimizer_launches"] < 40, v["optimizer_census"]
            # LoRA dropout is drawn inside the fused LoRA kernels: no dropout op at all
            assert "aten.native_dropout" not in v["census"] and "aten.native_dropout" not in v["census_full_nozero"]
            assert v["census"]["triton:_lora_down_kernel"] > 0
            # the engine's attention runs in Triton: per layer 1 forward launch (2 when recomputed: the selective
            # policy cannot see Triton kernels, so they rerun too) + 1 dK/dV launch in the backward; counted and
            # costed under the same policy
            fwd_per_layer = 1 if v["recompute"] == "none" else 2
            for census in (v["census"], v["census_full_nozero"]):
                assert census["triton:_attn_fwd"] == 2 * fwd_per_layer and census["triton:_attn_bwd_dkdv"] == 2
        else:  # 2 layers x 7 LoRA projections x (forward + checkpoint recompute) dropouts, at both sizes
            assert v["census"]["aten.native_dropout"] == 28 and v["census_full_nozero"]["aten.native_dropout"] == 28
            assert not any(c.startswith("triton:") for c in v["census"])


@pytest.mark.slow
def test_reduced_run_on_gemma2(tmp_path):
    """--arch gemma2-9b: the HF reference runs eager attention (SDPA cannot soft-cap), the engine the Triton
    kernels with the soft-cap; the structure is Gemma2's (four norms a layer), the issue-24 targets (Mistral-7B's)
    are not printed, and reference-zero3 (SDPA with a dense mask) is refused. (reference-bf16, the reference's code
    with bf16 adapters, runs in test_reduced_run_all_paths.)"""
    full = str(tmp_path / "g.json")
    r = run_cmd([sys.executable, "-m", "benchmarks.bench_step_ops", "--arch", "gemma2-9b", "--reduced", "--json", full,
                 "--paths", "reference,engine"], timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    res = json.loads(lines[-1])
    assert list(res) == ["reference 4x64", "engine 4x64"]
    assert any("gemma2-9b structure at 2 layers" in ln for ln in lines[:4])
    assert not any(ln.startswith("target ") for ln in lines)
    det = json.load(open(full))
    for name in ("reference 4x64",):
        census = det[name]["census"]
        assert not any("scaled_dot_product" in c for c in census), census
        # eager attention: Q K^T and P V per layer (2 layers, forward + checkpoint recompute) as batched GEMMs, and
        # tanh for the scores' soft-cap (4) and the logits' (1)
        assert census["aten.bmm"] >= 8 and census["aten.tanh"] == 5, census
    eng = det["engine 4x64"]["census"]
    assert eng["triton:_attn_fwd"] >= 2 and eng["triton:_attn_bwd_dkdv"] == 2
    assert eng["triton:_rms_norm_fwd_kernel"] == 2 * 4 + 1  # Gemma2: four norms a layer, then the final one
    assert "aten.bmm" not in eng and "aten.tanh" not in eng
    for v in res.values():
        assert 0 < v["predicted_ms"]["best"] <= v["predicted_ms"]["pessimistic"]
    bad = run_cmd([sys.executable, "-m", "benchmarks.bench_step_ops", "--arch", "gemma2-9b", "--reduced",
                   "--paths", "reference-zero3"], timeout=120)
    assert bad.returncode == 2 and "reference-zero3" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_cost_model_costs_fp32_gemms_on_the_cuda_cores():
    phase = ["fwd_bwd"]
    mode = step_cost.CostMode({"V": 32000, "r": 16}, [512], phase)
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.empty(4096, 4096, dtype=dtype, device="meta")
        with mode:
            a @ a
    (_, _, fb, _, _, pb), (_, _, f32, _, _, p32) = mode.rows
    assert fb == f32 == 2 * 4096 ** 3 and pb == step_cost.PEAK_FLOPS and p32 == step_cost.PEAK_FLOPS_FP32
    s = step_cost.summarise(mode.rows[1:])
    assert s["gemm"]["roof"] == pytest.approx(f32 / step_cost.PEAK_FLOPS_FP32 * 1e3)  # compute-bound at 53.6 TFLOP/s


def test_cpu_budget_stops_a_path_with_one_line(capsys):
    """The budget is CPU time of the worker, not wall time: a worker over it is stopped and its row says so."""
    assert so._cpu_s(os.getpid()) > 0
    with pytest.raises(SystemExit) as e:
        so.main(["--reduced", "--paths", "reference", "--cpu-budget-s", "0.5"])
    out = capsys.readouterr().out
    assert e.value.code == 1 and "over budget" in out and "CPU s" in out


def test_meta_sdpa_keeps_grouped_kv_when_hf_passes_enable_gqa():
    """llm2vec's reference calls SDPA with enable_gqa (no mask): the fused kernel reads K/V per group, no repeat."""
    q = torch.empty(2, 32, 512, 128, dtype=torch.bfloat16, device="meta")
    k = torch.empty(2, 8, 512, 128, dtype=torch.bfloat16, device="meta")
    for gqa in (True, False):
        mode = step_cost.CostMode({"V": 32000, "r": 16}, [512, 512], ["fwd_bwd"])
        with step_census.gpu_like_ops(meta=True), mode:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=gqa)
        names = [r[0] for r in mode.rows]
        assert out.shape == q.shape and names[-1] == "_scaled_dot_product_flash_attention"
        assert (len(names) == 1) is gqa, names  # without enable_gqa, K and V are first repeated (copies costed)


def test_profile_classes_add_up_to_the_measured_kernel_time():
    prof = step_calibration.read_profile()
    with open(step_calibration.PROFILE) as f:
        totals = [float(ln.split("GPU kernel time ")[1].split()[0]) for ln in f if ln.startswith("step wall")]
    assert set(prof) == {"reference-zero3", "engine"} and len(totals) == 2
    for p, total in zip(("reference-zero3", "engine"), totals):
        # the classes are the kernel time (the profile's ZeRO category also held CUDA runtime calls: left out)
        assert sum(prof[p]["ms"].values()) == pytest.approx(total, rel=2e-3), p
        assert prof[p]["ms"]["elementwise"] > 10 * prof[p]["ms"]["other"] > 0
    per_hook = step_calibration.hook_us(prof)
    assert 1.0 < per_hook < step_cost.HOST_FLOOR_US  # ZeRO-3's hook copies: launch-bound, not floor-sized kernels


def test_profile_sections_read_in_todays_names(tmp_path):
    """A profile written today (bench_train_step --profile, one section per impl) is read under its own names:
    `reference` is llm2vec's HF recipe (no DeepSpeed), reference-zero3 the ZeRO-3 reference, engine-auto the
    trainer's setup; the committed profile, whose `reference` was the ZeRO-3 reference (zero=3), reads as before."""
    with open(step_calibration.PROFILE) as f:
        legacy = f.read()
    ref_body = legacy.split("== mntp / engine (")[0].split("\n", 1)[1]
    eng_body = legacy.split("== mntp / engine (")[1].split("\n", 1)[1]
    card = "NVIDIA H100 80GB HBM3, bfloat16"
    new = (f"== mntp / reference ({card}, no DeepSpeed)\n{ref_body}"
           f"== mntp / engine-auto ({card}, ZeRO 1, selective recompute, AdamW)\n{eng_body}"
           f"== mntp / engine ({card}, zero=3)\n{eng_body}"
           f"== mntp / reference-zero3 ({card}, zero=3)\n{ref_body}")
    (tmp_path / "profile.txt").write_text(new)
    old, got = step_calibration.read_profile(), step_calibration.read_profile(str(tmp_path / "profile.txt"))
    assert set(old) == {"reference-zero3", "engine"}
    assert set(got) == {"reference", "engine-auto", "engine", "reference-zero3"}
    for name, was in (("reference", "reference-zero3"), ("reference-zero3", "reference-zero3"),
                      ("engine", "engine"), ("engine-auto", "engine")):
        assert got[name]["ms"] == pytest.approx(old[was]["ms"]), name


def test_estimate_costs_unprofiled_triton_kernels_pessimistically():
    empty = {"roof": 0.0, "n": 0, "roof_triton": 0.0, "n_triton": 0}
    summary = {c: dict(empty) for c in step_cost.CLASSES}
    summary["lora"] = {"roof": 10.0, "n": 0, "roof_triton": 4.0, "n_triton": 0}  # 6 ms of mm, 4 ms of Triton
    summary["attention"] = {"roof": 2.0, "n": 0, "roof_triton": 2.0, "n_triton": 0}
    row = {"summary": summary, "hook_launches": 100, "optimizer_launches": 10}
    fac = {"lora": [0.8, 0.9], "attention": [2.0, 2.5]}
    best, pess = step_calibration.estimate(row, fac, floor_us=20.0, per_hook_us=2.0)
    assert best["lora"] == pytest.approx(10.0 * 0.8) and pess["lora"] == pytest.approx(6.0 * 0.9 + 4.0 * 2.5)
    assert (best["attention"], pess["attention"]) == (pytest.approx(4.0), pytest.approx(5.0))
    assert (best["hooks"], pess["hooks"]) == (pytest.approx(0.2), pytest.approx(2.0))
    assert (best["optimizer"], pess["optimizer"]) == (pytest.approx(0.02), pytest.approx(0.2))


def test_readme_step_figures_are_the_committed_run():
    """The README's CPU-proxy sentence quotes benchmarks/results/2026-12-06-cpu-step-ops-mntp-weights/."""
    res = os.path.join(ROOT, "benchmarks", "results", "2026-12-06-cpu-step-ops-mntp-weights")
    with open(os.path.join(res, "results.json")) as f:
        run = json.load(f)
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = " ".join(f.read().split())
    ship = so.shipped_tokens()
    assert set(run) == {f"{p} {t}" for p in so.PATHS for t in ("32x512", ship)}
    assert all(v["skipped_steps"] == 0 and v["host_skipped_steps"] == 0 and v["calibrated"] for v in run.values())
    e, r, b = (run[f"{p} 32x512"] for p in ("engine", "reference", "reference-bf16"))
    es, rs, bs = (run[f"{p} {ship}"] for p in ("engine", "reference", "reference-bf16"))

    def x(a, c, kind="best"):
        return a["predicted_ms"][kind] / c["predicted_ms"][kind]

    policy = "no" if e["recompute"] == "none" else e["recompute"]
    assert e["syncs"] == 0 and f"({policy} recompute, ZeRO stage {e['zero']} with" in readme
    la = e["launches"] / r["launches"]
    assert (f"{la:.2f}x the launches of llm2vec's one-GPU recipe ({e['launches']} vs {r['launches']}; "
            f"{e['hook_launches']} of them in DeepSpeed's gradient hooks)") in readme
    best, pess = x(e, r), x(e, r, "pessimistic")
    assert (f"{best:.2f}x (best, {e['predicted_ms']['best']:.0f} vs {r['predicted_ms']['best']:.0f} ms) to "
            f"{pess:.2f}x (pessimistic, {e['predicted_ms']['pessimistic']:.0f} vs "
            f"{r['predicted_ms']['pessimistic']:.0f} ms)") in readme
    assert f"{x(e, b):.2f}x (best) of the same recipe with bf16 adapters" in readme
    B, S = ship.split("x")
    assert (f"({B} x {S}, " in readme and f"{x(es, rs):.2f}x (best) to {x(es, rs, 'pessimistic'):.2f}x (pessimistic), "
            f"{x(es, bs):.2f}x of the bf16 recipe, {es['launches'] / rs['launches']:.2f}x the launches") in readme
    for text, value, limit in (("best <= 0.40x", best, 0.40), ("<= 0.55x of the bf16 recipe", x(e, b), 0.55),
                               ("pessimistic <= 0.45x", pess, 0.45), ("launches <= 0.4x", la, 0.4)):
        assert f"{text} {'met' if value <= limit else 'not met'}" in readme, text


def test_readme_gemma2_and_qwen3_step_figures_are_the_committed_runs():
    """The README's Gemma2 and Qwen3 sentences quote benchmarks/results/2026-12-05-cpu-step-ops-gemma2/ and -qwen3/."""
    res = os.path.join(ROOT, "benchmarks", "results", "2026-12-05-cpu-step-ops-gemma2")
    with open(os.path.join(res, "results.json")) as f:
        run = json.load(f)
    with open(os.path.join(res, "results-engine-attention-torch.json")) as f:
        torch_path = json.load(f)
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = " ".join(f.read().split())
    ship = so.shipped_tokens()
    want = {f"{p} {t}" for p in so.ARCH_PATHS["gemma2-9b"] for t in ("32x512", ship)}
    assert set(run) == want and set(torch_path) == want
    for r in (run, torch_path):
        assert all(v["arch"] == "gemma2-9b" and v["calibrated"] and v["skipped_steps"] == 0 for v in r.values())
    # --set model.attention=torch changes the engine's row only
    assert all(run[k]["summary"] == torch_path[k]["summary"] for k in want if not k.startswith("engine"))
    e, r, t = run["engine 32x512"], run["reference 32x512"], torch_path["engine 32x512"]

    def x(a, c, kind="best"):
        return a["predicted_ms"][kind] / c["predicted_ms"][kind]

    assert (f"{x(e, r):.2f}x (best, {e['predicted_ms']['best']:.0f} vs {r['predicted_ms']['best']:.0f} ms) to "
            f"{x(e, r, 'pessimistic'):.2f}x (pessimistic, {e['predicted_ms']['pessimistic']:.0f} vs "
            f"{r['predicted_ms']['pessimistic']:.0f} ms)") in readme
    assert f"the engine was at {x(t, r):.2f}x (best) to {x(t, r, 'pessimistic'):.2f}x (pessimistic)" in readme
    assert f"step {x(t, e):.2f}x (best) shorter" in readme
    # the soft-capped Triton attention ran (and the torch path did not), counted and costed
    assert e["census"]["triton:_attn_fwd"] > 0 and "triton:_attn_fwd" not in t["census"]
    assert e["syncs"] == 0 and t["syncs"] > 0
    with open(os.path.join(ROOT, "benchmarks", "results", "2026-12-05-cpu-step-ops-qwen3", "results.json")) as f:
        qwen = json.load(f)
    assert set(qwen) == {f"{p} {t}" for p in so.ARCH_PATHS["qwen3-8b"] for t in ("32x512", ship)}
    assert all(v["arch"] == "qwen3-8b" and v["calibrated"] and v["skipped_steps"] == 0 for v in qwen.values())
    e, r = qwen["engine 32x512"], qwen["reference 32x512"]
    assert (f"On Qwen3-8B (`--arch qwen3-8b`, SDPA on every path) the engine is at {x(e, r):.2f}x (best, "
            f"{e['predicted_ms']['best']:.0f} vs {r['predicted_ms']['best']:.0f} ms) to {x(e, r, 'pessimistic'):.2f}x "
            f"(pessimistic, {e['predicted_ms']['pessimistic']:.0f} vs {r['predicted_ms']['pessimistic']:.0f} ms)"
            ) in readme
    assert e["census"]["triton:_rms_norm_fwd_kernel"] == 36 * 4 + 1  # Qwen3's per-head q/k norms in the kernel
