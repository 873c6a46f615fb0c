"""In-batch contrastive (InfoNCE) loss with hard and cross-rank negatives.

STATUS: reference only; the Triton kernel lands with issue 6 behind the same public function.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ._backend import resolve_impl


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns this rank's slice of the summed upstream gradients.

    Every rank's loss depends on every rank's candidates, so d(sum_r loss_r)/d(x_s) is the sum over
    ranks of the gradient each one computed for slice s: an all-reduce, then keep our slice.
    """

    @staticmethod
    def forward(ctx, x):
        world = dist.get_world_size()
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
        sizes = [int(s.item()) for s in sizes]
        if len(set(sizes)) != 1:
            raise ValueError(f"all ranks must contribute the same number of rows, got {sizes}")
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x):
    """(n, E) on each rank -> (world * n, E), rank-major; gradients flow back to their owners."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def _global_layout(q, d, gather_across_ranks):
    """Return (q, candidates, positive index per query) over the candidate set this rank scores."""
    B = q.shape[0]
    if d.shape[0] < B or d.shape[0] % B != 0:
        raise ValueError(f"d must hold B*(1+n) rows with B = {B}, got {d.shape[0]}")
    if gather_across_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank = dist.get_rank()
        d_all = all_gather_with_grad(d)
        target = rank * d.shape[0] + torch.arange(B, device=q.device)
        return d_all, target
    return d, torch.arange(B, device=q.device)


def contrastive_loss_reference(q, d, *, temperature=0.05, gather_across_ranks=False):
    """q (B, E) queries, d (M, E) candidates with M = B*(1+n): d[i] is query i's positive, d[B:] hard negatives.

    Scores are cosine similarities / temperature; the loss is the mean over queries of
    logsumexp_j(s_ij) - s_i,pos. Computed in fp32 (or fp64 for fp64 inputs).
    """
    if q.dim() != 2 or d.dim() != 2 or q.shape[1] != d.shape[1]:
        raise ValueError(f"expected q (B, E) and d (M, E), got {tuple(q.shape)} and {tuple(d.shape)}")
    if q.shape[0] == 0:
        raise ValueError("contrastive_loss: empty batch")
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    cands, target = _global_layout(q, d, gather_across_ranks)
    qn = F.normalize(q.to(cdt), dim=-1)
    dn = F.normalize(cands.to(cdt), dim=-1)
    scores = qn @ dn.t() / temperature
    return F.cross_entropy(scores, target)


def contrastive_loss(q, d, *, temperature=0.05, gather_across_ranks=False, impl=None):
    backend = resolve_impl("contrastive", impl, q)
    if backend == "triton":
        raise NotImplementedError("Triton contrastive loss not built yet (issue 6)")
    return contrastive_loss_reference(q, d, temperature=temperature, gather_across_ranks=gather_across_ranks)
