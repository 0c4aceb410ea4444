"""The fp16 baseline's ragged split-KV decode kernel equals the fp32 reference: ragged lengths (0, 1, a partial tile,
the full capacity), GQA ratios 1/3/4, head dims 64/128, one and several splits, bf16; garbage beyond a sequence's
length is never read.

CPU: Triton interpreter (conftest sets TRITON_INTERPRET=1). GPU: `TRITON_INTERPRET=0 pytest -m gpu tests/test_kernels_*`.
"""
import pytest
import torch

from hack_kernels.common import interpreting
from hack_kernels.fp16_decode import fp16_decode, fp16_decode_reference

DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or
                                                                          interpreting(), reason="needs CUDA")])]
SCALING = 0.125
LENGTHS = (0, 1, 45, 160)  # inactive slot, one key, a partial tile (block_n 32), the full capacity


def make(device, lengths=LENGTHS, cap=160, heads=2, ratio=2, D=64, dtype=torch.float16, seed=0):
    """k, v (B, H, cap, D) with random data beyond each length too, lengths (B,) int32, q (B, Hq, D)."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    k = torch.randn(B, heads, cap, D, generator=g)
    k += torch.randn(1, heads, 1, D, generator=g)  # per-channel offsets
    v = torch.randn(B, heads, cap, D, generator=g)
    q = torch.randn(B, heads * ratio, D, generator=g)
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    return k.to(device, dtype), v.to(device, dtype), lens, q.to(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ratio,D", [(1, 64), (3, 64), (4, 128)])
@pytest.mark.parametrize("splits", [1, 3])
def test_matches_reference(device, ratio, D, splits):
    k, v, lens, q = make(device, ratio=ratio, D=D)
    out = fp16_decode(k, v, lens, q, SCALING, splits=splits, block_n=32)
    ref = fp16_decode_reference(k, v, lens, q, SCALING)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # length 0: output 0
    assert (out.float() - ref).abs().max().item() < 2e-3


@pytest.mark.parametrize("device", DEVICES)
def test_bf16(device):
    k, v, lens, q = make(device, ratio=4, dtype=torch.bfloat16)
    out = fp16_decode(k, v, lens, q, SCALING, splits=3, block_n=32)
    ref = fp16_decode_reference(k, v, lens, q, SCALING)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max().item() < 2e-2  # bf16 output (8 bits) and, on the GPU, bf16 P


@pytest.mark.parametrize("device", DEVICES)
def test_capacity_and_default_splits(device):
    """A capacity below N (the launch covers only [0, capacity)) and the planned number of splits."""
    k, v, lens, q = make(device, lengths=(100, 7), cap=192, ratio=3)
    out = fp16_decode(k, v, lens, q, SCALING, capacity=100)
    assert (out.float() - fp16_decode_reference(k, v, lens, q, SCALING)).abs().max().item() < 2e-3


@pytest.mark.parametrize("device", DEVICES)
def test_ignores_beyond_length(device):
    """NaN and huge values beyond each sequence's length change nothing (the keys are neither loaded nor weighted)."""
    k, v, lens, q = make(device, ratio=4)
    clean = fp16_decode(k, v, lens, q, SCALING, splits=3, block_n=32)
    for b, n in enumerate(lens.tolist()):
        k[b, 0, n:], v[b, 0, n:] = float("nan"), float("nan")
        k[b, 1, n:], v[b, 1, n:] = 6e4, -6e4
    dirty = fp16_decode(k, v, lens, q, SCALING, splits=3, block_n=32)
    assert torch.equal(dirty, clean)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or interpreting(), reason="needs CUDA")
def test_cuda_graph_replay():
    """Captured once, replayed after the lengths change in place: the launch never reads them on the host."""
    k, v, lens, q = make("cuda", ratio=4, dtype=torch.bfloat16)
    fp16_decode(k, v, lens, q, SCALING)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp16_decode(k, v, lens, q, SCALING)
    for lengths in ((160, 0, 1, 45), (3, 64, 159, 0)):
        lens.copy_(torch.tensor(lengths, dtype=torch.int32))
        graph.replay()
        assert (out.float() - fp16_decode_reference(k, v, lens, q, SCALING)).abs().max().item() < 2e-2
