import pytest
import torch

from engine.encoding import instruction_prefix, pad_batch, tokenize_for_encoding, tokenize_with_instruction
from engine.pooling import pool


def _hidden():
    # (B=2, S=4, H=2) with easy numbers
    return torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [9.0, 9.0]],
                         [[2.0, 2.0], [4.0, 0.0], [7.0, 7.0], [8.0, 8.0]]])


def test_mean_weighted_eos_bos_right_padding():
    h = _hidden()
    am = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    torch.testing.assert_close(pool(h, am, "mean"), torch.tensor([[3.0, 2.0], [3.0, 1.0]]))
    # weights 1,2,3 / 1,2
    torch.testing.assert_close(pool(h, am, "weighted_mean"),
                               torch.tensor([[(1 + 6 + 15) / 6, (0 + 4 + 12) / 6], [(2 + 8) / 3, (2 + 0) / 3]]))
    torch.testing.assert_close(pool(h, am, "eos"), torch.tensor([[5.0, 4.0], [4.0, 0.0]]))
    torch.testing.assert_close(pool(h, am, "last"), torch.tensor([[5.0, 4.0], [4.0, 0.0]]))
    torch.testing.assert_close(pool(h, am, "bos"), torch.tensor([[1.0, 0.0], [2.0, 2.0]]))


def test_left_padding_gives_the_same_answers():
    h = _hidden()
    am = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    torch.testing.assert_close(pool(h, am, "mean"), torch.tensor([[17 / 3, 5.0], [7.5, 7.5]]))
    torch.testing.assert_close(pool(h, am, "weighted_mean"),
                               torch.tensor([[(3 + 10 + 27) / 6, (2 + 8 + 27) / 6], [(7 + 16) / 3, (7 + 16) / 3]]))
    torch.testing.assert_close(pool(h, am, "eos"), torch.tensor([[9.0, 9.0], [8.0, 8.0]]))
    torch.testing.assert_close(pool(h, am, "bos"), torch.tensor([[3.0, 2.0], [7.0, 7.0]]))


def test_instruction_tokens_are_attended_but_not_pooled():
    h = _hidden()
    am = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    pm = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])  # first tokens are the instruction
    torch.testing.assert_close(pool(h, am, "mean", pm), torch.tensor([[7.0, 6.5], [5.5, 3.5]]))
    torch.testing.assert_close(pool(h, am, "weighted_mean", pm),
                               torch.tensor([[(5 + 18) / 3, (4 + 18) / 3], [(4 + 14) / 3, (0 + 14) / 3]]))
    with pytest.raises(ValueError, match="no tokens to pool"):
        pool(h, am, "mean", torch.zeros_like(am))
    with pytest.raises(ValueError, match="unknown pooling mode"):
        pool(h, am, "max")


@pytest.mark.parametrize("mode", ["mean", "weighted_mean"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_long_texts_pool_in_half_precision_without_overflow(mode, dtype):
    """A 500-token text in fp16: the weighted mean's weight sum n(n+1)/2 = 125250 and a channel of 300s summed over
    500 tokens (150000) both pass fp16's 65504. Pooling must still give the fp64 answer to about the dtype's
    rounding of the states, and a gradient that is finite."""
    g = torch.Generator().manual_seed(0)
    B, S, H = 3, 500, 16
    h = torch.randn(B, S, H, generator=g, dtype=torch.float64) * 4
    h[:, :, 3] += 300.0  # one large channel, as LLM hidden states have
    am = torch.ones(B, S, dtype=torch.long)
    am[1, 420:] = 0
    am[2, :77] = 0  # left padding
    pm = am.clone()
    pm[0, :30] = 0  # an instruction
    w = pm.to(torch.float64)
    if mode == "weighted_mean":
        w = torch.cumsum(pm, 1).to(torch.float64) * w
    ref = (h * w[..., None]).sum(1) / w.sum(1, keepdim=True)
    x = h.to(dtype).requires_grad_()
    out = pool(x, am, mode, pm)
    assert out.dtype == dtype and torch.isfinite(out).all()
    eps = torch.finfo(dtype).eps
    err = ((out.double() - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
    assert err < 2 * eps, err
    out.float().pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[pm == 0] == 0).all()  # unpooled tokens get no gradient


@pytest.fixture(scope="module")
def tok():
    from engine.config import ModelConfig
    from engine.modeling import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path="smollm2-135m"))


def test_training_pools_what_encode_and_sentence_transformers_pool(tok):
    """One rule for the pooled tokens in training, ``encode`` and an exported sentence-transformers folder: the
    instruction ends in a newline (never fused with the text), the text's tokens and an appended EOS are pooled."""
    text = "A dog runs on the beach."
    eos = tok.eos_token_id
    for instr in ("", "Retrieve a similar sentence:", "Retrieve a similar sentence: ", "Retrieve:\n"):
        ids, pms, trunc = tokenize_with_instruction(tok, [text], [instr], max_len=64)
        assert (ids, pms) == tokenize_for_encoding(tok, [text], [instr], max_len=64)[:2]
        prefix = instruction_prefix(instr)
        assert prefix == (instr.rstrip() + "\n" if instr else "")
        joint = tok(prefix + text, add_special_tokens=True)["input_ids"] + [eos]
        assert ids[0] == joint and trunc == 0
        n = len(tok(prefix, add_special_tokens=True)["input_ids"]) if prefix else 0
        assert pms[0] == [0] * n + [1] * (len(joint) - n), instr
        # every word of the text is pooled (the newline never fuses with "A"), and the EOS
        pooled = [t for t, m in zip(ids[0], pms[0]) if m]
        assert pooled[-1] == eos and tok.decode(pooled[:-1]).strip() == text, instr
    with pytest.raises(ValueError, match="leaves no room for the text"):
        tokenize_with_instruction(tok, [text], ["a long instruction " * 10], max_len=8)
    # truncation keeps the EOS last and is counted
    ids2, pms2, trunc2 = tokenize_with_instruction(tok, [text * 20], [""], max_len=16, pooling="eos")
    assert len(ids2[0]) == 16 and ids2[0][-1] == eos and pms2[0][-1] == 1 and trunc2 == 1
    # "" embeds by its EOS: never nothing to pool
    ids3, pms3, _ = tokenize_with_instruction(tok, [""], ["Retrieve:"], max_len=16)
    assert ids3[0][-1] == eos and sum(pms3[0]) >= 1


def test_pad_batch_sides():
    ids, am = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and am.tolist() == [[1, 1, 1], [0, 0, 1]]
