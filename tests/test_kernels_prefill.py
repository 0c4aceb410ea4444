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


def exact_causal(layer, q, scaling, pos0):
    """fp32 causal attention of q (B, Hq, Tq, D) (sequence b's queries at positions pos0[b] + i) over the store's
    dequantized K̂, V̂: what the float-operand kernel computes up to rounding (no 8-bit Q̃/P̃)."""
    out = []
    for b in range(layer.batch):
        kh, vh = layer.reconstruct(b)  # (H, n, D)
        Tq = q.shape[2]
        qb = q[b].float().reshape(layer.kv_heads, -1, Tq, layer.head_dim)  # (H, R, Tq, D)
        s = qb @ kh[:, None].transpose(-1, -2) * scaling  # (H, R, Tq, n)
        late = torch.arange(kh.shape[1]) > int(pos0[b]) + torch.arange(Tq)[:, None]  # (Tq, n)
        out.append((torch.softmax(s.masked_fill(late.to(s.device), float("-inf")), -1) @ vh[:, None]).flatten(0, 1))
    return torch.stack(out)  # (B, Hq, Tq, D)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,partition,lengths,tq,rows", [
    (2, 32, (4 + 3 * 32 + 7, 4 + 32 + 20), 24, 32),  # ragged; both open blocks filled; a 16-token tile
    (2, 32, (4 + 2 * 32, 4 + 2 * 32 + 31), 66, 16),  # an empty open block; queries from inside the sinks; 9 tiles
    (4, 64, (4 + 2 * 64 + 9, 3), 3, 16),  # 4-bit, Π = D (one channel group); a sequence of sinks alone
])
def test_fast_prefill(device, bits, partition, lengths, tq, rows):
    """The large-tile kernel (fp16 operands): a left-padded ragged batch, GQA R = 2, sinks and open blocks, diagonal
    blocks masked per row, tiles of 16 or 32 rows: as close to exact attention over K̂/V̂ as the decode kernel's
    float operands, and within the int8 reference's own error of it."""
    g = torch.Generator().manual_seed(2)
    B, H, Hq, D, T = len(lengths), 2, 4, 64, max(lengths)
    layer = HackLayerKV(Config(bits=bits, partition=partition, quantized_prefill=True, backend="reference"), 0, B, H,
                        D, device, torch.float16)
    k = torch.randn(B, H, T, D, generator=g)
    k[..., ::16] *= 8
    k += torch.randn(1, H, 1, D, generator=g)
    v = torch.randn(B, H, T, D, generator=g)
    q = torch.randn(B, Hq, T, D, generator=g)
    valid = torch.arange(T)[None] >= T - torch.tensor(lengths)[:, None]  # left padding
    layer.append(k.to(device), v.to(device), valid)
    q = q[:, :, T - tq:].to(device)
    pos0 = torch.tensor(lengths, dtype=torch.int32) - tq
    out = hack_prefill(from_layer(layer), q, 0.125, pos0.to(device), operand="fp16", block_rows=rows)
    exact = exact_causal(layer, q, 0.125, pos0)
    ref = layer.attend(q, 0.125)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rel(out, exact) < 2e-3 and rel(out, ref) < rel(ref, exact) + 2e-3
