"""Graded-score losses (engine/losses.py): hand-computed values, cross-rank batches, gradient caching."""
import cmath
import math
import os

import pytest
import torch

from engine.config import ConfigError, load_config
from engine.losses import angle_loss, cosent_loss
from engine.distributed import free_port

# Three scored pairs with 4-dim embeddings (two complex coordinates: re = x[:2], im = x[2:]).
A = [[1.0, 0.0, 0.0, 0.0], [1.0, 2.0, 0.0, 1.0], [0.5, 0.0, 1.0, 0.0]]
B = [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.5, 0.0, 1.0, 0.5]]
S = [4.5, 1.0, 3.0]  # gold scores


def _cos(x, y):
    dot = sum(u * v for u, v in zip(x, y))
    return dot / math.sqrt(sum(u * u for u in x) * sum(v * v for v in y))


def _rank_by_hand(sims, scores, lam):
    # log(1 + sum over (i, j) with s_i > s_j of exp(lam * (sim_j - sim_i)))
    total = 1.0
    for i in range(len(scores)):
        for j in range(len(scores)):
            if scores[i] > scores[j]:
                total += math.exp(lam * (sims[j] - sims[i]))
    return math.log(total)


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


@pytest.mark.parametrize("lam", [20.0, 2.0])
def test_cosent_matches_the_formula_by_hand(lam):
    cos = [_cos(a, b) for a, b in zip(A, B)]  # 1/sqrt2, 2/sqrt(5*2)... computed from the definition
    assert cos[0] == pytest.approx(1 / math.sqrt(2))
    want = _rank_by_hand(cos, S, lam)
    got = cosent_loss(_t(A), _t(B), _t(S), scale=lam)
    assert float(got) == pytest.approx(want, rel=1e-12)
    # only the order of the scores matters, and equal scores give no term
    assert float(cosent_loss(_t(A), _t(B), _t([9.0, -3.0, 0.5]), scale=lam)) == pytest.approx(want, rel=1e-12)
    assert float(cosent_loss(_t(A), _t(B), _t([2.0, 2.0, 2.0]), scale=lam)) == pytest.approx(0.0, abs=1e-15)
    # a batch ranked perfectly with a wide margin costs almost nothing; reversed, a lot
    a = _t([[1.0, 0.0], [1.0, 0.0]])
    b = _t([[1.0, 0.0], [0.0, 1.0]])  # cos 1 and 0
    assert float(cosent_loss(a, b, _t([5.0, 0.0]), scale=20.0)) == pytest.approx(math.log1p(math.exp(-20.0)))
    assert float(cosent_loss(a, b, _t([0.0, 5.0]), scale=20.0)) == pytest.approx(math.log1p(math.exp(20.0)))


def _angle_by_hand(x, y):
    # z, w as complex vectors; q_m = z_m conj(w_m) / (|z||w|); g = |sum_m Re q_m + Im q_m|
    z = [complex(x[0], x[2]), complex(x[1], x[3])]
    w = [complex(y[0], y[2]), complex(y[1], y[3])]
    nz = math.sqrt(sum(abs(c) ** 2 for c in z))
    nw = math.sqrt(sum(abs(c) ** 2 for c in w))
    q = [zm * wm.conjugate() / (nz * nw) for zm, wm in zip(z, w)]
    return abs(sum(c.real + c.imag for c in q))


def _ibn_by_hand(a, b, scores, lam, thr):
    texts = a + b
    n = len(a)
    terms = []
    for k in range(n):
        if scores[k] < thr:
            continue
        for anchor, target in ((k, n + k), (n + k, k)):
            logits = {j: lam * _cos(texts[anchor], texts[j]) for j in range(2 * n) if j != anchor}
            lse = math.log(sum(math.exp(v) for v in logits.values()))
            terms.append(lse - logits[target])
    return sum(terms) / len(terms)


def test_angle_matches_the_formula_by_hand():
    """thr equals pair 2's score: positives are the pairs scoring >= positive_min_score, and with a threshold
    strictly between the scores (it was 2.5) a `>` in place of `>=` passed unseen."""
    lam, thr = 20.0, 3.0
    g = [_angle_by_hand(a, b) for a, b in zip(A, B)]
    # the real part of the quotient alone is the cosine: check the complex bookkeeping on pair 0
    z0 = [complex(A[0][0], A[0][2]), complex(A[0][1], A[0][3])]
    w0 = [complex(B[0][0], B[0][2]), complex(B[0][1], B[0][3])]
    inner = sum(zm * wm.conjugate() for zm, wm in zip(z0, w0))
    assert inner.real / (abs(cmath.sqrt(sum(abs(c) ** 2 for c in z0))) * math.sqrt(2)) == pytest.approx(
        _cos(A[0], B[0]))
    cos = [_cos(a, b) for a, b in zip(A, B)]
    l_cos = _rank_by_hand(cos, S, lam)
    l_ibn = _ibn_by_hand(A, B, S, lam, thr)  # pairs 0 and 2 are positives (4.5, 3.0 >= 3.0)
    assert l_ibn != pytest.approx(_ibn_by_hand(A, B, S, lam, 3.5))  # pair 2 counts
    l_angle = _rank_by_hand(g, S, lam)
    for w in ((1.0, 1.0, 1.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (0.5, 0.0, 2.0)):
        want = w[0] * l_cos + w[1] * l_ibn + w[2] * l_angle
        got = angle_loss(_t(A), _t(B), _t(S), scale=lam, weights=w, positive_min_score=thr)
        assert float(got) == pytest.approx(want, rel=1e-12), w
    # no positive pair: the in-batch term is 0, the rest stays
    got = angle_loss(_t(A), _t(B), _t(S), scale=lam, positive_min_score=10.0)
    assert float(got) == pytest.approx(l_cos + l_angle, rel=1e-12)


def test_the_angle_term_is_the_absolute_value_of_re_plus_im():
    """g = |Re q + Im q|: every pair of the hand test had Re + Im >= 0, so dropping the abs() passed unseen. Here the
    pair a = (1, 0, 0, 0), b = (-1, 0, 0, 0) (opposite real vectors: Re + Im = -1, g = 1) scores 5 and the pair a,
    b' = (1, 1, 0, 0) (g = 1/sqrt2) scores 0: ordered as their scores with the abs, reversed (-1 < 0.71) without."""
    a = [[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    b = [[-1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    s, lam = [5.0, 0.0], 20.0
    g = [_angle_by_hand(x, y) for x, y in zip(a, b)]
    assert g == pytest.approx([1.0, 1 / math.sqrt(2)])
    want = _rank_by_hand(g, s, lam)  # log(1 + exp(20 (1/sqrt2 - 1))) = 0.0028
    assert want == pytest.approx(math.log1p(math.exp(lam * (1 / math.sqrt(2) - 1))))
    got = angle_loss(_t(a), _t(b), _t(s), scale=lam, weights=(0.0, 0.0, 1.0))
    assert float(got) == pytest.approx(want, rel=1e-12)  # without the abs: log(1 + exp(20 * 1.71)) = 34.1


def test_losses_backprop_and_reject_bad_shapes():
    a = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.0, 1.0, 2.5, 3.0, 4.2, 5.0], dtype=torch.float64)
    for fn in (lambda x, y: cosent_loss(x, y, s), lambda x, y: angle_loss(x, y, s)):
        assert torch.autograd.gradcheck(fn, (a, b))
    with pytest.raises(ValueError, match="one score per pair"):
        cosent_loss(a, b, s[:3])
    with pytest.raises(ValueError, match="even embedding size"):
        angle_loss(a[:, :7], b[:, :7], s)


def test_config_rules():
    sup = load_config("configs/tiny/supervised.yaml")
    assert sup.contrastive.temperature == 0.02 and sup.contrastive.loss == "infonce"  # llm2vec's scale 50
    assert load_config("configs/tiny/simcse.yaml").contrastive.temperature == 0.05
    assert load_config("configs/tiny/supervised.yaml", ["contrastive.temperature=0.1"]).contrastive.temperature == 0.1
    g = load_config("configs/tiny/graded.yaml")
    assert g.stage == "supervised" and g.contrastive.loss in ("cosent", "angle")
    with pytest.raises(ConfigError, match="contrastive.loss=cosent trains on scored pairs"):
        load_config("configs/tiny/simcse.yaml", ["contrastive.loss=cosent"])
    with pytest.raises(ConfigError, match="contrastive.loss must be one of"):
        load_config("configs/tiny/supervised.yaml", ["contrastive.loss=triplet"])
    assert load_config("configs/tiny/mntp.yaml", ["lr_schedule=constant_with_warmup"]).lr_schedule == \
        "constant_with_warmup"


def test_constant_with_warmup_schedule():
    from engine.optim import lr_lambda

    cfg = load_config("configs/tiny/mntp.yaml", ["lr_schedule=constant_with_warmup", "warmup_steps=4",
                                                 "max_steps=10"])
    f = lr_lambda(cfg)
    assert [f(s) for s in range(12)] == [0.25, 0.5, 0.75, 1.0] + [1.0] * 8
    lin = lr_lambda(load_config("configs/tiny/mntp.yaml", ["warmup_steps=4", "max_steps=10"]))
    assert lin(9) < 0.2  # the linear default decays towards 0 at max_steps


# ----------------------------------------------------------------------------------------------
# two ranks over gloo == one process over the global batch
# ----------------------------------------------------------------------------------------------

WORLD, RB, RE = 2, 4, 8


def _data():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(WORLD * RB, RE, generator=g, dtype=torch.float64)
    b = a + 0.8 * torch.randn(WORLD * RB, RE, generator=g, dtype=torch.float64)
    s = torch.tensor([0.2, 4.6, 1.5, 3.0, 4.0, 2.2, 5.0, 0.8], dtype=torch.float64)
    return a, b, s


def _losses():
    return {"cosent": lambda a, b, s, x: cosent_loss(a, b, s, gather_across_ranks=x),
            "angle": lambda a, b, s, x: angle_loss(a, b, s, positive_min_score=3.0, gather_across_ranks=x)}


def _loss_grads(fn, a, b, s, gather):
    a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    loss = fn(a, b, s, gather)
    loss.backward()
    return loss.detach(), a.grad, b.grad


def _rank_worker(rank, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        a, b, s = _data()
        sl = slice(rank * RB, (rank + 1) * RB)
        res = {name: _loss_grads(fn, a[sl], b[sl], s[sl], True) for name, fn in _losses().items()}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    a, b, s = _data()
    for name, fn in _losses().items():
        loss, da, db = _loss_grads(fn, a, b, s, False)
        # every rank computes the loss of the whole global batch (every pair ranked against every other) ...
        for r in ranks:
            torch.testing.assert_close(r[name][0], loss, rtol=1e-12, atol=0, msg=name)
        # ... and holds WORLD x the gradient of its own rows (the data-parallel average divides by WORLD)
        torch.testing.assert_close(torch.cat([r[name][1] for r in ranks]) / WORLD, da, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(torch.cat([r[name][2] for r in ranks]) / WORLD, db, rtol=1e-10, atol=1e-14)
        # and it is not the per-rank loss: pairs of the other rank matter
        local = fn(a[:RB], b[:RB], s[:RB], False)
        assert abs(float(local) - float(loss)) > 1e-3


# ----------------------------------------------------------------------------------------------
# the graded stage: data, collate, and gradient caching on detached embeddings
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["cosent", "angle", "infonce"])
def test_the_stage_loss_takes_the_configs_settings(loss):
    """The contrastive stage's loss is engine.losses' (or the kernel's) under the config's own settings, not the
    defaults: a non-default loss_scale, angle_weights, positive_min_score or temperature reaches it. (A stage that
    passed 20.0, or dropped the AnglE weights, trained every graded run on the defaults, and no test saw it.)"""
    import llm2vec_kernels
    from engine import losses
    from engine.stages import build_stage

    g = torch.Generator().manual_seed(0)
    q, d = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    batch = {"scores": torch.tensor([0.5, 4.5, 2.0, 3.2, 5.0, 1.0], dtype=torch.float64)}
    if loss == "infonce":
        cfg = load_config("configs/tiny/simcse.yaml", ["contrastive.temperature=0.07"])
        want = llm2vec_kernels.contrastive_loss(q, d, temperature=0.07)
        default = llm2vec_kernels.contrastive_loss(q, d, temperature=0.05)
    else:
        cfg = load_config("configs/tiny/graded.yaml", [f"contrastive.loss={loss}", "contrastive.loss_scale=50",
                                                       "contrastive.angle_weights=[0.5,1,2]",
                                                       "contrastive.positive_min_score=3.0"])
        if loss == "cosent":
            want, default = (losses.cosent_loss(q, d, batch["scores"], scale=s) for s in (50.0, 20.0))
        else:
            want = losses.angle_loss(q, d, batch["scores"], scale=50.0, weights=(0.5, 1.0, 2.0),
                                     positive_min_score=3.0)
            default = losses.angle_loss(q, d, batch["scores"])
    stage = build_stage(cfg, None)
    got = stage.contrastive(q, d, batch)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, default)  # the settings change the loss: the test can tell them apart


@pytest.mark.parametrize("loss", ["cosent", "angle"])
def test_graded_stage_grad_cache_matches_direct(loss):
    import copy

    from engine.modeling import add_lora, load_model, load_tokenizer
    from engine.stages import build_stage
    from engine.trainer import EngineModule

    from .helpers import PlainEngine, perturb_lora_b

    cfg = load_config("configs/tiny/graded.yaml", [f"contrastive.loss={loss}", "contrastive.positive_min_score=3.0",
                                                   "lora.dropout=0.1", "model.gradient_checkpointing=false"])
    tok = load_tokenizer(cfg.model)
    stage = build_stage(cfg, tok)
    items, stats, groups = stage.load(cfg.data, 40)
    assert len(items) == 40 and groups is None
    assert min(p[2] for p in items) < 2.0 < 4.0 < max(p[2] for p in items)  # every pair, low scores too
    model, _ = load_model(cfg.model, "cpu", tok)
    module = EngineModule(perturb_lora_b(add_lora(model, cfg.lora), 0.05), stage).train()
    batch = stage.collate(items[:6], torch.Generator().manual_seed(0))
    batch.pop("truncated")
    assert batch["n_queries"] == 6 and batch["input_ids"].shape[0] == 12
    assert torch.equal(batch["scores"], torch.tensor([p[2] for p in items[:6]], dtype=torch.float32))
    twin = copy.deepcopy(module)
    chunk = 5
    spans = [(s, min(s + chunk, 12)) for s in range(0, 12, chunk)]
    torch.manual_seed(123)
    embs = [module({"mode": "embed", **{k: batch[k][s:e] for k in ("input_ids", "attention_mask", "pool_mask")}})[0]
            for s, e in spans]
    q, d = stage.split(torch.cat(embs), batch)
    direct = stage.contrastive(q, d, batch)
    direct.backward()
    twin.stage.cfg.contrastive.grad_cache_chunk = chunk
    torch.manual_seed(123)
    cached, _ = twin.stage.train_micro_step(PlainEngine(twin), batch)
    torch.testing.assert_close(cached, direct.detach(), rtol=1e-6, atol=1e-7)
    grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for n, p in twin.named_parameters():
        if p.requires_grad:
            # fp32: the two backward passes sum in different orders; tolerance relative to the tensor's scale
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-4 * float(grads[n].abs().max()))


@pytest.mark.parametrize("loss", ["cosent", "angle"])
def test_graded_losses_refuse_false_negative_masking(loss):
    """contrastive.mask_false_negatives leaves copies of a query's positive out of InfoNCE's denominator; a graded
    loss ranks scored pairs and has no such positive, so the config refuses the pair of settings (the CLI and the
    dry run: exit 2 before any model loads), and so does the stage built from a config set by hand."""
    from engine.config import ConfigError
    from engine.stages import build_stage

    with pytest.raises(ConfigError, match=f"contrastive.mask_false_negatives .* contrastive.loss={loss} ranks"):
        load_config("configs/tiny/graded.yaml", [f"contrastive.loss={loss}", "contrastive.mask_false_negatives=true"])
    cfg = load_config("configs/tiny/graded.yaml", [f"contrastive.loss={loss}"])
    build_stage(cfg, None)
    cfg.contrastive.mask_false_negatives = True
    with pytest.raises(ConfigError, match=f"contrastive.mask_false_negatives .* contrastive.loss={loss} ranks"):
        build_stage(cfg, None)


def test_scored_pairs_reader(tmp_path):
    import json

    from engine.data import DataError, read_scored_pairs

    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [{"sentence1": "a", "sentence2": "b", "score": 4.5},
                                                   {"sentence1": "", "sentence2": "c", "score": 1},
                                                   {"sentence1": "d", "sentence2": "e", "score": "0.5"}]) + "\n")
    pairs, stats = read_scored_pairs([str(p)])
    assert pairs == [("a", "b", 4.5), ("d", "e", 0.5)] and stats.empty == 1 and stats.kept == 2
    sts, _ = read_scored_pairs(["data/stsbenchmark/sts-dev.csv"])
    assert len(sts) == 1500 and min(s for *_, s in sts) == 0.0  # every pair, the lowest scores too
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence1": "a", "sentence2": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field 'score'"):
        read_scored_pairs([str(bad)])
    bad.write_text('{"sentence1": "a", "sentence2": "b", "score": "high"}\n')
    with pytest.raises(DataError, match="score is not a number"):
        read_scored_pairs([str(bad)])
    txt = tmp_path / "t.txt"
    txt.write_text("just a line\n")
    with pytest.raises(DataError, match="scored pairs come from an STS Benchmark TSV or JSONL"):
        read_scored_pairs([str(txt)])
