"""FP8 KV: e4m3 rounding bound, per-head amax scales fixed by the prompt, byte accounting, independence, wire."""
import torch
from kv_data import attention_fp32, realistic_kv

from hack_cli.hf import make_method

H, D, HQ = 2, 64, 6
SCALE = D ** -0.5


def store(batch=1):
    return make_method("fp8").new_layer(0, 1, batch, H, D, "cpu", torch.float32)


def test_e4m3_rounding_bound_and_per_head_scale():
    """scale = amax/448 per head (K and V apart); |x̂ - x| <= 2^-4 |x| (3 mantissa bits) or half the smallest
    subnormal step (2^-10 · scale) near zero."""
    _, k, v = realistic_kv(1, H, 200, D, HQ)
    s = store()
    s.append(k, v)
    kh, vh = s.materialize()
    for x, orig, got in (("k", k, kh), ("v", v, vh)):
        x16 = orig[0].half().float()
        torch.testing.assert_close(s.scale[x][0], x16.abs().amax((-2, -1)) / 448, rtol=0, atol=0)
        err = (got[0].float() - x16).abs()
        bound = x16.abs() * 2**-4 + s.scale[x][0][:, None, None] * 2**-10
        assert (err <= bound * 1.001 + got[0].float().abs() * 2**-11).all()  # plus materialize's fp16 rounding


def test_decode_tokens_keep_the_prompt_scale_and_saturate():
    _, k, v = realistic_kv(1, H, 50, D, HQ, seed=1)
    s = store()
    s.append(k[:, :, :49], v[:, :, :49])
    scale = s.scale["k"].clone()
    big = k[:, :, 49:] * 0 + 1e4  # far beyond the prompt's range
    s.append(big, v[:, :, 49:])
    assert torch.equal(s.scale["k"], scale)
    kh, _ = s.materialize()
    torch.testing.assert_close(kh[0, :, 49].float(), (448 * scale[0])[:, None].expand(H, D).half().float())


def test_attention_close_to_fp32():
    q, k, v = realistic_kv(1, H, 300, D, HQ, seed=2)
    s = store()
    s.append(k, v)
    ref = attention_fp32(q[0], k[0], v[0], SCALE)
    kh, vh = s.materialize()
    out = s.attend(q, SCALE)[0]
    torch.testing.assert_close(out, attention_fp32(q[0], kh[0].float(), vh[0].float(), SCALE), rtol=1e-4, atol=1e-4)
    assert ((out - ref).norm() / ref.norm()) < 0.12  # peaked attention over 8x outlier key channels


def test_bytes_by_hand_and_wire():
    q, k, v = realistic_kv(2, H, 120, D, HQ, seed=3)
    valid = torch.ones(2, 120, dtype=torch.bool)
    valid[0, :20] = False
    s = store(batch=2)
    s.append(k, v, valid)
    got = s.stored_bytes()
    assert got.codes == 2 * H * (100 + 120) * D and got.meta == 2 * (2 * H * 4) and got.total == got.codes + got.meta
    r = store(batch=2)
    for b in range(2):
        wire = s.export_seq(b)
        assert sum(t.numel() * t.element_size() for t in wire.values()) == s.seq_bytes(b).total
        r.import_seq(b, wire)
    for x in (s, r):  # a decode step on both sides
        x.append(k[:, :, -1:], v[:, :, -1:])
    torch.testing.assert_close(r.attend(q, SCALE), s.attend(q, SCALE))


def test_sequences_are_independent():
    _, k, v = realistic_kv(2, H, 90, D, HQ, seed=4)
    a, b = store(batch=2), store(batch=2)
    a.append(k, v)
    k2 = k.clone()
    k2[1] *= 7
    b.append(k2, v)
    for name, t in a.export_seq(0).items():
        assert torch.equal(b.export_seq(0)[name], t), name
    assert not torch.equal(a.scale["k"][1], b.scale["k"][1])
