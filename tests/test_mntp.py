import torch

from engine.stages.mntp import IGNORE, mask_tokens


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (4, 50), generator=g)
    ids[:, 0] = 1  # bos (special)
    ids[1, 20] = 2  # an eos inside (special)
    am = torch.ones_like(ids)
    am[2, 30:] = 0  # right padding
    ids[2, 30:] = 0
    return ids, am


def test_labels_shift_so_token_i_is_predicted_at_i_minus_1():
    ids, am = _batch()
    masked, labels = mask_tokens(ids, am, {0, 1, 2}, mask_id=5, vocab_size=1000, prob=0.3, scheme="all",
                                 generator=torch.Generator().manual_seed(1))
    pos = (labels != IGNORE).nonzero()
    assert len(pos) > 20
    for b, i in pos.tolist():
        assert labels[b, i] == ids[b, i + 1], "the label at i-1 is the original token i"
        assert masked[b, i + 1] == 5, "scheme 'all' replaces every chosen token by the mask token"
    # every masked token has its label one position earlier; nothing else changed
    changed = masked != ids
    assert torch.equal(changed[:, 1:], labels[:, :-1] != IGNORE)
    assert (labels[:, -1] == IGNORE).all()


def test_special_tokens_padding_and_position_zero_are_never_masked():
    ids, am = _batch()
    ids[3, 0] = 77  # a row without BOS (SmolLM2, Qwen): its position 0 is not a special token
    for seed in range(5):
        masked, labels = mask_tokens(ids, am, {0, 1, 2}, 5, 1000, prob=0.9, scheme="bert",
                                     generator=torch.Generator().manual_seed(seed))
        target_pos = torch.zeros_like(ids, dtype=torch.bool)
        target_pos[:, 1:] = labels[:, :-1] != IGNORE
        assert not target_pos[:, 0].any()
        assert not target_pos[1, 20] and not target_pos[2, 30:].any()
        assert torch.equal(masked[~target_pos], ids[~target_pos])


def test_bert_scheme_proportions():
    ids = torch.randint(10, 30000, (64, 256), generator=torch.Generator().manual_seed(3))
    am = torch.ones_like(ids)
    masked, labels = mask_tokens(ids, am, set(), 5, 30000, prob=0.2, scheme="bert",
                                 generator=torch.Generator().manual_seed(4))
    chosen = torch.zeros_like(ids, dtype=torch.bool)
    chosen[:, 1:] = labels[:, :-1] != IGNORE
    n = chosen.sum().item()
    assert abs(n / (64 * 255) - 0.2) < 0.01
    as_mask = (masked[chosen] == 5).float().mean().item()
    unchanged = (masked[chosen] == ids[chosen]).float().mean().item()
    assert abs(as_mask - 0.8) < 0.02
    assert abs(unchanged - 0.1) < 0.02  # (a random draw equal to the original is negligible at this vocab)


def test_masking_is_deterministic_given_the_generator():
    ids, am = _batch()
    a = mask_tokens(ids, am, {0, 1, 2}, 5, 1000, 0.2, "bert", torch.Generator().manual_seed(7))
    b = mask_tokens(ids, am, {0, 1, 2}, 5, 1000, 0.2, "bert", torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
