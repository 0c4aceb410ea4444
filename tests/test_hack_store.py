"""HackLayerKV: attention over the quantized store, both layouts, open blocks, sinks, ragged batches, ablations."""
import pytest
import torch
from kv_data import attention_fp32, realistic_kv

from hack_cli.hf import make_method

LAYOUTS = ["channel", "token"]
D, H, HQ = 64, 2, 6
SCALE = D ** -0.5


def store(batch=1, **fields):
    fields.setdefault("partition", 32)
    return make_method("hack", **fields).new_layer(0, 1, batch, H, D, "cpu", torch.float32)


def filled(k, v, prefill, **fields):
    """A store that got `prefill` tokens at once, then the rest one decode step at a time."""
    s = store(batch=k.shape[0], **fields)
    s.append(k[:, :, :prefill], v[:, :, :prefill])
    for t in range(prefill, k.shape[2]):
        s.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    return s


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("requant", [True, False])
def test_error_shrinks_with_bits(layout, requant):
    q, k, v = realistic_kv(1, H, 300, D, HQ)
    ref = attention_fp32(q[0], k[0], v[0], SCALE)
    err = {b: rel(filled(k, v, 290, bits=b, layout=layout, requant_elimination=requant).attend(q, SCALE)[0], ref)
           for b in (8, 4, 2)}
    assert err[8] < 0.08 and err[8] * 2 < err[4] and err[4] * 1.5 < err[2], err


def exact_int8(x, group):
    """Stand-in for the on-the-fly int8 quantization of Q and P that loses nothing: codes = x, min 0, scale 1."""
    shape = (*x.shape[:-1], x.shape[-1] // group)
    return x.float(), torch.zeros(shape), torch.ones(shape)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("requant", [True, False])
@pytest.mark.parametrize("sinks", [0, 4])
def test_attend_is_exact_attention_over_the_stored_kv(layout, requant, sinks, monkeypatch):
    """With Q/P quantization made lossless, the homomorphic attention over sinks, quantized blocks (full and
    partial) and the open block equals fp32 attention over the store's own K̂/V̂: nothing is assembled wrong."""
    monkeypatch.setattr("hack_cli.methods.hack.homomorphic.quantize_int8", exact_int8)
    q, k, v = realistic_kv(1, H, 200, D, HQ, seed=1)
    s = filled(k, v, 150, bits=2, layout=layout, requant_elimination=requant, sink_tokens=sinks)
    kh, vh = s.reconstruct(0)
    assert kh.shape == (H, 200, D)
    torch.testing.assert_close(s.attend(q, SCALE)[0], attention_fp32(q[0], kh, vh, SCALE), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_summation_elimination_gives_identical_results(layout):
    q, k, v = realistic_kv(2, H, 170, D, HQ, seed=2)
    a = filled(k, v, 100, bits=2, layout=layout, summation_elimination=True)
    b = filled(k, v, 100, bits=2, layout=layout, summation_elimination=False)
    torch.testing.assert_close(a.attend(q, SCALE), b.attend(q, SCALE), rtol=0, atol=1e-6)
    assert a.stored_bytes().sums > 0 and b.stored_bytes().sums == 0
    assert a.stored_bytes().total - a.stored_bytes().sums == b.stored_bytes().total


@pytest.mark.parametrize("layout", LAYOUTS)
def test_token_by_token_equals_one_prefill(layout):
    _, k, v = realistic_kv(1, H, 150, D, HQ, seed=3)
    q = torch.randn(1, HQ, 1, D)
    one = store(bits=2, layout=layout)
    one.append(k, v)
    steps = filled(k, v, 1, bits=2, layout=layout)
    for name, t in one.blocks.items():
        assert torch.equal(t, steps.blocks[name]), name
    for x in "kv":
        assert torch.equal(one.open[x], steps.open[x]) and torch.equal(one.sinks[x], steps.sinks[x])
    torch.testing.assert_close(one.attend(q, SCALE), steps.attend(q, SCALE))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_padded_batch_equals_separate_sequences(layout):
    """Per-sequence scales: a left-padded batch stores exactly what each sequence stores alone."""
    q, k, v = realistic_kv(2, H, 140, D, HQ, seed=4)
    valid = torch.ones(2, 140, dtype=torch.bool)
    valid[1, :45] = False  # sequence 1 is 95 tokens, left-padded
    batch = store(batch=2, bits=2, layout=layout)
    batch.append(k, v, valid)
    out = batch.attend(q, SCALE)  # queries: the last appended token of each sequence
    for b, start in ((0, 0), (1, 45)):
        alone = store(bits=2, layout=layout)
        alone.append(k[b:b + 1, :, start:], v[b:b + 1, :, start:])
        torch.testing.assert_close(out[b:b + 1, :, -1:], alone.attend(q[b:b + 1], SCALE)[:, :, -1:])
        for name, t in alone.blocks.items():
            n = t.shape[2]
            assert torch.equal(batch.blocks[name][b, :, :n], t[0]), name


def test_sequences_never_share_statistics():
    _, k, v = realistic_kv(2, H, 130, D, HQ, seed=5)
    a = store(batch=2, bits=2)
    a.append(k, v)
    k2 = k.clone()
    k2[1] *= 100  # only sequence 1 changes
    b = store(batch=2, bits=2)
    b.append(k2, v)
    for name in a.blocks:
        assert torch.equal(a.blocks[name][0], b.blocks[name][0]), name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sinks_and_open_block_stay_16_bit(layout):
    _, k, v = realistic_kv(1, H, 4 + 32 + 20, D, HQ, seed=6)
    s = store(bits=2, layout=layout, sink_tokens=4)
    s.append(k, v)
    kh, vh = s.reconstruct(0)
    f16 = lambda x: x.half().float()
    assert torch.equal(kh[:, :4], f16(k[0, :, :4])) and torch.equal(vh[:, :4], f16(v[0, :, :4]))
    assert torch.equal(vh[:, 36:], f16(v[0, :, 36:]))  # V's open block: 16-bit in both layouts
    open_k_exact = torch.equal(kh[:, 36:], f16(k[0, :, 36:]))
    assert open_k_exact == (layout == "channel")  # the token layout quantizes K per token at once


def test_requantization_ablation_accumulates_error():
    """Without the 16-bit open block the partial block is re-quantized from dequantized values at every step."""
    _, k, v = realistic_kv(1, H, 64, D, HQ, seed=7)
    kwargs = dict(bits=2, partition=64, sink_tokens=0)
    once = store(**kwargs, requant_elimination=False)
    once.append(k, v)  # one full block, quantized once
    steps = filled(k, v, 1, **kwargs, requant_elimination=False)  # re-quantized 63 times
    err = lambda s: (s.reconstruct(0)[0] - k[0]).norm().item()
    assert err(steps) > 1.2 * err(once)
    assert steps.stored_bytes().fp16 == 0  # nothing kept in 16 bits: that is the ablation


def test_sliding_window_hides_old_keys():
    q, k, v = realistic_kv(1, H, 150, D, HQ, seed=8)
    s = store(bits=4)
    s.append(k, v)
    out = s.attend(q, SCALE, window=40)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :100] = torch.randn_like(k2[:, :, :100])  # change only keys outside the window
    v2[:, :, :100] = 0
    s2 = store(bits=4)
    s2.append(k2, v2)
    # blocks 0..2 (tokens 4..99) changed; the window covers tokens 110..149, which are in the same blocks
    # or the open block in both stores, and sinks are outside the window too
    torch.testing.assert_close(out, s2.attend(q, SCALE, window=40))


def test_gqa_rows_follow_their_kv_head():
    q, k, v = realistic_kv(1, H, 100, D, HQ, seed=9)
    s = store(bits=8)
    s.append(k, v)
    out = s.attend(q, SCALE)[0]  # (HQ, 1, D)
    ref = attention_fp32(q[0], k[0], v[0], SCALE)
    per_head = ((out - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1))
    assert (per_head < 0.1).all(), per_head
