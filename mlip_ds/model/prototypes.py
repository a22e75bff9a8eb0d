"""Category prototypes and Sinkhorn-Knopp assignments (MLIP sec. 3, SwAV/MGCA).

K learnable, L2-normalised prototypes score each embedding; Sinkhorn-Knopp turns the scores of the
whole (global) batch into soft assignments that use every prototype equally (no collapse). When
torch.distributed is initialised, the sums are all-reduced as in SwAV's ``distributed_sinkhorn``, so
each rank gets the rows of the assignment that one rank holding the global batch would compute.

Knowledge guidance (our choice): a co-occurrence table between knowledge categories and prototypes,
accumulated from the assignments, gives a prior that the Sinkhorn target can be mixed with, so that
samples of the same knowledge category are pulled to the same prototypes.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if _dist():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


class Prototypes(nn.Module):
    """``num_prototypes`` x ``dim`` prototype vectors, normalised in the forward (cosine scores).

    ``frozen = True`` (MGCA freezes them for the first epoch) detaches the weights in the forward, so
    they get no gradient while the parameter set stays the same (what DeepSpeed needs); exclude them
    from weight decay or keep the optimiser from touching them while frozen.
    """

    def __init__(self, dim: int, num_prototypes: int = 500):
        super().__init__()
        self.weight = nn.Parameter(F.normalize(torch.randn(num_prototypes, dim), dim=-1))
        self.frozen = False

    def freeze(self, frozen: bool = True) -> "Prototypes":
        self.frozen = frozen
        # Also off autograd's books: under torch.compile the detached weight still gets a (None)
        # gradient delivered, and DeepSpeed's ZeRO-2 gradient hook fails on it.
        self.weight.requires_grad_(not frozen)
        return self

    @torch.no_grad()
    def normalize_(self) -> None:
        """Renormalise the stored weights (SwAV does it after each optimiser step)."""
        self.weight.copy_(F.normalize(self.weight, dim=-1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine scores (B, K), float32, of the (B, dim) features against the prototypes.

        Always in fp32, outside autocast: Sinkhorn divides the scores by eps = 0.05, so bf16's
        rounding (about 0.4% of a score near 1) would become about 4% noise in the codes."""
        w = self.weight.detach() if self.frozen else self.weight
        dev = features.device.type  # (autocast knows no 'meta' device: the meta-device step test)
        with torch.autocast(dev, enabled=False) if dev in ("cpu", "cuda") else contextlib.nullcontext():
            return F.normalize(features.float(), dim=-1) @ F.normalize(w.float(), dim=-1).T


class FeatureQueue(nn.Module):
    """The last ``size`` image and text embeddings of this rank (SwAV's queue), first in, first out.

    Why: Sinkhorn spreads the global batch evenly over the K prototypes; with fewer samples than
    prototypes each sample's code must spread over several, and the targets say little. The queued
    embeddings (scored with the current prototypes, no gradient) join the Sinkhorn batch; only the
    batch's own codes are used. The buffers are not saved: after a resume the queue fills again.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("image", torch.zeros(size, dim), persistent=False)
        self.register_buffer("text", torch.zeros(size, dim), persistent=False)
        self.register_buffer("filled", torch.zeros((), dtype=torch.long), persistent=False)
        self._full = False  # once full it stays full: no more reading ``filled`` on the host

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled part, newest first: (n, dim) image and text embeddings."""
        if not self._full:
            n = int(self.filled)
            self._full = n == self.image.shape[0]
        else:
            n = self.image.shape[0]
        return self.image[:n], self.text[:n]

    @torch.no_grad()
    def push(self, image: torch.Tensor, text: torch.Tensor) -> None:
        """Put the batch's (B, dim) embeddings in front; a batch with a non-finite value is not kept
        (a skipped step must leave no trace)."""
        b = min(image.shape[0], self.image.shape[0])
        ok = torch.isfinite(image).all() & torch.isfinite(text).all()
        for buf, new in ((self.image, image), (self.text, text)):
            shifted = torch.cat([new[:b].detach().to(buf.dtype), buf[:-b]]) if b < buf.shape[0] else \
                new[:b].detach().to(buf.dtype)
            buf.copy_(torch.where(ok, shifted, buf))
        self.filled.copy_(torch.where(ok, (self.filled + b).clamp(max=self.image.shape[0]), self.filled))


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Soft assignments Q (B_local, K) from prototype scores, SwAV's (distributed) Sinkhorn-Knopp.

    Normalisation, over the global batch of B samples: every row of Q sums to 1 (each sample is one
    unit of mass, exact), and every prototype column sums to B/K (equal use, reached approximately
    after ``iters`` iterations). With torch.distributed initialised, the global batch is the union
    of all ranks' rows and the sums are all-reduced.
    """
    s = scores.detach().float() / eps
    s_max = _all_reduce(s.max().reshape(1).clone(), dist.ReduceOp.MAX)
    q = torch.exp(s - s_max).T  # (K, B): exponent shifted by the global max, which cancels below
    k = q.shape[0]
    b = torch.full((), float(q.shape[1]), device=q.device)  # filled on the device: no host copy
    b = _all_reduce(b)  # global batch size
    q /= _all_reduce(q.sum().reshape(1))
    for _ in range(iters):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))  # each prototype: total mass 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample: mass 1/B (column sums are local)
        q /= b
    q *= b
    return q.T


class CooccurrencePrior(nn.Module):
    """EMA table (C categories x K prototypes) of how often each knowledge category is assigned to each
    prototype; ``prior(cats)`` turns it into a per-sample distribution over prototypes.

    ``update`` all-reduces the batch counts so every rank keeps the same table.
    """

    def __init__(self, num_categories: int, num_prototypes: int, decay: float = 0.99):
        super().__init__()
        self.decay = decay
        self.register_buffer("counts", torch.zeros(num_categories, num_prototypes))

    @torch.no_grad()
    def update(self, cats: torch.Tensor, assignments: torch.Tensor) -> None:
        """``cats`` (B, C) multi-hot, ``assignments`` (B, K) Sinkhorn codes of the local rows."""
        batch = _all_reduce(cats.float().T @ assignments.float())
        self.counts.mul_(self.decay).add_(batch, alpha=1.0 - self.decay)

    @torch.no_grad()
    def prior(self, cats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K) mean of the sample's categories' prototype distributions, and (B,) bool: has a prior
        (at least one category with counts). Rows without a prior are uniform."""
        per_cat = self.counts / self.counts.sum(dim=1, keepdim=True).clamp(min=1e-12)
        c = cats.float()
        mass = c @ self.counts.sum(dim=1)
        p = c @ per_cat
        has = mass > 0
        p = torch.where(has.unsqueeze(1), p / p.sum(dim=1, keepdim=True).clamp(min=1e-12),
                        torch.full_like(p, 1.0 / p.shape[1]))
        return p, has
