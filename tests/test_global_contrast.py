"""Mathematics of the global InfoNCE: a hand-computed value, and 2 ranks == 1 rank (loss and grads)."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import free_port
from mlip_ds.losses.global_contrast import global_contrastive_loss, info_nce


def test_info_nce_matches_hand_computation():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    scale = torch.tensor([2.0])
    # logits image->text: [[1.2, 0], [1.6, 2]]; text->image is its transpose.
    li = [[1.2, 0.0], [1.6, 2.0]]
    def ce(row, target):
        return -row[target] + math.log(sum(math.exp(v) for v in row))
    i2t = (ce(li[0], 0) + ce(li[1], 1)) / 2
    t2i = (ce([li[0][0], li[1][0]], 0) + ce([li[0][1], li[1][1]], 1)) / 2
    expected = 0.5 * (i2t + t2i)
    assert abs(info_nce(img, txt, scale).item() - expected) < 1e-6


def test_info_nce_is_low_for_aligned_and_high_for_shuffled():
    torch.manual_seed(0)
    x = F.normalize(torch.randn(16, 8), dim=-1)
    scale = torch.tensor([1 / 0.07])
    aligned = info_nce(x, x, scale)
    shuffled = info_nce(x, x[torch.randperm(16)], scale)
    assert aligned < 0.5 < shuffled


def _features(seed=0, n=8, d_in=6, d=4):
    g = torch.Generator().manual_seed(seed)
    xi, xt = torch.randn(n, d_in, generator=g), torch.randn(n, d_in, generator=g)
    wi, wt = torch.randn(d_in, d, generator=g), torch.randn(d_in, d, generator=g)
    return xi, xt, wi, wt


def _loss_and_grads(xi, xt, wi, wt, scale):
    wi, wt, scale = wi.clone().requires_grad_(), wt.clone().requires_grad_(), scale.clone().requires_grad_()
    img, txt = F.normalize(xi @ wi, dim=-1), F.normalize(xt @ wt, dim=-1)
    loss = global_contrastive_loss(img, txt, scale)
    loss.backward()
    return loss.detach(), wi.grad, wt.grad, scale.grad


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    xi, xt, wi, wt = _features()
    n = xi.shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    loss, gi, gt, gs = _loss_and_grads(xi[sl], xt[sl], wi, wt, torch.tensor([3.0]))
    # What DeepSpeed/DDP do: average loss for logging, average gradients.
    for t in (loss, gi, gt, gs):
        dist.all_reduce(t)
        t /= world
    if rank == 0:
        out.put([t.numpy() for t in (loss, gi, gt, gs)])
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_rank():
    xi, xt, wi, wt = _features()
    ref = _loss_and_grads(xi, xt, wi, wt, torch.tensor([3.0]))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    got = out.get(timeout=60)
    for r, g in zip(ref, got):
        assert torch.allclose(r, torch.from_numpy(g), rtol=1e-5, atol=1e-6), (r, g)
