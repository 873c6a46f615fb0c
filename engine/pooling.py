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
    dt = hidden.dtype
    if mode == "mean":
        w = pm.to(dt)
        return (hidden * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)
    if mode == "weighted_mean":
        # Position weights 1..n over the pooled tokens (later tokens, which saw more context in the
        # causal base model, weigh more); the rank comes from a cumsum so padding side does not matter.
        w = (torch.cumsum(pm.to(torch.int64), dim=1) * pm).to(dt)
        return (hidden * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)
    S = hidden.shape[1]
    pos = torch.arange(S, device=hidden.device).expand_as(pm)
    if mode in ("eos", "last"):
        idx = torch.where(pm, pos, torch.full_like(pos, -1)).max(dim=1).values
    else:  # bos: the first real token, whatever the padding side
        idx = torch.where(am, pos, torch.full_like(pos, S)).min(dim=1).values
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
