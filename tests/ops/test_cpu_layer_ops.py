"""The C++ CPU layer ops (ops/cpu_layer_ops.py) against their twins, the layers' PyTorch code
(layers/norm.py, activation.py, rotary.py, run with the fused ops off), their batch invariance,
and the door (ops/fused.py) that sends CPU layers to them.

Skipped, with the build error as the reason, only where the library cannot be built.
"""

from __future__ import annotations

import pytest
import torch

from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.ops import cpu_layer_ops, fused

if not cpu_layer_ops.load():
    pytest.skip(f"CPU layer ops not built: {cpu_layer_ops.load_error()}",
                allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16]
HEADS = [(9, 3, 64), (4, 2, 128), (2, 1, 6)]  # (Hq, Hkv, D): SmolLM2-135M's first


@pytest.fixture(autouse=True)
def _fused_on():
    before = fused.is_enabled()  # PAGEDLLM_FUSED_OPS=0 holds for the other tests
    fused.set_enabled(True)
    yield
    fused.set_enabled(before)


def twin(module, *args):
    """The layer's own PyTorch code on the same tensors."""
    fused.set_enabled(False)
    try:
        return module(*args)
    finally:
        fused.set_enabled(True)


def assert_close(out, ref, ulps=1):
    """Within `ulps` roundings of the reference: fp32 ~ 1e-7 relative, bf16 ~ 4e-3."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    eps = torch.finfo(ref.dtype).eps
    err = (out.double() - ref.double()).abs()
    bound = ulps * eps * ref.double().abs().clamp_min(1e-30)
    assert torch.isfinite(out).all()
    assert (err <= bound).all(), f"max error {err.max().item():.3g}"


def spy(monkeypatch, name):
    calls = []
    real = getattr(cpu_layer_ops, name)
    monkeypatch.setattr(cpu_layer_ops, name, lambda *a: calls.append(1) or real(*a))
    return calls


def qkv_views(num_tokens, hq, hkv, d, dtype, gen):
    """q and k as the attention layers see them: strided views into the qkv output."""
    qkv = (torch.randn(num_tokens, (hq + 2 * hkv) * d, generator=gen) * 2).to(dtype)
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    return q.view(num_tokens, hq, d), k.view(num_tokens, hkv, d)


def rotary(head_dim, rotary_dim=None):
    return RotaryEmbedding(head_dim, 4096, 10000.0, rotary_dim=rotary_dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 576), (5, 576), (37, 1000), (3, 17)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, num_tokens, hidden, with_residual):
    gen = torch.Generator().manual_seed(num_tokens * hidden)
    norm = RMSNorm(hidden, 1e-5).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5, generator=gen)
    x = (torch.randn(num_tokens, hidden, generator=gen) * 3).to(dtype)
    args = (x, torch.randn(num_tokens, hidden, generator=gen).to(dtype)) if with_residual else (x,)
    out, ref = norm(*args), twin(norm, *args)
    if with_residual:
        assert torch.equal(out[1], ref[1])  # the sum: one rounding, the same one
        out, ref = out[0], ref[0]
    # fp32: the sum of squares in another order (a few ulps of rstd); bf16: one rounding apart
    assert_close(out, ref, ulps=8 if dtype == torch.float32 else 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_of_heads(dtype):
    """Qwen3's q/k norm: the last dim of a strided [T, H, D] view, normalized in place."""
    gen = torch.Generator().manual_seed(3)
    norm = RMSNorm(64, 1e-6).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5, generator=gen)
    q, k = qkv_views(7, 9, 3, 64, dtype, gen)
    for x in (q, k, q.transpose(0, 1)):
        assert_close(norm(x), twin(norm, x), ulps=8 if dtype == torch.float32 else 1)


def test_rms_norm_promoted_weight():
    """An fp32 weight on bf16 activations: the twin's product is fp32."""
    gen = torch.Generator().manual_seed(4)
    norm = RMSNorm(576)
    norm.weight.data.uniform_(0.5, 1.5, generator=gen)
    x = torch.randn(3, 576, generator=gen).to(torch.bfloat16)
    out, ref = norm(x), twin(norm, x)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,inter", [(1, 1536), (6, 1536), (40, 300), (2, 5)])
def test_silu_and_mul(dtype, num_tokens, inter):
    gen = torch.Generator().manual_seed(num_tokens + inter)
    x = (torch.randn(num_tokens, 2 * inter, generator=gen) * 4).to(dtype)
    x[0, :4] = torch.tensor([0.0, -80.0, 80.0, -30.0])  # exp's far ends, exactly
    act = SiluAndMul()
    out = act(x)
    # PyTorch's silu uses a faster exp (a few % of fp32 results one ulp off the correctly
    # rounded ones); the C++ op's exp is correctly rounded (but for ~1e-4 near-ties): exactly
    # the twin's formula, with that exp.
    gate, up = x.float().chunk(2, dim=-1)
    exp = torch.exp(-gate.double()).float()
    assert torch.equal(out, (gate / (1 + exp)).to(dtype) * up.to(dtype))
    assert_close(out, twin(act, x), ulps=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 5, 33])
@pytest.mark.parametrize("hq,hkv,d", HEADS)
def test_rotary(dtype, num_tokens, hq, hkv, d):
    gen = torch.Generator().manual_seed(num_tokens * d)
    rope = rotary(d)
    q, k = qkv_views(num_tokens, hq, hkv, d, dtype, gen)
    positions = torch.randperm(4096, generator=gen)[:num_tokens]  # not sorted
    out, ref = rope(positions, q, k), twin(rope, positions, q, k)
    for o, r in zip(out, ref):
        assert o.is_contiguous() and torch.equal(o, r)  # the twin's roundings: its bits


@pytest.mark.parametrize("dtype", DTYPES)
def test_partial_rotary(dtype):
    """rotary_dim < head_dim (Phi-3): the rotated part is a strided slice of each head."""
    gen = torch.Generator().manual_seed(5)
    rope = rotary(64, rotary_dim=48)
    q, k = qkv_views(6, 4, 2, 64, dtype, gen)
    positions = torch.tensor([7, 3, 4000, 0, 12, 12])
    for o, r in zip(rope(positions, q, k), twin(rope, positions, q, k)):
        assert torch.equal(o, r)


def test_rotary_rejects_bad_positions():
    q, k = qkv_views(2, 2, 1, 8, torch.float32, torch.Generator().manual_seed(0))
    rope = rotary(8)
    with pytest.raises(IndexError):
        cpu_layer_ops.rotary_embedding(torch.tensor([0, 4096]), q, k, rope.cos_cache,
                                       rope.sin_cache)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_batch_invariance(dtype, threads):
    """A row alone and the same row in a batch of 150 (enough rows that every op splits them
    over 2 threads), on 1 or 2 threads: the same bits."""
    gen = torch.Generator().manual_seed(6)
    norm = RMSNorm(576, 1e-5).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5, generator=gen)
    rope, act = rotary(64), SiluAndMul()
    x, res = (torch.randn(150, 576, generator=gen).to(dtype) for _ in range(2))
    gate_up = torch.randn(150, 2 * 1536, generator=gen).to(dtype)
    q, k = qkv_views(150, 9, 3, 64, dtype, gen)
    positions = torch.randperm(4096, generator=gen)[:150]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batch = (norm(x), *norm(x, res), act(gate_up), *rope(positions, q, k))
        for i in (0, 77, 149):
            alone = (norm(x[i:i + 1]), *norm(x[i:i + 1], res[i:i + 1]), act(gate_up[i:i + 1]),
                     *rope(positions[i:i + 1], q[i:i + 1], k[i:i + 1]))
            for a, b in zip(alone, batch):
                assert torch.equal(a[0], b[i])
    finally:
        torch.set_num_threads(before)


def test_door(monkeypatch):
    """Fused on: CPU layers call the C++ ops; set_enabled(False): their PyTorch code."""
    calls = {name: spy(monkeypatch, name) for name in ("rms_norm", "silu_and_mul",
                                                        "rotary_embedding")}
    norm, act, rope = RMSNorm(64), SiluAndMul(), rotary(64)
    x = torch.randn(3, 64)
    q, k = qkv_views(3, 2, 1, 64, torch.float32, torch.Generator().manual_seed(0))
    positions = torch.tensor([0, 1, 2])

    def run_all():
        norm(x), norm(x, x), act(x), rope(positions, q, k)

    run_all()
    assert [len(c) for c in calls.values()] == [2, 1, 1]
    fused.set_enabled(False)
    run_all()
    assert [len(c) for c in calls.values()] == [2, 1, 1]
    fused.set_enabled(True)
    half = torch.randn(3, 64, dtype=torch.float16)  # not a dtype the C++ ops take
    norm.half()(half)
    assert len(calls["rms_norm"]) == 2
