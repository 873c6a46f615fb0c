"""Graded-score losses for STS-style scored pairs: CoSENT and AnglE.

Both take the two sides of B pairs, a (B, E) and b (B, E), and the gold scores (B,). Only the order of
the scores matters (plus a threshold for AnglE's in-batch-negative term), so any scale works (STS-B: 0-5).

* CoSENT (Su Jianlin, "CoSENT: a more efficient sentence vector scheme than Sentence-BERT", 2022; it is
  also the cosine objective of Li & Li, "AnglE-optimized Text Embeddings", arXiv:2309.12871 / ACL 2024 "AoE"):

      L_cos = log(1 + sum_{(i, j): s_i > s_j} exp(lambda * (cos_j - cos_i))),   cos_k = cos(a_k, b_k), lambda = 20

* AnglE (Li & Li, same paper): L = w_cos * L_cos + w_ibn * L_ibn + w_angle * L_angle, with the authors'
  defaults w = (1, 1, 1) and lambda = 20 for all three terms (``angle_emb`` 0.4 ``AngleLoss``), where

      L_ibn   = in-batch negatives (InfoNCE) over the positive pairs: the 2B texts [a; b] are scored against
                each other (lambda * cosine, self excluded), and for each pair k with s_k >= positive_min_score,
                a_k's target is b_k and b_k's target is a_k; mean over those 2P anchors. (The authors' code takes
                every pair whose integer label is non-zero as positive, i.e. s >= 1 on a 0-5 scale; we default
                to 4, since an STS-B pair scoring 1-3 is not a paraphrase, and make it configurable);
      L_angle = log(1 + sum_{(i, j): s_i > s_j} exp(lambda * (g_j - g_i))),

  with g_k the pooled, norm-free complex-space quotient of the pair: split each embedding into a real and an
  imaginary half, x = re + i im, take z = a_k, w = b_k and q_m = z_m conj(w_m) / (|z| |w|) per complex
  coordinate m (the authors' code divides z_m conj(w_m) by sum |w|^2, then by |z| / |w|: the same), and
  g_k = |sum_m (Re q_m + Im q_m)| ("sum" pooling, their default). Its real part alone is cos(a_k, b_k); the imaginary part adds the angle
  terms whose gradient does not vanish where the cosine saturates (the paper's motivation). The published
  implementation (the authors' ``angle_emb`` package, and sentence-transformers' ``AnglELoss``) ranks g as a
  similarity, as written here: a pair with a higher gold score should have the larger g.

Cross-rank batches: with ``gather_across_ranks`` every rank gathers all ranks' a, b and scores (with gradient,
``llm2vec_kernels.all_gather_with_grad``) and computes the same global loss over world * B pairs, so every pair is
ranked against every other pair of the global batch. The gather's backward sums the identical ranks'
gradients (x world) and the data-parallel average divides by world: the update is that of the global loss.

Gradient caching: the losses are plain torch functions of the embeddings, so they run on detached embeddings
that require grad (``engine.stages.contrastive``'s grad-cache path) exactly as on live ones.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

import llm2vec_kernels


def _gather(x, gather_across_ranks):
    if gather_across_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return llm2vec_kernels.all_gather_with_grad(x)
    return x


def _check(a, b, scores):
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"expected a and b of the same (B, E) shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if scores.shape != (a.shape[0],):
        raise ValueError(f"expected one score per pair ({a.shape[0]}), got shape {tuple(scores.shape)}")
    if a.shape[0] == 0:
        raise ValueError("graded loss: empty batch")


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rank_loss(sim, scores, scale):
    """log(1 + sum_{s_i > s_j} exp(scale * (sim_j - sim_i))): pairs with a higher score should have a higher sim."""
    diff = scale * (sim[None, :] - sim[:, None])  # [i, j] = scale * (sim_j - sim_i)
    ordered = scores[:, None] > scores[None, :]  # [i, j]: s_i > s_j
    terms = diff[ordered]
    zero = torch.zeros(1, dtype=sim.dtype, device=sim.device)  # the "1 +"
    return torch.logsumexp(torch.cat([zero, terms]), dim=0)


def pair_cosine(a, b):
    return F.cosine_similarity(a, b, dim=-1, eps=1e-12)


def pair_angle(a, b, eps=1e-12):
    """g_k = |sum_m Re q_m + Im q_m| with q_m = z_m conj(w_m) / (|z| |w|), z = a_k and w = b_k as complex vectors."""
    if a.shape[-1] % 2:
        raise ValueError(f"the angle term needs an even embedding size (real and imaginary halves), got {a.shape[-1]}")
    re_a, im_a = a.chunk(2, dim=-1)
    re_b, im_b = b.chunk(2, dim=-1)
    norms = (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(eps)
    real = (re_a * re_b + im_a * im_b).sum(-1)  # Re sum z conj(w)
    imag = (im_a * re_b - re_a * im_b).sum(-1)  # Im sum z conj(w)
    return ((real + imag) / norms).abs()


def cosent_loss(a, b, scores, *, scale=20.0, gather_across_ranks=False):
    """CoSENT over the (gathered) batch of scored pairs; fp32 (fp64 for fp64 inputs) scalar."""
    _check(a, b, scores)
    cdt = _compute_dtype(a)
    cos = _gather(pair_cosine(a.to(cdt), b.to(cdt)), gather_across_ranks)
    s = _gather(scores.to(cdt), gather_across_ranks)
    return rank_loss(cos, s, scale)


def in_batch_negatives_loss(a, b, scores, *, scale=20.0, positive_min_score=4.0):
    """InfoNCE over the positive pairs (s_k >= positive_min_score), both directions, against every other text.

    The 2B texts x = [a; b] are scored against each other (scale * cosine, self excluded); for a positive pair
    k, a_k's target is b_k and b_k's target is a_k. Mean over the 2P anchors; 0 (with a graph) if P = 0.
    """
    n = a.shape[0]
    pos = (scores >= positive_min_score).nonzero().squeeze(1)
    if pos.numel() == 0:
        return a.sum() * 0.0  # keeps the graph (every rank must run the same backward collectives)
    x = F.normalize(torch.cat([a, b]), dim=-1)
    eye = torch.eye(2 * n, dtype=torch.bool, device=a.device)
    logits = (scale * x @ x.t()).masked_fill(eye, float("-inf"))
    anchors = torch.cat([pos, pos + n])
    targets = torch.cat([pos + n, pos])
    return F.cross_entropy(logits[anchors], targets)


def angle_loss(a, b, scores, *, scale=20.0, weights=(1.0, 1.0, 1.0), positive_min_score=4.0,
               gather_across_ranks=False):
    """AnglE: w_cos * CoSENT + w_ibn * in-batch negatives + w_angle * angle ranking (see the module docstring)."""
    _check(a, b, scores)
    cdt = _compute_dtype(a)
    ga, gb = _gather(a.to(cdt), gather_across_ranks), _gather(b.to(cdt), gather_across_ranks)
    s = _gather(scores.to(cdt), gather_across_ranks)
    w_cos, w_ibn, w_angle = weights
    loss = ga.sum() * 0.0
    if w_cos:
        loss = loss + w_cos * rank_loss(pair_cosine(ga, gb), s, scale)
    if w_ibn:
        loss = loss + w_ibn * in_batch_negatives_loss(ga, gb, s, scale=scale, positive_min_score=positive_min_score)
    if w_angle:
        loss = loss + w_angle * rank_loss(pair_angle(ga, gb), s, scale)
    return loss
