"""MoE experts (layers/moe.py): the graph-safe dense path equals the sparse path, both equal a
per-token loop written from the definition, and tp ranks hold exactly their slices."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.distributed import parallel_state
from pagedllm.layers.moe import MoEExperts, route_topk
from pagedllm.loader import initialize_dummy_weights

E, H, FFN, K = 6, 32, 48, 2  # experts, hidden, expert FFN width, top-k


def experts(seed: int = 0) -> MoEExperts:
    layer = MoEExperts(E, H, FFN)
    initialize_dummy_weights(layer, low=-0.2, high=0.2, seed=seed)
    return layer


def test_sparse_and_dense_paths_equal_the_definition():
    torch.manual_seed(0)
    layer = experts()
    x = torch.randn(11, H)
    weights, ids = route_topk(torch.randn(11, E), K, renormalize=True)
    assert torch.allclose(weights.sum(-1), torch.ones(11))
    expected = torch.zeros(11, H)
    for t in range(11):
        for j in range(K):
            gate, up = F.linear(x[t], layer.w13_weight[ids[t, j]]).chunk(2)
            expected[t] += weights[t, j] * F.linear(F.silu(gate) * up, layer.w2_weight[ids[t, j]])
    torch.testing.assert_close(layer._forward_sparse(x, weights, ids), expected)
    torch.testing.assert_close(layer._forward_dense(x, weights, ids), expected)


def test_route_topk_without_renormalizing_keeps_softmax_mass():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    weights, ids = route_topk(logits, 2, renormalize=False)
    probs = torch.softmax(logits, -1)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, probs[:, :2])


def test_each_rank_holds_its_slice_of_every_expert(monkeypatch):
    full = experts(seed=3)
    half = FFN // 2
    for rank in range(2):
        monkeypatch.setattr(parallel_state, "_TP_SIZE", 2)
        monkeypatch.setattr(parallel_state, "_TP_RANK", rank)
        shard = experts(seed=3)
        rows = slice(rank * half, (rank + 1) * half)
        gate, up = full.w13_weight[:, :FFN], full.w13_weight[:, FFN:]
        assert torch.equal(shard.w13_weight, torch.cat([gate[:, rows], up[:, rows]], dim=1))
        assert torch.equal(shard.w2_weight, full.w2_weight[:, :, rows])
