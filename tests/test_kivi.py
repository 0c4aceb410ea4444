"""KIVI: residual flush boundaries, quantization error bounds, byte accounting, per-sequence independence, wire."""
import pytest
import torch
from kv_data import attention_fp32, realistic_kv

from hack_cli.hf import make_method
from hack_cli.methods.hack.quantizer import unpack

H, D, HQ = 2, 64, 6
SCALE = D ** -0.5


def store(batch=1, **fields):
    return make_method("kivi", **fields).new_layer(0, 1, batch, H, D, "cpu", torch.float32)


def filled(k, v, prefill, **fields):
    s = store(batch=k.shape[0], **fields)
    s.append(k[:, :, :prefill], v[:, :, :prefill])
    for t in range(prefill, k.shape[2]):
        s.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    return s


@pytest.mark.parametrize("R,G", [(128, 32), (0, 16), (40, 32)])
def test_residual_flushes_whole_key_groups(R, G):
    """After every append: n_q is a multiple of G, the residual holds the last N - n_q tokens with
    R <= n_res <= R + G - 1 once N >= R, and the quantized count only ever grows by whole groups."""
    _, k, v = realistic_kv(1, H, 260, D, HQ)
    s = store(residual=R, partition=G)
    s.append(k[:, :, :37], v[:, :, :37])
    prev = int(s.n_q[0])
    for t in range(37, 260):
        s.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        n, nq, nr = t + 1, int(s.n_q[0]), int(s.n_res[0])
        assert nq % G == 0 and nq + nr == n and (nq - prev) in (0, G)
        assert (R <= nr <= R + G - 1) if n >= R else nr == n
        prev = nq
        torch.testing.assert_close(s.res["k"][0, :, :nr].float(), k[0, :, n - nr:n].half().float(), rtol=0, atol=0)


def test_token_by_token_equals_one_prefill():
    _, k, v = realistic_kv(1, H, 333, D, HQ, seed=1)
    one, steps = store(), filled(k, v, 1)
    one.append(k, v)
    for name, t in one.t.items():
        assert torch.equal(t[:, :, :steps.t[name].shape[2]], steps.t[name][:, :, :t.shape[2]]), name
    nr = int(one.n_res[0])
    assert torch.equal(one.n_q, steps.n_q) and nr == int(steps.n_res[0])
    for x in "kv":
        assert torch.equal(one.res[x][:, :, :nr], steps.res[x][:, :, :nr])


@pytest.mark.parametrize("bits", [2, 4])
def test_round_to_nearest_error_bound(bits):
    """Every quantized element is within half a step of its 16-bit value (keys: per channel per group of G
    tokens; values: per token per group of c channels)."""
    _, k, v = realistic_kv(1, H, 300, D, HQ, seed=2)
    s = store(bits=bits)
    s.append(k, v)
    nq, G = int(s.n_q[0]), 32
    kh, vh, _, _ = s.materialize()
    k16, v16 = k.half().float(), v.half().float()
    step_k = s.t["k_scale"][0, :, :nq // G].float().repeat_interleave(G, 1)  # (H, nq, D)
    step_v = s.t["v_scale"][0, :, :nq].float().repeat_interleave(32, -1)  # (H, nq, D)
    for got, want, step in ((kh, k16, step_k), (vh, v16, step_v)):
        got = got[0, :, :nq].float()  # materialize rounds to fp16: allow its half ulp on top of half a step
        assert ((got - want[0, :, :nq]).abs() <= step / 2 * 1.001 + got.abs() * 2**-11).all()
    codes = unpack(s.t["k_codes"][0, :, :nq], bits)
    assert codes.max() == 2**bits - 1 and codes.min() == 0  # the range is used end to end


def test_attention_error_shrinks_with_bits_and_matches_materialized():
    q, k, v = realistic_kv(1, H, 400, D, HQ, seed=3)
    ref = attention_fp32(q[0], k[0], v[0], SCALE)
    err = {}
    for bits in (2, 4, 8):
        s = filled(k, v, 390, bits=bits)
        out = s.attend(q, SCALE)[0]
        kh, vh, _, ok = s.materialize()
        torch.testing.assert_close(out, attention_fp32(q[0], kh[0][:, ok[0]], vh[0][:, ok[0]], SCALE),
                                   rtol=1e-4, atol=1e-4)
        err[bits] = ((out - ref).norm() / ref.norm()).item()
    assert err[8] < 0.01 < err[4] * 10 and err[4] * 2 < err[2] < 0.5, err


def test_bytes_by_hand():
    """H=2, D=64, G=32, R=128, 2-bit, N=300: n_q = (300-128)//32*32 = 160 quantized, 140 in the residual."""
    _, k, v = realistic_kv(1, H, 300, D, HQ, seed=4)
    s = store()
    s.append(k, v)
    got = s.stored_bytes()
    assert (int(s.n_q[0]), int(s.n_res[0])) == (160, 140)
    assert got.codes == 2 * H * 160 * D * 2 // 8  # K and V codes, 4 per byte
    assert got.meta == 2 * (2 * H * 5 * D) + 2 * (2 * H * 160 * 2)  # fp16 (mn, scale): K per channel, V per token
    assert got.fp16 == 2 * H * 140 * D * 2 and got.sums == got.index == 0
    assert s.transfer_bytes() == got


def test_sequences_are_independent():
    """A left-padded batch stores exactly what each sequence stores alone; changing sequence 1 leaves
    sequence 0's tensors untouched."""
    _, k, v = realistic_kv(2, H, 230, D, HQ, seed=5)
    valid = torch.ones(2, 230, dtype=torch.bool)
    valid[1, :50] = False
    batch = store(batch=2)
    batch.append(k, v, valid)
    alone = [store(), store()]
    alone[0].append(k[:1], v[:1])
    alone[1].append(k[1:, :, 50:], v[1:, :, 50:])
    other = store(batch=2)
    k2 = k.clone()
    k2[1] *= 5
    other.append(k2, v, valid)
    for b in range(2):
        wire = batch.export_seq(b)
        for name, t in alone[b].export_seq(0).items():
            assert torch.equal(wire[name], t), (b, name)
    for name, t in batch.export_seq(0).items():
        assert torch.equal(other.export_seq(0)[name], t), name


def test_export_import_round_trip():
    q, k, v = realistic_kv(2, H, 250, D, HQ, seed=6)
    s = filled(k, v, 200)
    r = store(batch=2)
    for b in range(2):
        wire = s.export_seq(b)
        assert sum(t.numel() * t.element_size() for t in wire.values()) == s.seq_bytes(b).total
        r.import_seq(b, wire)
    assert r.stored_bytes() == s.stored_bytes()
    for x in (s, r):  # a decode step on both sides
        x.append(k[:, :, -1:], v[:, :, -1:])
    torch.testing.assert_close(r.attend(q, SCALE), s.attend(q, SCALE))
