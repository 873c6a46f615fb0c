"""Pooling token states into one embedding per text. All modes are vectorised and padding-side agnostic.

``attention_mask`` (B, S) marks real tokens; ``pool_mask`` (B, S) marks the tokens to pool (the text
without its instruction prefix); it defaults to ``attention_mask``. Instruction tokens are still
attended by the model, they are only left out of the pooled average.

``last`` is the same as ``eos``: the engine's encoding ends every text in one EOS (``engine.encoding``), so a
text's last pooled token is its EOS. The name is kept for llm2vec's ``last_token``, which differs from its
``eos_token`` only in not appending the EOS.
"""
import torch

POOLING_MODES = ("mean", "weighted_mean", "eos", "last", "bos")


def pool(hidden, attention_mask, mode="mean", pool_mask=None, check=True):
    # hidden (B, S, H), attention_mask (B, S), pool_mask (B, S) -> (B, H). check=False skips the (host-syncing)
    # "every text has a token to pool" check, for callers that checked on the host (collate).
    if mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling mode {mode!r}; expected one of {POOLING_MODES}")
    am = attention_mask.to(torch.bool)
    pm = am if pool_mask is None else (pool_mask.to(torch.bool) & am)
    if check and not bool(pm.any(dim=1).all()):
        raise ValueError("a text has no tokens to pool (empty text, or truncated away behind its instruction)")
    if mode in ("mean", "weighted_mean"):
        # The weights are made in fp32 (or the states' wider dtype) and normalised to sum to 1 before they meet
        # the states: the pooled vector is a convex combination, one batched matmul whose every partial sum stays
        # within max |h|, so it cannot overflow in fp16 (whatever precision cuBLAS reduces in). Summing
        # first and dividing after overflows fp16 (65504) for a weighted mean past 361 tokens, where the weights'
        # sum n(n+1)/2 alone is inf, and for a plain mean whose sum of a large channel passes the range. Only the
        # weights (B, S) are kept for the backward, as with an elementwise product by a mask.
        wdt = torch.promote_types(hidden.dtype, torch.float32)
        w = pm.to(wdt)
        if mode == "weighted_mean":
            # Position weights 1..n over the pooled tokens (later tokens, which saw more context in the causal base
            # model, weigh more); the rank comes from a cumsum so padding side does not matter.
            w = torch.cumsum(pm.to(torch.int64), dim=1).to(wdt) * w
        w = (w / w.sum(1, keepdim=True)).to(hidden.dtype)
        return torch.bmm(w.unsqueeze(1), hidden).squeeze(1)
    S = hidden.shape[1]
    pos = torch.arange(S, device=hidden.device).expand_as(pm)
    if mode in ("eos", "last"):
        idx = torch.where(pm, pos, torch.full_like(pos, -1)).max(dim=1).values
    else:  # bos: the first real token, whatever the padding side
        idx = torch.where(am, pos, torch.full_like(pos, S)).min(dim=1).values
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
