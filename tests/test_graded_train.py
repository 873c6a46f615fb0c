"""A real two-rank DeepSpeed run of a graded loss, with the best adapter kept by dev Spearman."""
import csv
import json
import os

import pytest

from .helpers import deepspeed_cmd, run_cmd

pytestmark = pytest.mark.slow


def test_graded_two_ranks_keeps_the_best_adapter(tmp_path):
    out = str(tmp_path / "graded")
    r = run_cmd(deepspeed_cmd(2, "--config", "configs/tiny/graded.yaml", f"output_dir={out}", "contrastive.loss=angle",
                              "contrastive.grad_cache_chunk=3", "eval_every=2", "contrastive.positive_min_score=3.0",
                              "eval_sts_pairs=200"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(os.path.join(out, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(float(x["loss"]) > 0 for x in rows)
    evals = {int(x["step"]): float(x["eval_sts_spearman"]) for x in rows if x["eval_sts_spearman"]}
    assert sorted(evals) == [2, 4, 6]
    saved = [int(x["step"]) for x in rows if x.get("best_saved") == "1"]
    # a step is saved exactly when its score beats every earlier one
    assert saved == [s for s in sorted(evals) if all(evals[s] > evals[t] for t in evals if t < s)]
    with open(os.path.join(out, "best", "engine_best.json")) as f:
        best = json.load(f)
    top = max(evals, key=evals.get)
    assert best["step"] == top and best["spearman"] == pytest.approx(evals[top], abs=1e-9)
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors"))
    # the last log line names the last adapter and the best one with its step and dev score
    last = [x for x in r.stdout.splitlines() if "[engine] done:" in x][-1]
    assert f"adapter at {os.path.join(out, 'adapter')}; best adapter at {os.path.join(out, 'best')} (step {top}, " \
           f"dev STS Spearman {best['spearman']:.4f})" in last, last

    from engine import Encoder
    from engine.data import sts_eval_pairs
    from engine.evaluate import sts_scores

    # the kept adapter really is the one that scored best: re-scoring it gives the logged figure
    enc = Encoder.from_pretrained(os.path.join(out, "best"), device="cpu")
    again = sts_scores(enc, sts_eval_pairs("data/stsbenchmark/sts-dev.csv", 200), batch_size=16)["spearman"]
    assert again == pytest.approx(best["spearman"], abs=1e-3)
