"""The bidirectional switch against an independent oracle: transformers' own attention with ``is_causal=False``.

transformers 5.x builds a bidirectional padding mask when ``config.is_causal`` is False, and its eager attention
(and SDPA, once each attention module's ``is_causal`` is off) applies it, with each family's own scaling
(Gemma2's ``query_pre_attn_scalar``), logit soft-capping and sliding window. None of that goes through
``engine.bidirectional`` or ``llm2vec_kernels``, so it is a reference for every family: the engine's packed path and its
padded path (right padding read in place, left padding unpadded) must give the oracle's hidden states on every
real token, and padding must not change them.
"""
import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from engine.bidirectional import SUPPORTED_ARCHITECTURES, make_bidirectional
from engine.modeling import packed_hidden_states

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, head_dim=8)
EXTRA = {
    "llama": {},
    "mistral": {"sliding_window": 4096},
    "qwen2": {"use_sliding_window": False},
    "qwen3": {},
    "gemma": {},
    # query_pre_attn_scalar != head_dim, so a switch that used 1/sqrt(head_dim) would be caught
    "gemma2": {"sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "query_pre_attn_scalar": 32},
    # one qkv_proj and one gate_up_proj; a partial rotary embedding (Phi-4-mini's 0.75: the last quarter of each
    # head is not rotated); the config's pad id (32000) is beyond the tiny vocabulary
    "phi3": {"sliding_window": 4096, "pad_token_id": None, "eos_token_id": 2,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}},
}
LENS = (11, 5, 8)
# fp32 hidden states of O(1) after two layers: agreement to a few fp32 ulps of the values, times the depth
ATOL, RTOL = 2e-5, 1e-4


def tiny(model_type, **kw):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **EXTRA[model_type], **kw})
    return AutoModelForCausalLM.from_config(cfg).eval()


def oracle_of(model, impl):
    """A copy of the causal model on transformers' own attention with is_causal=False."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation(impl)
    ref.config.is_causal = False
    for mod in ref.modules():
        if hasattr(mod, "is_causal"):
            mod.is_causal = False  # read by transformers' SDPA path when no mask is built
    return ref


def padded_batch(side, lens=LENS, seed=2):
    g = torch.Generator().manual_seed(seed)
    S = max(lens)
    ids = torch.zeros(len(lens), S, dtype=torch.long)
    am = torch.zeros(len(lens), S, dtype=torch.long)
    for i, n in enumerate(lens):
        sl = slice(S - n, S) if side == "left" else slice(0, n)
        ids[i, sl], am[i, sl] = torch.randint(3, 97, (n,), generator=g), 1
    return ids, am


def oracle_hidden(ref, ids, am):
    pos = (torch.cumsum(am, 1) - 1).clamp(min=0)
    return ref.get_decoder()(input_ids=ids, attention_mask=am, position_ids=pos).last_hidden_state


def check_engine_against_oracle(model, ref, side):
    ids, am = padded_batch(side)
    real = am.bool()
    with torch.no_grad():
        want = oracle_hidden(ref, ids, am)
        causal = oracle_hidden(model, ids, am)  # still the untouched causal model
        bidi = make_bidirectional(copy.deepcopy(model))
        got_packed = packed_hidden_states(bidi, ids, am, packed=True)
        got_padded = packed_hidden_states(bidi, ids, am, packed=False)
        alone = [bidi.get_decoder()(input_ids=ids[i][real[i]][None]).last_hidden_state[0] for i in range(len(LENS))]
    # the oracle is not trivially the causal model: they differ by far more than the tolerance
    assert (want[real] - causal[real]).abs().max() > 100 * ATOL
    torch.testing.assert_close(got_packed[real], want[real], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got_padded[real], want[real], atol=ATOL, rtol=RTOL)
    assert (got_packed[~real] == 0).all()  # the packed path writes zeros to padding (the padded one does not)
    for i in range(len(LENS)):  # padding invariance: each sequence alone (dense, no mask) gives the same states
        torch.testing.assert_close(alone[i], want[i][real[i]], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("model_type", sorted(SUPPORTED_ARCHITECTURES))
def test_engine_matches_transformers_eager_bidirectional(model_type, side):
    model = tiny(model_type)
    check_engine_against_oracle(model, oracle_of(model, "eager"), side)


@pytest.mark.parametrize("model_type", sorted(set(SUPPORTED_ARCHITECTURES) - {"gemma2"}))
def test_engine_matches_transformers_sdpa_bidirectional(model_type):
    model = tiny(model_type)
    check_engine_against_oracle(model, oracle_of(model, "sdpa"), "right")


def _gemma2_with_big_logits(softcap):
    model = tiny("gemma2", attn_logit_softcapping=softcap)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model


def test_gemma2_softcap_and_query_scalar_through_the_model():
    # Attention logits of tens, a cap of 5: soft-capping changes the result, and the engine must apply it the
    # way Gemma2 does (cap * tanh(logits / cap), after scaling by query_pre_attn_scalar**-0.5).
    model = _gemma2_with_big_logits(5.0)
    ref = oracle_of(model, "eager")
    check_engine_against_oracle(model, ref, "right")
    ids, am = padded_batch("right")
    real = am.bool()
    with torch.no_grad():
        capped = oracle_hidden(ref, ids, am)
        uncapped_model = copy.deepcopy(model)
        uncapped_model.config.attn_logit_softcapping = None
        for layer in uncapped_model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        uncapped = oracle_hidden(oracle_of(uncapped_model, "eager"), ids, am)
        other_scale = copy.deepcopy(model)
        other_scale.config.query_pre_attn_scalar = 8
        for layer in other_scale.model.layers:
            layer.self_attn.scaling = 8 ** -0.5
        rescaled = oracle_hidden(oracle_of(other_scale, "eager"), ids, am)
    # both features matter at these magnitudes, by far more than the tolerance the engine is held to
    assert (capped[real] - uncapped[real]).abs().max() > 100 * ATOL
    assert (capped[real] - rescaled[real]).abs().max() > 100 * ATOL


@pytest.mark.parametrize("side", ["right", "left"])
def test_gemma2_softcap_in_the_triton_kernel_matches_transformers(side):
    # model.attention=triton: Gemma2's soft-capped attention runs in the Triton kernel (the interpreter here), packed
    # and padded, against transformers' eager soft-capping; and its gradients against the reference path's.
    import llm2vec_kernels
    from llm2vec_kernels.attention import flash as F

    model = _gemma2_with_big_logits(5.0)
    launches = []
    real_fwd = F._attn_fwd

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real_fwd[grid]

    llm2vec_kernels.set_default_impl("attention", "triton")
    F._attn_fwd = Counting()
    try:
        check_engine_against_oracle(model, oracle_of(model, "eager"), side)
        assert launches  # the kernel ran, soft-capping and all
        ids, am = padded_batch(side)
        grads = []
        for impl in ("triton", "torch"):
            llm2vec_kernels.set_default_impl("attention", impl)
            bidi = make_bidirectional(copy.deepcopy(model))
            packed_hidden_states(bidi, ids, am, packed=True).pow(2).sum().backward()
            grads.append(bidi.model.layers[0].self_attn.q_proj.weight.grad)
        torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-3)
    finally:
        F._attn_fwd = real_fwd
        llm2vec_kernels.set_default_impl("attention", "auto")


@pytest.mark.parametrize("model_type", ["mistral", "phi3"])
def test_sliding_window_matches_transformers_bidirectional_window(model_type):
    # A window shorter than the sequences: the engine's banded fallback against transformers' bidirectional
    # sliding-window mask, on the same window (both keep |i - j| <= window, as an export reloads it).
    model = tiny(model_type, sliding_window=4)
    ref = oracle_of(model, "eager")
    check_engine_against_oracle(model, ref, "right")
    check_engine_against_oracle(model, ref, "left")
