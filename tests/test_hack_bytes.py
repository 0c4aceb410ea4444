"""Exact byte accounting of HACK's store against hand calculations (HACK.md §6)."""
import pytest
import torch

from hack_cli.hf import make_method
from hack_cli.methods.base import fp16_bytes

H, D, T = 8, 128, 4096  # one Qwen3-8B layer: 8 KV heads, head_dim 128; every layer is the same


def qwen3_layer(tokens=T, **fields):
    s = make_method("hack", **fields).new_layer(0, 36, 1, H, D, "cpu", torch.bfloat16)
    s.append(torch.randn(1, H, tokens, D), torch.randn(1, H, tokens, D))
    return s


def test_artifact_layout_at_4096_tokens_is_17_7_percent_of_bf16():
    """Π=64, 2 bits, 4 sinks: 4092 tokens = 63 closed blocks (4032 tokens) + 60 in the open block.
    Per closed token and head: codes 2·128·2/8 = 64 B; K min/scale per channel per block 2·2·128/64 = 8 B;
    V min/scale per token per 64-channel group 2·2·2 = 8 B; sums (uint8: 64·3 = 192 <= 255): K per token per group
    2 B, V per channel per block 128/64 = 2 B. 16-bit tails: 64 tokens · 2 · 128 · 2 B."""
    s = qwen3_layer(bits=2, partition=64, meta_dtype="bfloat16")
    closed = 63 * 64
    hand = dict(codes=H * closed * 64, meta=H * closed * 16, sums=H * closed * 4, fp16=H * 64 * 2 * D * 2)
    got = s.transfer_bytes()
    assert {k: getattr(got, k) for k in hand} == hand
    ratio = got.total / fp16_bytes(T, H, D)
    assert ratio == pytest.approx(0.1771, abs=5e-4)  # the artifact reports 17.7% for Qwen3-8B at 4096 tokens


def test_sums_are_not_sent_when_the_receiver_rebuilds_them():
    with_sums, without = qwen3_layer(bits=2, partition=64), qwen3_layer(bits=2, partition=64, send_sums=False)
    assert without.transfer_bytes().sums == 0
    assert with_sums.transfer_bytes().total - without.transfer_bytes().total == with_sums.transfer_bytes().sums
    assert without.stored_bytes() == with_sums.stored_bytes()  # the decode side still caches them


@pytest.mark.parametrize("bits,part", [(2, 32), (4, 64), (8, 128)])
@pytest.mark.parametrize("tokens", [4096, 4000])
def test_token_layout_hand_count(bits, part, tokens):
    """Token layout, no sinks: K per token in groups of c = min(Π, D) (quantized at once, open block too);
    V per channel over Π-token blocks, open block in 16 bits."""
    s = qwen3_layer(tokens, bits=bits, partition=part, layout="token", sink_tokens=0)
    c = min(part, D)
    T = tokens
    closed, open_ = (T // part) * part, T % part
    sum_k = 1 if c * (2**bits - 1) <= 255 else 2
    sum_v = 1 if part * (2**bits - 1) <= 255 else 2
    got = s.stored_bytes()
    assert got.codes == H * (T * D * bits // 8 + closed * D * bits // 8)
    assert got.meta == H * (T * (D // c) * 2 * 2 + (closed // part) * D * 2 * 2)
    assert got.sums == H * (T * (D // c) * sum_k + (closed // part) * D * sum_v)
    assert got.fp16 == H * open_ * D * 2
