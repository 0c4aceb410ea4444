"""HACK's homomorphic causal prefill kernel equals HackLayerKV.attend with quantized prefill (channel layout): a full
prefill and a chunk appended after earlier tokens, ragged-free batch of 2, sinks and an open block."""
import pytest
import torch

from hack_cli.methods.hack import Config
from hack_cli.methods.hack.store import HackLayerKV
from hack_kernels.common import interpreting
from hack_kernels.decode import from_layer
from hack_kernels.prefill import hack_prefill

DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or
                                                                          interpreting(), reason="needs CUDA")])]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [None, 24])
def test_prefill_matches_reference(device, chunk):
    g = torch.Generator().manual_seed(1)
    B, H, Hq, D, T = 2, 2, 4, 64, 4 + 2 * 32 + 7
    layer = HackLayerKV(Config(bits=2, partition=32, quantized_prefill=True, backend="reference"), 0, B, H, D,
                        device, torch.float16)
    k = torch.randn(B, H, T, D, generator=g)
    k[..., ::16] *= 8
    v = torch.randn(B, H, T, D, generator=g)
    q = torch.randn(B, Hq, T, D, generator=g).to(device)
    t0 = 0 if chunk is None else T - chunk
    if t0:
        layer.append(k[:, :, :t0].to(device), v[:, :, :t0].to(device))
    layer.append(k[:, :, t0:].to(device), v[:, :, t0:].to(device))
    ref = layer.attend(q[:, :, t0:], 0.125)
    pos0 = torch.full((B,), t0, dtype=torch.int32, device=device)
    out = hack_prefill(from_layer(layer), q[:, :, t0:], 0.125, pos0)
    # The kernel quantizes the online softmax's unnormalized P (the reference: normalized P); 8-bit codes can flip
    # at a rounding boundary, which moved one row by 5e-3 here.
    assert out.shape == ref.shape and rel(out, ref) < 2e-3
