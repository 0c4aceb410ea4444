"""KIVI's fused-dequant decode kernel equals KiviLayerKV.attend (dequantize + SDPA), and the dequant kernel equals
kivi.dequantize_kv exactly: ragged batch, residual, 2 and 4 bits."""
import pytest
import torch

from hack_cli.methods.kivi import Config, KiviLayerKV, dequantize_kv
from hack_kernels.common import interpreting
from hack_kernels.dequant import dequant_kivi
from hack_kernels.kivi_decode import kivi_decode

DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")),
           pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or
                                                                          interpreting(), reason="needs CUDA")])]


def make_kivi(device, bits, lengths=(170, 60), heads=2, q_heads=4, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = KiviLayerKV(Config(bits=bits, partition=32, residual=32), 0, len(lengths), heads, D, device,
                        torch.float16)
    T = max(lengths)
    k = torch.randn(len(lengths), heads, T, D, generator=g)
    k[..., ::16] *= 8
    v = torch.randn(len(lengths), heads, T, D, generator=g)
    layer.append(k.to(device), v.to(device), torch.arange(T)[None] < torch.tensor(lengths)[:, None])
    layer.append(torch.randn(len(lengths), heads, 1, D, generator=g).to(device),
                 torch.randn(len(lengths), heads, 1, D, generator=g).to(device))
    return layer, torch.randn(len(lengths), q_heads, 1, D, generator=g).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 4])
def test_fused_decode_matches_reference(device, bits):
    layer, q = make_kivi(device, bits)
    ref = layer.attend(q.half(), 0.125)[:, :, 0].float()
    i32 = lambda x: x.to(device=device, dtype=torch.int32)
    out = kivi_decode(layer.t, layer.res["k"], layer.res["v"], i32(layer.n_q), i32(layer.n_res), q[:, :, 0], 0.125,
                      bits, 32)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-3  # fp16 rounding of K̂/V̂ and P


@pytest.mark.parametrize("device", DEVICES)
def test_dequant_exact(device):
    layer, _ = make_kivi(device, 2)
    n = int(layer.n_q.max())
    k, v = dequant_kivi(layer.t, n, 2, 32, dtype=torch.float32)
    t = {nm: x[:, :, :n // 32 if nm in ("k_mn", "k_scale") else n] for nm, x in layer.t.items()}
    kr, vr = dequantize_kv(t["k_codes"], t["k_mn"], t["k_scale"], t["v_codes"], t["v_mn"], t["v_scale"], 2, 32, 32)
    assert torch.equal(k, kr) and torch.equal(v, vr)
