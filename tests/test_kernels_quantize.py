"""The one-pass quantize kernel is bit-exact with hack's quantizer (nearest rounding) and, with stochastic rounding,
rounds every value to one of its two neighbouring levels, reproducibly per seed and without bias."""
import pytest
import torch

from hack_cli.methods.hack.quantizer import dequantize, pack, quantize, unpack
from hack_kernels.common import interpreting
from hack_kernels.quantize import quantize_blocks

DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or
                                                                          interpreting(), reason="needs CUDA")])]


def blocks(device, P, D, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, P, D, generator=g) * torch.rand(1, 1, D, generator=g) * 4
    x[0, :, 3] = 1.5  # a constant channel: zero scale
    x[1, 2, :] = -0.25  # a constant token
    return x.half().to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,P,D", [(2, 32, 64), (4, 32, 64), (2, 64, 32), (2, 16, 64)])
@pytest.mark.parametrize("meta", [torch.float16, torch.bfloat16])
def test_nearest_bit_exact(device, bits, P, D, meta):
    x = blocks(device, P, D)
    c = min(P, D)
    # per channel over the block's tokens (channel-layout K), with K's per-token group sums
    out = quantize_blocks(x, bits, c, per_channel=True, token_sums=True, meta_dtype=meta)
    codes, mn, scale, _ = quantize(x.float().transpose(-1, -2), bits, P, "nearest", meta)  # (n, D, P)
    codes = codes.transpose(-1, -2)  # (n, P, D)
    assert torch.equal(out["codes"], pack(codes, bits))
    assert torch.equal(out["mn"], mn[..., 0]) and torch.equal(out["scale"], scale[..., 0])
    assert torch.equal(out["sums"].long(), codes.long().reshape(*codes.shape[:-1], D // c, c).sum(-1))
    # per token in channel groups (channel-layout V), with V's per-channel sums over the block
    out = quantize_blocks(x, bits, c, per_channel=False, token_sums=False, meta_dtype=meta)
    codes, mn, scale, _ = quantize(x.float(), bits, c, "nearest", meta)
    assert torch.equal(out["codes"], pack(codes, bits))
    assert torch.equal(out["mn"], mn) and torch.equal(out["scale"], scale)
    assert torch.equal(out["sums"].long(), codes.long().sum(1))
    # the same codes packed along each block's tokens (HACK's stored V): (n, D, P*b/8)
    along = quantize_blocks(x, bits, c, per_channel=False, token_sums=False, meta_dtype=meta, along_tokens=True)
    assert along["codes"].shape == (x.shape[0], D, P * bits // 8)
    assert torch.equal(along["codes"], pack(codes.transpose(-1, -2), bits))
    assert all(torch.equal(along[name], out[name]) for name in ("mn", "scale", "sums"))


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic(device):
    bits, P, D = 2, 32, 64
    x = blocks(device, P, D, n=2)
    _, mn, scale, _ = quantize(x.float(), bits, D // 2, "nearest")
    t = (x.float() - mn.float().repeat_interleave(D // 2, -1)) / torch.where(scale == 0, 1, scale).float() \
        .repeat_interleave(D // 2, -1)
    draws = [unpack(quantize_blocks(x, bits, D // 2, False, False, "stochastic", seed)["codes"], bits).float()
             for seed in range(24)]
    for c in draws:
        assert ((c == t.floor().clamp(0, 3)) | (c == t.ceil().clamp(0, 3))).all()
    assert torch.equal(draws[0], unpack(quantize_blocks(x, bits, D // 2, False, False, "stochastic", 0)["codes"], 2))
    assert not torch.equal(draws[0], draws[1])
    err = torch.stack(draws).mean(0) - t.clamp(0, 3)  # per element: mean of 24 draws minus its expectation
    assert err.abs().mean() < 0.1  # unbiased per element: ~0.07 expected, sqrt(p(1-p)/24); nearest would give ~0.25
    assert err.mean().abs() < 0.01
