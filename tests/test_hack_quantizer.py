"""Property tests of HACK's quantizer (HACK.md §2): packing, error bounds, unbiased stochastic rounding, sums."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hack_cli.errors import HackError
from hack_cli.methods.hack.quantizer import dequantize, pack, quantize, quantize_int8, unpack

BITS = st.sampled_from([2, 4, 8])


def fp16_slack(mn, scale, bits):
    """Rounding of the stored fp16 min/scale adds at most a few ulps of their magnitude."""
    return 2.0 ** -9 * (mn.float().abs() + scale.float() * (2**bits - 1))


@settings(max_examples=30, deadline=None)
@given(bits=BITS, rows=st.integers(1, 5), bytes_=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, rows, bytes_, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, bytes_ * 8 // bits), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (rows, bytes_) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)


@settings(max_examples=30, deadline=None)
@given(bits=BITS, group=st.sampled_from([16, 32, 64]), groups=st.integers(1, 4), seed=st.integers(0, 2**16),
       spread=st.floats(1e-3, 1e3), rounding=st.sampled_from(["nearest", "stochastic"]))
def test_error_bound_and_sums(bits, group, groups, seed, spread, rounding):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, groups * group, generator=g) * spread + spread
    codes, mn, scale, sums = quantize(x, bits, group, rounding, generator=g)
    assert codes.max() <= 2**bits - 1
    err = (dequantize(codes, mn, scale, group) - x).abs().reshape(3, groups, group)  # (3, G, group)
    bound = (scale.float() * (0.5 if rounding == "nearest" else 1.0) + fp16_slack(mn, scale, bits))[..., None]
    assert (err <= bound).all()
    assert torch.equal(sums.long(), codes.reshape(3, groups, group).long().sum(-1))


def test_stochastic_rounding_is_unbiased():
    x = torch.rand(1, 64) * 4
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([dequantize(*quantize(x, 2, 64, "stochastic", generator=g)[:3], 64) for _ in range(4000)])
    _, _, scale, _ = quantize(x, 2, 64, "nearest")
    # mean of 4000 draws: std of the mean <= scale / (2 * sqrt(4000)) ~ 0.008 scale; allow 5 sigma
    assert ((draws.mean(0) - x).abs() <= 0.04 * scale.float() + 1e-3).all()
    assert (draws.std(0) > 0).any()  # it really is random


def test_stochastic_rounding_is_seeded():
    x = torch.randn(4, 64)
    a = quantize(x, 2, 32, "stochastic", generator=torch.Generator().manual_seed(7))[0]
    b = quantize(x, 2, 32, "stochastic", generator=torch.Generator().manual_seed(7))[0]
    assert torch.equal(a, b)


def test_constant_partition_is_exact_with_zero_codes_and_scale():
    codes, mn, scale, _ = quantize(torch.full((1, 32), 3.0), 2, 32, "stochastic")
    assert (codes == 0).all() and (scale == 0).all()
    assert torch.equal(dequantize(codes, mn, scale, 32), torch.full((1, 32), 3.0))


def test_non_finite_input_names_the_layer():
    x = torch.randn(2, 64)
    x[1, 3] = float("nan")
    with pytest.raises(HackError, match="layer 7 K"):
        quantize(x, 2, 64, "nearest", where="layer 7 K")


def test_partition_must_fit():
    with pytest.raises(HackError, match="partitions of 64"):
        quantize(torch.randn(2, 96), 2, 64, "nearest")


@settings(max_examples=20, deadline=None)
@given(group=st.sampled_from([16, 64]), seed=st.integers(0, 2**16))
def test_int8_quantization_of_q_and_p(group, seed):
    x = torch.randn(5, 2 * group, generator=torch.Generator().manual_seed(seed))
    codes, mn, scale = quantize_int8(x, group)
    assert codes.dtype == torch.int8
    err = (dequantize(codes.float(), mn, scale, group) - x).abs().reshape(5, 2, group)
    assert (err <= scale[..., None] * 0.5 + 1e-5).all()
