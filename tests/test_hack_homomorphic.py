"""The homomorphic products (HACK.md §3–4) equal dequantize-then-multiply, for both layouts and random shapes."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hack_cli.methods.hack import homomorphic as hm
from hack_cli.methods.hack.quantizer import dequantize, quantize, quantize_int8

SHAPES = dict(rows=st.integers(1, 6), blocks=st.integers(1, 4), part=st.sampled_from([16, 32]),
              groups=st.sampled_from([1, 2]), bits=st.sampled_from([2, 4, 8]), seed=st.integers(0, 2**16))


def deq8(codes, mn, scale, group):
    return dequantize(codes.float(), mn, scale, group)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item() + 1e-5)


@settings(max_examples=25, deadline=None)
@given(**SHAPES)
def test_token_layout_scores(rows, blocks, part, groups, bits, seed):
    g = torch.Generator().manual_seed(seed)
    D, c, N = 32 * groups, 32, blocks * part
    q, k = torch.randn(2, rows, D, generator=g), torch.randn(2, N, D, generator=g) * 3
    kc, kmn, ks, ksum = quantize(k, bits, c, "nearest")  # per token, groups along D
    q8, qmn, qs = quantize_int8(q, c)
    ref = deq8(q8, qmn, qs, c) @ dequantize(kc, kmn, ks, c).transpose(-1, -2)  # (2, R, N)
    close(hm.scores_token_k(q, kc, kmn, ks, ksum, bits), ref)


@settings(max_examples=25, deadline=None)
@given(**SHAPES)
def test_token_layout_values_with_partial_block(rows, blocks, part, groups, bits, seed):
    g = torch.Generator().manual_seed(seed)
    D = 32 * groups
    v = torch.randn(2, blocks, part, D, generator=g)
    ok = torch.ones(2, blocks, part, dtype=torch.bool)
    ok[:, -1, part // 2:] = False  # last block partly filled
    vc, vmn, vs, _ = quantize(v.transpose(-1, -2), bits, part, "nearest")  # per channel over tokens
    vc = vc.transpose(-1, -2) * ok[..., None]  # (2, NB, Π, D), empty slots zero
    vmn, vs = vmn[..., 0], vs[..., 0]  # (2, NB, D)
    vsum = vc.long().sum(-2)
    p = torch.softmax(torch.randn(2, rows, blocks, part, generator=g), -1) * ok[:, None]
    p8, pmn, ps = quantize_int8(p, part)
    vhat = vmn[:, :, None].float() + vs[:, :, None].float() * vc.float()  # (2, NB, Π, D)
    ref = torch.einsum("brnt,bntd->brd", deq8(p8, pmn, ps, part) * ok[:, None], vhat)
    close(hm.values_token_v(p, ok, vc, vmn, vs, vsum, bits), ref)


@settings(max_examples=25, deadline=None)
@given(**SHAPES)
def test_channel_layout_scores(rows, blocks, part, groups, bits, seed):
    g = torch.Generator().manual_seed(seed)
    D, c = 32 * groups, 32
    q, k = torch.randn(2, rows, D, generator=g), torch.randn(2, blocks, part, D, generator=g) * 3
    kc, kmn, ks, _ = quantize(k.transpose(-1, -2), bits, part, "nearest")  # per channel over tokens
    kc, kmn, ks = kc.transpose(-1, -2), kmn[..., 0], ks[..., 0]  # (2,NB,Π,D), (2,NB,D) x2
    ksum = kc.reshape(2, blocks, part, groups, c).long().sum(-1)
    qt = q[:, None] * ks[:, :, None].float()  # q̃: (2, NB, R, D)
    q8, qmn, qs = quantize_int8(qt, c)
    z = 2 ** (bits - 1)  # codes enter centered; the center moves into the min
    ref = torch.einsum("bnrd,bntd->brnt", deq8(q8, qmn, qs, c), kc.float() - z) + \
        torch.einsum("brd,bnd->brn", q, kmn.float() + ks.float() * z)[..., None]
    close(hm.scores_channel_k(q, kc, kmn, ks, ksum, bits), ref)


@settings(max_examples=25, deadline=None)
@given(**SHAPES)
def test_channel_layout_values(rows, blocks, part, groups, bits, seed):
    g = torch.Generator().manual_seed(seed)
    D, c = 32 * groups, 32
    v = torch.randn(2, blocks, part, D, generator=g)
    vc, vmn, vs, _ = quantize(v, bits, c, "nearest")  # per token, groups along D
    vsum = vc.long().sum(-2)  # (2, NB, D)
    p = torch.softmax(torch.randn(2, rows, blocks, part, generator=g), -1)
    pt = (p[..., None] * vs.float()[:, None]).movedim(-1, -2)  # P̃: (2, R, NB, G, Π)
    p8, pmn, ps = quantize_int8(pt, part)
    z = 2 ** (bits - 1)  # codes enter centered; the center moves into the min
    ref = torch.einsum("brngt,bntgc->brgc", deq8(p8, pmn, ps, part),
                       vc.float().reshape(2, blocks, part, groups, c) - z)
    ref = ref.flatten(-2) + torch.einsum("brnt,bntg->brg", p, vmn.float() + vs.float() * z).repeat_interleave(c, -1)
    close(hm.values_channel_v(p, vc, vmn, vs, vsum, bits), ref)


def test_products_never_see_dequantized_kv():
    """Guard the design: the products take codes and parameters, and integer parts stay exact integers."""
    a = torch.randint(-128, 128, (4, 64), dtype=torch.int8)
    b = torch.randint(0, 4, (64, 8), dtype=torch.uint8)
    assert torch.equal(hm.int_matmul(a, b).long(), a.long() @ b.long())
