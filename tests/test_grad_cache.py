"""Gradient caching equals direct training, with dropout on (the RNG state of each chunk is replayed)."""
import copy

import pytest
import torch

from engine.config import load_config
from engine.modeling import add_lora, load_model, load_tokenizer
from engine.stages import build_stage
from engine.trainer import EngineModule

from .helpers import STS, PlainEngine, perturb_lora_b


@pytest.mark.parametrize("stage_name,chunk,targets", [("simcse", 3, None), ("supervised", 4, None),
                                                      ("supervised", 4, "[gate_proj,up_proj,down_proj]")],
                         ids=["simcse", "supervised", "supervised-mlp-lora"])
def test_grad_cache_matches_direct(stage_name, chunk, targets, monkeypatch):
    cfg = load_config(f"configs/tiny/{stage_name}.yaml", [f"contrastive.grad_cache_chunk={chunk}",
                                                         "model.attention_dropout=0.3", "lora.dropout=0.1",
                                                         "model.gradient_checkpointing=false",
                                                         *([f"lora.target_modules={targets}"] if targets else [])])
    tok = load_tokenizer(cfg.model)
    stage = build_stage(cfg, tok)
    items, _, _ = stage.load([f"{STS}/sts-dev.csv"] if stage_name == "simcse" else cfg.data, 40)
    model, _ = load_model(cfg.model, "cpu", tok)
    model = perturb_lora_b(add_lora(model, cfg.lora), 0.05)  # non-zero B, so LoRA A gets gradients too
    module = EngineModule(model, stage).train()
    batch = stage.collate(items[:6], torch.Generator().manual_seed(0))
    batch.pop("truncated")
    twin = copy.deepcopy(module)
    n = batch["input_ids"].shape[0]
    spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]

    # direct: the same chunked forward (same RNG consumption, so the same dropout masks), one backward
    torch.manual_seed(123)
    embs = [module({"mode": "embed", **{k: batch[k][s:e] for k in ("input_ids", "attention_mask", "pool_mask")}})[0]
            for s, e in spans]
    q, d = stage.split(torch.cat(embs), batch)
    direct_loss = stage.contrastive(q, d)
    direct_loss.backward()

    # cached: no-grad pass, loss on detached embeddings, replayed per-chunk backward
    stage.cfg.contrastive.grad_cache_chunk = chunk
    twin_stage = twin.stage
    torch.manual_seed(123)
    import engine.bidirectional as bidi

    seen, call_of = [], bidi._attention_call

    def record(*a):
        call = call_of(*a)
        seen.append((torch.is_grad_enabled(), call.needs_grad))
        return call

    monkeypatch.setattr(bidi, "_attention_call", record)
    cached_loss, _ = twin_stage.train_micro_step(PlainEngine(twin), batch)
    # the no-grad pass dispatches every call as the replay's backward will (on sm_90 a no-grad call would take
    # other kernels than the replay); with LoRA on the MLP only, layer 0's q / k / v get no gradient in either
    first, replay = ([g for on, g in seen if on is phase] for phase in (False, True))
    assert first and first == replay, seen
    assert all(replay) if targets is None else replay[:2] == [False, True], replay

    torch.testing.assert_close(cached_loss, direct_loss.detach(), rtol=1e-6, atol=1e-7)
    grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    tgrads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for name, g in grads.items():
        # fp32 rounding of sums whose terms are as large as the tensor's largest entry: the tolerance scales with
        # that entry (an element-wise rtol fails on small entries of a large tensor: 1.9e-6 of a max of 36)
        torch.testing.assert_close(tgrads[name], g, rtol=0, atol=1e-5 * float(g.abs().max()) + 1e-7, msg=name)

    # and dropout really was on: a different RNG state gives a different loss
    torch.manual_seed(999)
    with torch.no_grad():
        other = stage.loss(module, batch)[0]
    assert abs(float(other) - float(direct_loss)) > 1e-6


@pytest.mark.parametrize("scale_power", [15, 16])
def test_fp16_embedding_gradients_keep_their_precision_under_the_loss_scale(scale_power, monkeypatch):
    """fp16 with gradient caching: the cached embedding gradients were held in fp16 before the loss scale applied
    (it applies at engine.backward, after), so small ones flushed to zero (57% here at scale 2^15, 26% error) and
    the fp16 surrogate's own gradient, the scale, overflowed at DeepSpeed's first scale 2^16 (every gradient NaN).
    A stand-in engine scales the surrogate as DeepSpeed's fp16 optimizer does; its gradients, unscaled, match
    the fp32 loss's on the same fp16 embeddings to fp16 precision."""
    import contextlib

    import engine.stages.contrastive as contrastive_mod

    monkeypatch.setattr(contrastive_mod, "dispatch_as_if_backward", lambda model: contextlib.nullcontext())
    cfg = load_config("configs/tiny/simcse.yaml", ["contrastive.grad_cache_chunk=128",
                                                   "contrastive.gather_across_ranks=false"])
    stage = build_stage(cfg, load_tokenizer(cfg.model))
    n, width, scale = 1024, 512, 2.0 ** scale_power
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n // 2, width, generator=g)
    x = (torch.cat([base, base + 1.5 * torch.randn(n // 2, width, generator=g)]) * 300 / width ** 0.5).half()

    class Fp16Engine:  # rows of one fp16 leaf as the embeddings; backward scales the loss as DeepSpeed fp16 does
        module = type("M", (), {"model": None})()

        def __init__(self):
            self.x = x.clone().requires_grad_(True)

        def __call__(self, batch):
            return (self.x[batch["input_ids"][:, 0]],)

        def backward(self, loss):
            (loss.float() * scale).backward()

    eng = Fp16Engine()
    batch = {"input_ids": torch.arange(n)[:, None], "attention_mask": torch.ones(n, 1, dtype=torch.long),
             "pool_mask": torch.ones(n, 1), "n_queries": n // 2}
    stage.train_micro_step(eng, batch)
    ref = x.float().requires_grad_(True)
    q, d = stage.split(ref, batch)
    stage.contrastive(q, d).backward()
    got = eng.x.grad.float() / scale
    assert torch.isfinite(got).all()
    assert ((got == 0) & (ref.grad != 0)).float().mean() < 1e-3
    assert (got - ref.grad).norm() / ref.grad.norm() < 2e-3


def test_held_out_loss_embeds_in_the_training_chunks_and_is_the_same_loss(monkeypatch):
    """The held-out eval ran a whole grad-cached micro-batch (batch / world texts, x (2 + negatives)) through the
    model at once: no stored activations, but every layer's intermediates for all of it, which training never
    holds. It now embeds chunk by chunk, and reads the same loss."""
    cfg = load_config("configs/tiny/supervised.yaml", ["model.gradient_checkpointing=false"])
    tok = load_tokenizer(cfg.model)
    stage = build_stage(cfg, tok)
    items, _, _ = stage.load(cfg.data, 40)
    model, _ = load_model(cfg.model, "cpu", tok)
    module = EngineModule(perturb_lora_b(add_lora(model, cfg.lora), 0.05), stage).eval()
    sizes, embed = [], stage.embed

    def counted(mod, input_ids, *a, **k):
        sizes.append(input_ids.shape[0])
        return embed(mod, input_ids, *a, **k)

    monkeypatch.setattr(stage, "embed", counted)
    whole = stage.batch_losses(PlainEngine(module), items, 2)
    assert len(sizes) == 2 and min(sizes) > 4
    sizes.clear()
    stage.cfg.contrastive.grad_cache_chunk = 4
    chunked = stage.batch_losses(PlainEngine(module), items, 2)
    assert sizes and max(sizes) <= 4 and sum(sizes) > 8
    assert chunked == pytest.approx(whole, rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# contrastive.mask_false_negatives: keys at collate, the same mask in the plain, gradient-cached and held-out losses
# ----------------------------------------------------------------------------------------------

_TOPICS = ["a cat sleeps on the mat", "the market fell sharply", "rain is expected tomorrow", "he plays guitar",
           "the train was late", "she reads a book"]


def _rows_with_copies():
    """Six supervised rows: row 2's positive is row 0's, row 1's hard negative is row 0's positive, row 4's hard
    negative is row 3's positive. Queries 0 and 2 each drop 2 candidates, query 3 one: 5 (query, candidate) pairs."""
    pos = [_TOPICS[0], _TOPICS[1], _TOPICS[0], _TOPICS[3], _TOPICS[4], _TOPICS[5]]
    neg = ["not this one", _TOPICS[0], "nor that", "something else", _TOPICS[3], "far away"]
    return [{"query": f"what about {t.split()[1]} ({i})", "positive": p, "negatives": [n], "instruction": "Find: ",
             "source": "s"} for i, (t, p, n) in enumerate(zip(_TOPICS, pos, neg))]


_SENTENCES = [_TOPICS[0], _TOPICS[1], _TOPICS[0], _TOPICS[2], _TOPICS[1], _TOPICS[3]]  # two sentences met twice: 4


def _pairs_by_loop(batch):
    nq = batch["n_queries"]
    return sum(1 for i in range(nq) for j in range(batch["d_keys"].shape[0])
               if j != i and int(batch["d_keys"][j]) == int(batch["q_keys"][i]))


@pytest.mark.parametrize("stage_name,chunk,want", [("simcse", 5, 4), ("supervised", 4, 5)])
def test_false_negatives_are_masked_alike_with_and_without_gradient_caching(stage_name, chunk, want):
    """With contrastive.mask_false_negatives, collate keys every text (the queries by their positive); the masked
    loss of the gradient-cached micro-step (keys through the loss on the detached embeddings, dropout replayed)
    equals the plain one, loss and LoRA gradients, and both report the count of masked pairs; the held-out loss
    masks them too, embedded whole or in chunks. Masking changes every one of these losses (the copies are real)."""
    cfg = load_config(f"configs/tiny/{stage_name}.yaml", ["contrastive.mask_false_negatives=true",
                                                         "model.attention_dropout=0.3", "lora.dropout=0.1",
                                                         "model.gradient_checkpointing=false", "batch_size=6",
                                                         "micro_batch_size=6"])
    tok = load_tokenizer(cfg.model)
    stage = build_stage(cfg, tok)
    items = _SENTENCES if stage_name == "simcse" else _rows_with_copies()
    model, _ = load_model(cfg.model, "cpu", tok)
    module = EngineModule(perturb_lora_b(add_lora(model, cfg.lora), 0.05), stage).train()
    batch = stage.collate(items, torch.Generator().manual_seed(0))
    batch.pop("truncated")
    assert batch["q_keys"].dtype == torch.int64 and batch["d_keys"].shape[0] == batch["input_ids"].shape[0] - 6
    assert _pairs_by_loop(batch) == want
    twin = copy.deepcopy(module)
    n = batch["input_ids"].shape[0]
    spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]

    torch.manual_seed(123)  # direct: the chunked forward with grad (same dropout masks), one backward
    embs = [module({"mode": "embed", **{k: batch[k][s:e] for k in ("input_ids", "attention_mask", "pool_mask")}})[0]
            for s, e in spans]
    q, d = stage.split(torch.cat(embs), batch)
    direct, counts = stage.contrastive_counted(q, d, batch)
    direct.backward()
    assert int(counts["false_negatives"]) == want
    unmasked = stage.contrastive(q, d, {k: v for k, v in batch.items() if not k.endswith("_keys")})
    assert abs(unmasked.item() - direct.item()) > 1e-3

    twin.stage.cfg.contrastive.grad_cache_chunk = chunk
    torch.manual_seed(123)
    cached, metrics = twin.stage.train_micro_step(PlainEngine(twin), batch)
    assert int(metrics["false_negatives"]) == want
    torch.testing.assert_close(cached, direct.detach(), rtol=1e-6, atol=1e-7)
    grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    for name, p in twin.named_parameters():
        if p.requires_grad:
            g = grads[name]
            torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-5 * float(g.abs().max()) + 1e-7, msg=name)

    # held out (no dropout): the same mask, whole or in gradient caching's chunks; mask off reads another loss
    module.eval()
    whole = stage.batch_losses(PlainEngine(module), items, 1)
    with torch.no_grad():
        emb = stage.embed(module, batch["input_ids"], batch["attention_mask"], batch["pool_mask"], batch["layout"])
        assert whole == pytest.approx([float(stage.contrastive(*stage.split(emb, batch), batch))], rel=1e-6)
    stage.cfg.contrastive.grad_cache_chunk = chunk
    assert stage.batch_losses(PlainEngine(module), items, 1) == pytest.approx(whole, rel=1e-5, abs=1e-6)
    stage.cfg.contrastive.mask_false_negatives = False
    assert "q_keys" not in stage.collate(items, torch.Generator().manual_seed(0))  # off: llm2vec's batch, no keys
    assert abs(stage.batch_losses(PlainEngine(module), items, 1)[0] - whole[0]) > 1e-3


def test_a_texts_key_is_its_pooled_token_ids():
    """Two texts are one when the model reads the same ids where it pools: the instruction (attended, not pooled)
    does not count, truncation at max_len does; under bos pooling the whole sequence is pooled, instruction too."""
    from engine.encoding import tokenize_with_instruction
    from engine.stages.contrastive import text_keys

    cfg = load_config("configs/tiny/supervised.yaml", ["contrastive.max_len=8"])
    tok = load_tokenizer(cfg.model)
    long = "one two three four five six seven eight nine ten"
    texts = ["a cat sleeps", "a cat sleeps", "a dog sleeps", long, long + " eleven"]
    instr = ["", "Find: ", "", "", ""]

    def keys(pooling):
        return text_keys(*tokenize_with_instruction(tok, texts, instr, 8, pooling)[:2]).tolist()

    k = keys("mean")
    assert k[0] == k[1] != k[2] and k[3] == k[4] and len(set(k)) == 3 and all(0 <= x < 2 ** 63 for x in k)
    assert keys("eos") == k  # the pool mask marks the same tokens whichever token is pooled from them
    b = keys("bos")
    assert b[0] != b[1] and b[0] == text_keys(*tokenize_with_instruction(tok, texts[:1], [""], 8, "bos")[:2])[0]
