"""The generic bidirectional switch, across the supported families, with padding and packing.

These tests show the switch makes attention non-causal and keeps padding out; that the resulting hidden states
are *correct* for every family (Gemma2's soft-capping and query scalar, sliding windows, both padding sides,
packed and padded) is checked against transformers' own is_causal=False attention in tests/test_oracles.py."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import llm2vec_kernels
from engine.bidirectional import SUPPORTED_ARCHITECTURES, UnsupportedArchitectureError, make_bidirectional
from engine.modeling import packed_hidden_states
from .helpers import count_launches, inside_repo

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, head_dim=8)
EXTRA = {
    "mistral": {"sliding_window": 4096},
    "qwen2": {"use_sliding_window": False},
    "qwen3": {},
    "gemma": {},
    "gemma2": {"sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "query_pre_attn_scalar": 8},
    "llama": {},
    "phi3": {"sliding_window": 4096, "pad_token_id": None, "eos_token_id": 2,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}},
}


def tiny(model_type, **kw):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **EXTRA[model_type], **kw})
    return AutoModelForCausalLM.from_config(cfg).eval()


def hidden(model, ids, **kw):
    return model.get_decoder()(input_ids=ids, **kw).last_hidden_state


@pytest.mark.parametrize("model_type", sorted(SUPPORTED_ARCHITECTURES))
def test_later_token_changes_earlier_state_only_when_bidirectional(model_type):
    model = tiny(model_type)
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    ids2 = ids.clone()
    ids2[0, 9] = (ids2[0, 9] + 5) % 97
    with torch.no_grad():
        c1, c2 = hidden(model, ids), hidden(model, ids2)
        assert torch.allclose(c1[0, :9], c2[0, :9], atol=1e-6), "the causal model must not see later tokens"
        make_bidirectional(model)
        b1, b2 = hidden(model, ids), hidden(model, ids2)
    assert (b1[0, 2] - b2[0, 2]).abs().max() > 1e-4, "bidirectional: position 2 must see position 9"
    # position 11 (after the change) differs in both, sanity
    assert (b1[0, 11] - b2[0, 11]).abs().max() > 1e-4


@pytest.mark.parametrize("model_type", ["llama", "mistral", "gemma2", "qwen2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_leaks(model_type, side, monkeypatch):
    from engine import bidirectional

    # right padding is read in place (seqlens=): the unpad path must not run for it
    unpad = bidirectional._cu_from_mask
    calls = []
    monkeypatch.setattr(bidirectional, "_cu_from_mask", lambda m: calls.append(1) or unpad(m))
    model = make_bidirectional(tiny(model_type))
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, 97, (n,), generator=g) for n in (11, 5, 8)]
    S = 11
    ids = torch.zeros(3, S, dtype=torch.long)
    am = torch.zeros(3, S, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(S - len(s), S) if side == "left" else slice(0, len(s))
        ids[i, sl], am[i, sl] = s, 1
    with torch.no_grad():
        alone = [hidden(model, s[None])[0] for s in seqs]
        for packed in (True, False):
            batch = packed_hidden_states(model, ids, am, packed=packed)
            for i, s in enumerate(seqs):
                sl = slice(S - len(s), S) if side == "left" else slice(0, len(s))
                torch.testing.assert_close(batch[i, sl], alone[i], atol=2e-5, rtol=1e-4)
    assert bool(calls) == (side == "left")  # the padded (unpacked) forward unpads only left padding


def test_sliding_window_is_honoured_bidirectionally():
    # A window smaller than the sequence: token 0 must not see token 9 when the window is 4.
    model = make_bidirectional(tiny("mistral", sliding_window=4))
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(3))
    ids2 = ids.clone()
    ids2[0, 9] = (ids2[0, 9] + 7) % 97
    with torch.no_grad():
        a, b = hidden(model, ids), hidden(model, ids2)
    # two layers of a |i - j| <= 4 band (transformers' bidirectional window, which an export loads with): position 9
    # reaches 9 - 8 = 1 and no further
    assert torch.allclose(a[0, :1], b[0, :1], atol=1e-6)
    assert (a[0, 1] - b[0, 1]).abs().max() > 1e-4  # the band's edge, and from the right side (bidirectional)


def test_a_window_binds_exactly_where_it_changes_the_attention():
    """engine.bidirectional.window_binds (which sends a call to the exact torch path) is true exactly when the band
    hides a key: for sequences up to window + 1 tokens the windowed reference equals full attention."""
    from engine.bidirectional import window_binds

    g = torch.Generator().manual_seed(0)
    for window in (1, 4):
        for length in range(1, window + 4):
            q, k, v = (torch.randn(1, length, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
            full = llm2vec_kernels.flash_attention_reference(q, k, v, scale=0.5)
            banded = llm2vec_kernels.flash_attention_reference(q, k, v, scale=0.5, window=window)
            assert window_binds(window, length) == (not torch.allclose(full, banded)), (window, length)
    assert not window_binds(None, 10**6)


@pytest.mark.parametrize("model_type,window,impl", [("llama", None, "torch"), ("llama", None, "triton"),
                                                     ("mistral", 2, "auto"), ("phi3", None, "torch")])
def test_attention_dropout_reaches_the_attention(model_type, window, impl):
    """SimCSE's attention-probability dropout (model.attention_dropout, set by set_attention_dropout) is drawn in
    train mode on every attention path: the kernel's and the reference's, and the exact torch path of a window
    that cuts the sequence. With no other dropout in the model, two train-mode passes differ and eval-mode passes
    agree; with p = 0 train mode is deterministic too. (No other test reads the attention's dropout apart from
    LoRA's, so an attention that dropped it went unseen.) Phi3's attention has a qkv_proj, no q_proj."""
    from engine.bidirectional import set_attention_dropout

    model = make_bidirectional(tiny(model_type, **({"sliding_window": window} if window else {})))
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    am = torch.ones_like(ids)
    llm2vec_kernels.set_default_impl("attention", impl)
    try:
        with torch.no_grad():
            model.train()
            assert set_attention_dropout(model, 0.0) == 2
            assert torch.equal(packed_hidden_states(model, ids, am), packed_hidden_states(model, ids, am))
            set_attention_dropout(model, 0.3)
            a, b = packed_hidden_states(model, ids, am), packed_hidden_states(model, ids, am)
            assert (a - b).abs().max() > 1e-3
            model.eval()
            assert torch.equal(packed_hidden_states(model, ids, am), packed_hidden_states(model, ids, am))
    finally:
        llm2vec_kernels.set_default_impl("attention", "auto")


def test_an_attention_dropout_that_misses_attention_layers_is_refused():
    """set_attention_dropout finds attention modules by their query projection (q_proj, or a fused one of the table
    such as Phi3's qkv_proj): a family whose attention has another shape (GPT-NeoX's query_key_value) got no
    dropout, and SimCSE's two views were the same forward without a word."""
    from engine.bidirectional import UnsupportedArchitectureError, set_attention_dropout

    model = tiny("llama")
    assert set_attention_dropout(model, 0.3) == 2
    attn = model.model.layers[1].self_attn
    attn.query_key_value = attn.q_proj  # one layer's attention no longer has a query projection the table names
    del attn.q_proj
    assert set_attention_dropout(model, 0.0) == 1  # no dropout asked: nothing to miss
    with pytest.raises(UnsupportedArchitectureError, match=r"model.attention_dropout=0.3 reaches 1 of the 2 attention"):
        set_attention_dropout(model, 0.3)


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match=r"'gpt2' is not supported.*llama.*mistral"):
        make_bidirectional(model)


def test_transformers_hub_kernels_are_the_hub_ones_and_leave_our_attention_alone():
    """transformers (5.25 on) requires Hugging Face's `kernels`; our ops live in `llm2vec_kernels`, so the hub
    integration imports the hub package (not ours, which once shadowed it) and a loaded model keeps SDPA, which
    make_bidirectional then routes to our attention."""
    import importlib.util

    from transformers.utils import is_kernels_available

    import transformers.integrations.hub_kernels  # noqa: F401  (failed while our package was named kernels)

    spec = importlib.util.find_spec("kernels")
    if is_kernels_available():
        assert spec is not None and not inside_repo(spec.origin)
    model = tiny("llama")
    assert model.config._attn_implementation == "sdpa"


def test_causal_model_runs_padded_not_packed(monkeypatch):
    # Packing relies on the engine's attention; a causal model runs its batch padded, never packed (transformers
    # may keep packed sequences apart by position_ids too, so the outputs alone could not tell: the path is checked).
    import engine.modeling

    model = tiny("llama")
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 97, (2, 7), generator=g)
    am = torch.ones_like(ids)
    am[1, 5:] = 0

    def no_pack(*a, **k):
        raise AssertionError("a causal model was packed")

    monkeypatch.setattr(engine.modeling, "pack", no_pack)
    with torch.no_grad():
        out = packed_hidden_states(model, ids, am, packed=True)
        alone = hidden(model, ids[1:, :5])
    torch.testing.assert_close(out[1, :5], alone[0], atol=2e-5, rtol=1e-4)


def test_packed_rows_told_only_by_position_ids_stay_apart():
    """transformers' DataCollatorWithFlattening without flash-attn kwargs packs sequences into one row told only by
    restarting position_ids: each sequence must attend to itself alone, as when it runs alone."""
    model = make_bidirectional(tiny("llama"))
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(3, 97, (1, 5), generator=g), torch.randint(3, 97, (1, 4), generator=g)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    with torch.no_grad():
        out = model.model(input_ids=torch.cat([a, b], 1), position_ids=pos).last_hidden_state
        alone = [model.model(input_ids=x).last_hidden_state for x in (a, b)]
    torch.testing.assert_close(out[0, :5], alone[0][0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out[0, 5:], alone[1][0], atol=2e-5, rtol=1e-4)


def test_the_mask_hook_takes_transformers_5_2s_arguments():
    """transformers 5.2 and 5.3 (within setup.py's range) call the mask hook without q_length."""
    from engine.bidirectional import _padding_mask

    am = torch.tensor([[1, 1, 0], [1, 1, 1]])
    got = _padding_mask(batch_size=2, cache_position=torch.arange(3), kv_length=3, kv_offset=0,
                        mask_function=None, attention_mask=am)
    assert torch.equal(got, am)
    assert _padding_mask(batch_size=1, cache_position=torch.arange(3), attention_mask=torch.ones(1, 3)) is None


def test_deterministic_attention_switch_reaches_the_triton_backward(monkeypatch):
    # model.deterministic_attention=false -> the Triton backward adds dQ with atomics (no dQ kernel launch);
    # the gradients agree with the deterministic path to rounding.
    from engine import bidirectional
    from llm2vec_kernels.attention import flash as A

    dq_launches = count_launches(monkeypatch, A, "_attn_bwd_dq")
    llm2vec_kernels.set_default_impl("attention", "triton")
    grads = {}
    try:
        for det in (True, False):
            bidirectional.set_deterministic_attention(det)
            model = make_bidirectional(tiny("llama"))
            ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(2))
            hidden(model, ids).square().sum().backward()
            grads[det] = model.get_decoder().layers[0].self_attn.q_proj.weight.grad
            grads[f"launches{det}"] = len(dq_launches)
            dq_launches.clear()
    finally:
        bidirectional.set_deterministic_attention(True)
        llm2vec_kernels.set_default_impl("attention", "auto")
    assert grads["launches" + "True"] == 2 and grads["launches" + "False"] == 0  # one dQ launch per layer
    torch.testing.assert_close(grads[False], grads[True], rtol=1e-4, atol=1e-5)


def test_right_padded_batch_through_the_triton_kernel_in_place():
    # An unpacked, right-padded batch reaches the Triton kernel as seqlens= (interpreter here) and matches
    # the torch reference on every real token.
    model = make_bidirectional(tiny("llama"))
    ids = torch.randint(3, 97, (3, 10), generator=torch.Generator().manual_seed(4))
    am = (torch.arange(10)[None, :] < torch.tensor([10, 3, 7])[:, None]).long()
    with torch.no_grad():
        want = packed_hidden_states(model, ids, am, packed=False)
        llm2vec_kernels.set_default_impl("attention", "triton")
        try:
            got = packed_hidden_states(model, ids, am, packed=False)
        finally:
            llm2vec_kernels.set_default_impl("attention", "auto")
    real = am.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)


def test_an_encoder_pass_builds_no_kv_cache():
    """packed_hidden_states (encode, evaluation, the contrastive stages' embed pass) asks the decoder for no KV
    cache: the model's config says use_cache=True, and the cache would hold every layer's K and V until the
    forward ends (about 2 GiB for 32 x 512 tokens on a 7B model)."""
    from engine.modeling import decoder_of

    from .helpers import tiny_llama_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(), dtype=torch.float32).eval()
    assert model.config.use_cache
    ids = torch.randint(0, 128, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    seen = []
    dec = decoder_of(model)
    dec.register_forward_hook(lambda m, args, kwargs, out: seen.append((kwargs.get("use_cache"),
                                                                       out.past_key_values)), with_kwargs=True)
    with torch.no_grad():
        packed_hidden_states(model, ids, mask)  # causal: the padded path
        make_bidirectional(model)
        packed_hidden_states(model, ids, mask)  # bidirectional: the packed path
    assert seen == [(False, None), (False, None)]


def test_gradient_caching_dispatches_each_layer_as_its_backward_will():
    """Gradient caching's no-grad pass picks each attention call's backend as the replay's backward will: a layer
    whose q / k / v get no gradient (LoRA on the MLP only: layer 0; LoRA on o_proj only) dispatches as a no-grad
    call in both passes, every later layer as a gradient call."""
    from engine.bidirectional import attention_gradient_reach

    model = make_bidirectional(tiny("llama"))
    layers = model.model.layers
    attn = [id(layer.self_attn) for layer in layers]

    def reach(*trainable):
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        got = attention_gradient_reach(model)
        return [got[a] for a in attn]

    assert reach(*(p for layer in layers for p in layer.mlp.parameters())) == [False, True]  # MLP-only LoRA
    assert reach(layers[0].self_attn.o_proj.weight) == [False, True]  # o_proj needs no attention backward
    assert reach(layers[0].self_attn.q_proj.weight) == [True, True]
    assert reach(layers[1].self_attn.v_proj.weight) == [False, True]
    assert reach(model.model.embed_tokens.weight) == [True, True]
    assert reach() == [False, False]


def test_shapes_only_attention_is_the_dry_runs_and_the_meta_devices_alone(monkeypatch):
    """The dry run's meta forward takes attention's output shape without running the exact torch path (which loops
    over every sequence of every layer: seconds at 7B supervised shapes). Off the meta device inside, and on the
    meta device outside (the step proxy costs those ops), attention runs as before."""
    import engine.bidirectional as bd

    q, k, v = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8)
    want = bd._attend(q, k, v, 5, None, 0.0, None, None)
    calls = []
    real = llm2vec_kernels.flash_attention
    monkeypatch.setattr(bd.llm2vec_kernels, "flash_attention", lambda *a, **kw: calls.append(a[0].device.type)
                        or real(*a, **kw))
    meta = [t.to("meta") for t in (q, k, v)]
    with bd.shapes_only_attention():
        assert torch.equal(bd._attend(q, k, v, 5, None, 0.0, None, None), want) and calls == ["cpu"]
        out = bd._attend(*meta, 5, None, 0.0, None, None)
        assert out.shape == want.shape and out.device.type == "meta" and calls == ["cpu"]
    assert bd._attend(*meta, 5, None, 0.0, None, None).shape == want.shape and calls == ["cpu", "meta"]
