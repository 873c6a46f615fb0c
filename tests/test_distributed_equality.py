"""Two ranks compute the step one rank computes on the same global batch: same loss, same LoRA gradients.

Each case runs one optimizer step of a tiny config twice, as a real 2-rank DeepSpeed job (gloo) and as a
1-rank job, with LLM2VEC_ENGINE_DUMP_GRADS set so the trainer saves the full, rank-averaged gradient of every
LoRA weight before the optimizer step. BatchPlan gives rank r's micro-batch a the slice (a * world + r) of the
global batch, so:

* MNTP (no cross-sequence term): 2 ranks x micro 2 x accum 2 against 1 rank x micro 2 x accum 4. Masks and
  dropout are seeded by that slot, so even LoRA dropout is the same in both. The 2-rank side is step 1 of
  test_train's two-rank MNTP run (one launch fewer); the comparison is :func:`one_rank_step` and
  :func:`assert_same_step` here.
* contrastive (cross-rank negatives): 2 ranks x micro 4 against 1 rank x micro 8, whose micro-batch a is
  rank 0's then rank 1's; dropout off, since the two runs draw it over different micro-batches. With gradient
  caching (chunks of 3, which straddle the rank boundary of the 1-rank batch) and without.

The held-out contrastive loss (Stage.evaluate, no trainer) is compared the same way in-process: two gloo ranks
(torch.multiprocessing) against one process, on the same batches.

A cross-rank gather without gradient, a wrong positive offset, a loss or gradient averaged the wrong way, or
masks that depend on the world size all show up here as an O(1) relative difference.
"""
import csv
import os

import pytest
import torch

from .helpers import deepspeed_cmd, run_cmd

pytestmark = pytest.mark.slow

NO_DROPOUT = ["lora.dropout=0", "model.attention_dropout=0"]
ONE_STEP = ["max_steps=1", "save_every=0", "eval_every=0"]


def step_one(out, dump, steps):
    """(loss, gradients) of step 1 of the ``steps``-step run in ``out`` that dumped its gradients to ``dump``."""
    with open(os.path.join(out, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    return float(rows[0]["loss"]), torch.load(os.path.join(dump, "grads_step1.pt"))


def _one_step(tmp_path, name, nproc, config, *overrides):
    out, dump = str(tmp_path / name), str(tmp_path / f"{name}-grads")
    args = ("--config", config, f"output_dir={out}", *ONE_STEP, *overrides)
    cmd = deepspeed_cmd(nproc, *args) if nproc > 1 else ["python", "engine/train.py", *args]
    r = run_cmd(cmd, env={"LLM2VEC_ENGINE_DUMP_GRADS": dump})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return step_one(out, dump, steps=1)  # a one-step run logs exactly one row


def one_rank_step(tmp_path, config, *overrides):
    """Step 1 of ``config`` on one rank, for a comparison with a 2-rank run's step 1."""
    return _one_step(tmp_path, "one", 1, config, *overrides)


def assert_same_step(one, two):
    (loss1, g1), (loss2, g2) = one, two
    # fp32 sums in another order: agreement to ~1e-6 relative; a real difference is O(1)
    assert loss2 == pytest.approx(loss1, rel=1e-5, abs=1e-7)
    assert sorted(g1) == sorted(g2) and any("lora_B" in k for k in g1)
    scale = max(g.abs().max().item() for g in g1.values())
    assert scale > 0
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("stage,two_rank_extra", [
    ("simcse", []),
    ("supervised", ["contrastive.grad_cache_chunk=3"]),
])
def test_contrastive_two_ranks_equal_one(tmp_path, stage, two_rank_extra):
    cfg = f"configs/tiny/{stage}.yaml"
    one = _one_step(tmp_path, "one", 1, cfg, "micro_batch_size=8", *NO_DROPOUT)
    two = _one_step(tmp_path, "two", 2, cfg, "micro_batch_size=4", *NO_DROPOUT, *two_rank_extra)
    assert_same_step(one, two)


def test_an_mntp_step_is_the_same_whatever_the_micro_batch_size(tmp_path):
    """MNTP's loss is the mean over the masked tokens of the global batch (engine.trainer.unit_weights), not a mean
    of micro-batch means: 1 rank x micro 1 x accum 8 takes the step that micro 8 x accum 1 takes. Unpacked sentence
    rows hold unequal counts of masked tokens; a mask probability of 0.99999 with scheme all masks every eligible
    token whatever the slot's seed, so the two layouts see the same masks. Unweighted (each micro-batch's mean
    weighing 1 / accum) the gradients differed by 15% of their largest entry."""
    same = ["batch_size=8", "mntp.pack=false", "mntp.mask_prob=0.99999", "mntp.scheme=all", *NO_DROPOUT]
    # the held-out loss after the step, on the same 8 sentences either way (8 batches of 1, 1 batch of 8), is the
    # same token mean (Stage.evaluate: held_out_mean); a mean of the 8 one-sentence means differed from it
    one = _one_step(tmp_path, "micro1", 1, "configs/tiny/mntp.yaml", "micro_batch_size=1", *same, "eval_every=1",
                    "eval_batches=8")
    eight = _one_step(tmp_path, "micro8", 1, "configs/tiny/mntp.yaml", "micro_batch_size=8", *same, "eval_every=1",
                      "eval_batches=1")
    assert_same_step(eight, one)
    held_out = [_eval_loss(tmp_path / name) for name in ("micro1", "micro8")]
    assert held_out[0] == pytest.approx(held_out[1], rel=1e-5), held_out


def _eval_loss(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        return float(next(csv.DictReader(f))["eval_loss"])


def test_a_step_without_a_masked_token_anywhere_updates_nothing(tmp_path):
    """A global batch with no masked token (a mask rate too low for its rows) has no loss to average: the step runs
    no update (DeepSpeed's would still move the weights through Adam's state and weight decay, and advance the
    schedule), its row's loss and grad_norm stay empty, and the run says how many such steps it met. Two runs of
    1 and 2 such steps end with the same adapter; the logged LR stays in warm-up's first value."""
    from safetensors.torch import load_file

    adapters, out = [], None
    for steps in (1, 2):
        out = tmp_path / f"empty{steps}"
        r = run_cmd(["python", "engine/train.py", "--config", "configs/tiny/mntp.yaml", f"output_dir={out}",
                     f"max_steps={steps}", "save_every=0", "eval_every=0", "mntp.mask_prob=1e-9", "weight_decay=0.1"])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        adapters.append(load_file(str(out / "adapter" / "adapter_model.safetensors")))
    said = r.stdout + r.stderr
    assert "no masked token in the whole global batch" in said and "2 such step(s)" in said
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(row["step"], row["loss"], row["grad_norm"]) for row in rows] == [("1", "", ""), ("2", "", "")]
    assert rows[0]["lr"] == rows[1]["lr"]  # warm-up did not advance
    assert sorted(adapters[0]) == sorted(adapters[1]) and any("lora_A" in k for k in adapters[0])
    for k in adapters[0]:  # weight decay 0.1 would have shrunk lora_A at every step
        assert torch.equal(adapters[0][k], adapters[1][k]), k


EVAL_WORLD = 2


def _held_out_loss(world, rank):
    """The supervised stage's held-out loss (Stage.evaluate, as the trainer calls it) on 8 hand-made items, 2
    micro-batches of 4, with the tiny config's random model (seeded: the same weights in every process)."""
    from engine.config import load_config
    from engine.modeling import load_model, load_tokenizer
    from engine.stages import build_stage
    from engine.trainer import EngineModule

    from .helpers import PlainEngine

    cfg = load_config("configs/tiny/supervised.yaml", ["micro_batch_size=4", "contrastive.gather_across_ranks=true"])
    tok = load_tokenizer(cfg.model)
    stage = build_stage(cfg, tok)
    topics = ["a cat sleeps on the mat", "the market fell sharply", "rain is expected tomorrow", "he plays guitar"]
    items = [{"query": f"{topics[i % 4]} ({i})", "positive": f"{topics[i % 4]}, it says", "negatives":
              [f"not {topics[(i + 1) % 4]} ({i})"], "instruction": "Find: ", "source": "s"} for i in range(8)]
    model, _ = load_model(cfg.model, "cpu", tok)
    engine = PlainEngine(EngineModule(model, stage).eval())
    return stage.evaluate(engine, items, world, rank, max_batches=2)["eval_loss"]


def _eval_rank(rank, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=EVAL_WORLD)
    try:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(repr(_held_out_loss(EVAL_WORLD, rank)))
    finally:
        dist.destroy_process_group()


def test_the_held_out_contrastive_loss_on_two_ranks_is_one_process_loss(tmp_path):
    """Every rank scores the same held-out batches, so the contrastive eval loss must not gather candidates across
    ranks (ContrastiveStage.evaluating): gathering W copies of one batch repeats each candidate W times and the
    loss reads about log W too high. No test ran the eval on several ranks, so gathering there passed unseen. Two
    gloo ranks (gather_across_ranks on, as in training) must each read the loss one process reads."""
    import torch.multiprocessing as mp

    from engine.distributed import free_port

    mp.spawn(_eval_rank, args=(free_port(), str(tmp_path)), nprocs=EVAL_WORLD, join=True)
    ranks = [float((tmp_path / f"rank{r}.txt").read_text()) for r in range(EVAL_WORLD)]
    one = _held_out_loss(1, 0)
    assert one > 0.1  # a real loss (8 candidates a query), not the 0 of a degenerate batch
    for loss in ranks:
        assert loss == pytest.approx(one, rel=1e-5, abs=1e-6), (ranks, one)
