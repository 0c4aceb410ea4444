"""KVQuant: RoPE inversion, k-means, calibration file, outliers restored exactly, error bounds, bytes, wire."""
import numpy as np
import pytest
import torch
from kv_data import attention_fp32, realistic_kv

from hack_cli.errors import HackError
from hack_cli.hf import load_model, make_method
from hack_cli.methods.kvquant import apply_rope, invert_rope, rope_cos_sin
from hack_cli.methods.kvquant_calib import fit, kmeans_1d, rope_tables, save

SCALE = 32 ** -0.5


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")[0]


@pytest.fixture(scope="module")
def calib(tiny, tmp_path_factory):
    """A calibration file for the tiny random Llama (2 layers, 2 KV heads, head_dim 32)."""
    seqs = torch.randint(0, 512, (4, 96), generator=torch.Generator().manual_seed(0))
    tensors, meta = fit(tiny, seqs, bits=2, fraction=0.01, sinks=1, iters=50)
    path = tmp_path_factory.mktemp("kvquant") / "tiny.safetensors"
    save(path, tensors, {**meta, "model": "tiny"})
    return str(path), tensors, meta


def store(calib, batch=1, layer=0, **fields):
    method = make_method("kvquant", calibration=calib[0], **fields)
    return method.new_layer(layer, 2, batch, 2, 32, "cpu", torch.float32)


def test_rope_matches_transformers_and_inverts(tiny):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x = torch.randn(1, 2, 40, 32)
    pos = torch.arange(100, 140)
    cos_hf, sin_hf = tiny.model.rotary_emb(x, pos[None])
    _, want = apply_rotary_pos_emb(x, x, cos_hf, sin_hf)
    inv_freq, scaling = rope_tables(tiny)
    cos, sin = rope_cos_sin(inv_freq[0], float(scaling[0]), pos)
    got = apply_rope(x, cos, sin)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(invert_rope(got, cos, sin), x, rtol=1e-5, atol=1e-5)


def test_kmeans_matches_scikit_learn():
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(6, 600, generator=g), torch.randn(6, 200, generator=g) * 3 + 2], 1)  # (6, 800)
    x[3:] = torch.randn(3, 800, generator=g) ** 3  # heavy tails: Lloyd's local optima differ
    mask = torch.rand(6, 800, generator=g) > 0.1
    ours = kmeans_1d(x, mask, 4)
    for m in range(6):
        data = x[m][mask[m]].double().numpy()[:, None]
        inertia = lambda c: float(((data - np.asarray(c)[None]) ** 2).min(1).sum())
        with threadpool_limits(1):  # sklearn's thread pool crawls on a shared 2-core machine
            sk = KMeans(4, n_init=3, random_state=0).fit(data)
        assert inertia(ours[m].double().numpy()) <= sk.inertia_ * 1.01


def test_calibration_records_the_model(calib):
    _, tensors, meta = calib
    assert tensors["key_levels_pre"].shape == (2, 2, 32, 4) and tensors["value_levels"].shape == (2, 4)
    assert float(meta["rope_check_rel_err"]) < 1e-2  # inverting RoPE recovers the model's own pre-RoPE keys
    levels = tensors["key_levels_pre"]
    assert (levels[..., 1:] > levels[..., :-1]).all() and levels.abs().max() <= 1


def test_uncalibrated_or_mismatched_refuses():
    with pytest.raises(HackError, match="hack calibrate kvquant"):
        make_method("kvquant")
    with pytest.raises(HackError, match="hack calibrate kvquant"):
        make_method("kvquant", calibration="/nonexistent/file.safetensors")


def test_mismatch_refuses(calib):
    with pytest.raises(HackError, match="hack calibrate kvquant"):
        make_method("kvquant", calibration=calib[0], outlier_fraction=0.02)
    with pytest.raises(HackError, match="hack calibrate kvquant"):
        make_method("kvquant", calibration=calib[0]).new_layer(0, 3, 1, 2, 32, "cpu", torch.float32)


@pytest.mark.parametrize("pre_rope", [True, False])
def test_outliers_restored_exactly_and_inliers_bounded(calib, pre_rope):
    _, k, v = realistic_kv(1, 2, 120, 32, 4, seed=1)
    k[0, 1, 30:33, 5] = 500.0  # spikes far outside any calibrated range
    s = store(calib, pre_rope=pre_rope)
    s.append(k, v)
    kq, vq = s.dequantize()  # (1, H, n, D) pre-RoPE (if pre_rope) dequantized slots, positions 1..
    k16, v16 = k[0, :, 1:].half().float(), v[0, :, 1:].half().float()
    if pre_rope:
        k16 = invert_rope(k16, *s._cos_sin(torch.arange(1, 120)))
    k_out = (k16 < s.k_lo[:, None]) | (k16 > s.k_hi[:, None])
    assert k_out[1, 29:32, 5].all()
    torch.testing.assert_close(kq[0][k_out], k16[k_out].half().float(), rtol=0, atol=0)
    sp = s.export_seq(0)
    assert int(sp["k_count"].sum()) == int(k_out.sum()) and sp["v_idx"].shape == (119, 1)  # round(1% of 64)
    flat = v16.abs().transpose(0, 1).reshape(119, 64)  # (n, H·D): one value outlier per token
    v_out = torch.zeros_like(flat, dtype=torch.bool).scatter(1, flat.argmax(-1, keepdim=True), True)
    v_out = v_out.reshape(119, 2, 32).transpose(0, 1)  # (H, n, D)
    torch.testing.assert_close(vq[0][v_out], v16[v_out], rtol=0, atol=0)
    # inliers: within half the widest level gap of the normalized range (+ the clamp at the extremes)
    lv = s.k_levels  # (H, D, 4)
    edge = torch.maximum(lv[..., 0] + 1, 1 - lv[..., -1])  # clamped to [-1, 1] beyond the outer levels
    gap = torch.maximum((lv[..., 1:] - lv[..., :-1]).amax(-1) / 2, edge)  # (H, D)
    half = (s.k_hi - s.k_lo) / 2
    assert ((kq[0] - k16).abs()[~k_out] <= (gap * half)[:, None].expand_as(k16)[~k_out] + 1e-4).all()
    lv = s.v_levels
    vgap = max(float((lv[1:] - lv[:-1]).max() / 2), float(lv[0] + 1), float(1 - lv[-1]))
    vhalf = s.t["v_half"][0, :, :119].float()[..., None].expand_as(v16)
    assert ((vq[0] - v16).abs()[~v_out] <= vgap * vhalf[~v_out] * 1.001 + 1e-3).all()


def test_first_token_is_kept_in_16_bits(calib):
    _, k, v = realistic_kv(1, 2, 40, 32, 4, seed=2)
    s = store(calib)
    s.append(k, v)
    kh, vh = s.materialize()
    assert torch.equal(kh[0, :, 0], k[0, :, 0].half()) and torch.equal(vh[0, :, 0], v[0, :, 0].half())


def test_attention_close_and_token_by_token_equals_prefill(calib):
    q, k, v = realistic_kv(1, 2, 200, 32, 4, seed=3)
    one, steps = store(calib), store(calib)
    one.append(k, v)
    steps.append(k[:, :, :150], v[:, :, :150])
    for t in range(150, 200):
        steps.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    for name, t in one.export_seq(0).items():
        assert torch.equal(t, steps.export_seq(0)[name]), name
    kh, vh = one.materialize()
    torch.testing.assert_close(one.attend(q, SCALE)[0], attention_fp32(q[0], kh[0], vh[0], SCALE),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_ragged_appends_equal_each_sequence_alone(calib, dtype):
    """One store appends a left-padded prefill and decode steps with padding for 3 sequences at once; each must hold
    exactly what a store fed that sequence's real tokens alone holds, and attend as it does."""
    q, k, v = realistic_kv(3, 2, 60, 32, 4, seed=6)
    k[1, 0, 40:43, 7] = 400.0  # key outliers in one sequence only
    valid = torch.ones(3, 60, dtype=torch.bool)
    valid[1, :25], valid[2, :] = False, False  # sequence 2 starts empty
    steps = [realistic_kv(3, 2, t, 32, 4, seed=10 + t)[1:] for t in (1, 2, 1, 1)]
    masks = [torch.tensor([[True], [False], [True]]), torch.tensor([[True, True], [False, True], [True, False]]),
             torch.ones(3, 1, dtype=torch.bool), torch.ones(3, 1, dtype=torch.bool)]
    both = store(calib, batch=3)
    both.append(k.to(dtype), v.to(dtype), valid)
    for (ks, vs), m in zip(steps, masks):
        both.append(ks.to(dtype), vs.to(dtype), m)
    out = both.attend(q[:, :, :1].to(dtype), SCALE)
    for b in range(3):
        one = store(calib)
        one.append(k[b:b + 1, :, valid[b]].to(dtype), v[b:b + 1, :, valid[b]].to(dtype))
        for (ks, vs), m in zip(steps, masks):
            if m[b].any():
                one.append(ks[b:b + 1, :, m[b]].to(dtype), vs[b:b + 1, :, m[b]].to(dtype))
        assert one.seq_bytes(0) == both.seq_bytes(b)
        for name, t in one.export_seq(0).items():
            assert torch.equal(t, both.export_seq(b)[name]), (b, name)
        # same KV; the batch's attention is masked over padded slots, so only the kernel's rounding may differ
        torch.testing.assert_close(one.attend(q[b:b + 1, :, :1].to(dtype), SCALE)[0], out[b])


def test_bytes_by_hand_and_wire(calib):
    q, k, v = realistic_kv(2, 2, 150, 32, 4, seed=4)
    valid = torch.ones(2, 150, dtype=torch.bool)
    valid[1, :30] = False
    s = store(calib, batch=2)
    s.append(k, v, valid)
    r = store(calib, batch=2)
    for b, n in ((0, 150), (1, 120)):
        nnz = int(s.export_seq(b)["k_count"].sum())
        want = {"codes": 2 * 2 * (n - 1) * 32 * 2 // 8, "meta": 2 * 2 * (n - 1) * 2,
                "fp16": 2 * 2 * 32 * 2 + (nnz + (n - 1)) * 2, "index": 2 * ((n - 1) + nnz + (n - 1))}
        got = s.seq_bytes(b)
        assert {key: getattr(got, key) for key in want} == want and got.sums == 0
        wire = s.export_seq(b)
        assert sum(t.numel() * t.element_size() for t in wire.values()) == got.total
        r.import_seq(b, wire)
    for x in (s, r):  # a decode step on both sides
        x.append(k[:, :, -1:], v[:, :, -1:])
    torch.testing.assert_close(r.attend(q, SCALE), s.attend(q, SCALE))


def test_sequences_are_independent(calib):
    _, k, v = realistic_kv(2, 2, 80, 32, 4, seed=5)
    a, b = store(calib, batch=2), store(calib, batch=2)
    a.append(k, v)
    v2 = v.clone()
    v2[1] *= 9
    b.append(k, v2)
    for name, t in a.export_seq(0).items():
        assert torch.equal(b.export_seq(0)[name], t), name


@pytest.mark.parametrize("model_type", ["qwen3", "gemma3_text"])
def test_calibration_checks_pre_rope_keys_after_k_norm(model_type):
    """Qwen3 applies k_norm before the head transpose, Gemma-3 after it (and keeps only its window in sliding
    layers): the captured pre-RoPE keys must line up with the inverted cache in both."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    extra = {"sliding_window": 32, "query_pre_attn_scalar": 16} if model_type == "gemma3_text" else {}
    config = AutoConfig.for_model(model_type, vocab_size=256, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                  max_position_embeddings=512, **extra)
    model = AutoModelForCausalLM.from_config(config).eval()
    seqs = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    tensors, meta = fit(model, seqs, bits=2, fraction=0.01, sinks=1, iters=5)
    assert float(meta["rope_check_rel_err"]) < 1e-2
    assert tensors["key_levels_pre"].shape[:3] == (2, 1, 16)
