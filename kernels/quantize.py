"""Quantize + pack + sums in one pass (HACK.md §2, §5): whole blocks of Π tokens of 16-bit K or V -> HACK's layout.

Per block (Π, D): min/max, the stored min rounded down and scale rounded up in the 16-bit meta dtype (as
hack_cli.methods.hack.quantizer.quantize does), codes by nearest or stochastic (tl.rand, seeded) rounding, packed
8/b per byte along D (K) or along the block's tokens (V: the axis P·V contracts), and the cached code sums — per
token per channel group (K's sums) or per channel over the block (V's sums). Layouts: per_channel (channel-layout K,
token-layout V) or per_token in groups of C channels.

How the work is done (kernels/NOTES.md, "Quantize + pack + sums"), bit-identical to the reference:
- The input is read as int32 words of two channels. Min and max run on the packed pairs (min/max.bf16x2, which
  ptxas joins into 3-operand VHMNMX: about 1/4 of the fp32 min/max instructions); each word widens to two fp32 by
  one shift or mask apiece.
- A group's stored min and scale are one directed-rounding conversion each (cvt.rm / cvt.rp). (hi - mn) / levels is
  rounded as the reference rounds it on the same device (_stats: on CUDA PyTorch divides by a Python scalar as a
  product with fl(1/levels), not correctly rounded; on the CPU it divides). (x - mn) / scale is correctly rounded by
  one Markstein refinement of a product with the reciprocal, and the reciprocal of the 16-bit scale is correctly
  rounded by one Newton step from rcp.approx (_reciprocal).
- A code is the bits of fl(t + 0.5) + 1.5·2^23 added rounding down: one add whose low byte is floor(fl(t + 0.5)),
  no floor, float-to-int conversion or clamp per element (t is within [0, levels] by construction). Packed words and
  sums add those bits; the multiples of 1.5·2^23 they carry are subtracted once per word (a constant) or masked
  off (sums: n·MAGIC is a multiple of 2^22).
- A block's tile is (NW, TW, CS): token w·TW + i at [w, i, :], loaded as (NW, TW, R, CS/R). Triton 3.6 gives the
  lanes to the last axis, then to axis 0, so a thread holds TW consecutive tokens (V's packing along the tokens
  needs no transpose) and R chunks of 8 channels CS/R apart (`chunks` > 1: fewer lanes share, and repeat, a
  token's statistics).
- `channels` (CS) < D splits a block by channel groups into D / CS programs: every min, max and sum is local to a
  channel group except K's per-channel statistics, which are local to a channel, so a split needs no second pass.
- `blocks_per_program` > 1: a program walks blocks pid, pid + grid, ... in a `tl.range` loop (num_stages > 1: the
  next block's load, a cp.async into shared memory, overlaps this block's arithmetic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hack_kernels.common import interpreting

MAGIC = tl.constexpr(0x4B400000)  # bits of 1.5·2^23: x + 1.5·2^23 (0 <= x < 2^22) has floor(x) in its low bits


@triton.jit
def _round_toward(x, MDT: tl.constexpr, DOWN: tl.constexpr, ASM: tl.constexpr):
    """x (fp32) rounded to the 16-bit MDT toward -inf (DOWN) or +inf; returned as fp32. On the GPU one conversion
    with the directed rounding (cvt.rm / cvt.rp); the interpreter rounds to nearest and steps one ulp."""
    if ASM:
        if MDT == tl.bfloat16:
            if DOWN:
                y = tl.inline_asm_elementwise("cvt.rm.bf16.f32 $0, $1;", "=h,f", [x], dtype=tl.bfloat16,
                                              is_pure=True, pack=1)
            else:
                y = tl.inline_asm_elementwise("cvt.rp.bf16.f32 $0, $1;", "=h,f", [x], dtype=tl.bfloat16,
                                              is_pure=True, pack=1)
        else:
            if DOWN:
                y = tl.inline_asm_elementwise("cvt.rm.f16.f32 $0, $1;", "=h,f", [x], dtype=tl.float16,
                                              is_pure=True, pack=1)
            else:
                y = tl.inline_asm_elementwise("cvt.rp.f16.f32 $0, $1;", "=h,f", [x], dtype=tl.float16,
                                              is_pure=True, pack=1)
        out = y.to(tl.float32)
    else:
        y = x.to(MDT)
        yf = y.to(tl.float32)
        bits = y.to(tl.int16, bitcast=True)
        if DOWN:
            step = tl.where(yf > 0, bits - 1, tl.where(yf < 0, bits + 1, -32767))  # -32767 = 0x8001: -min subnormal
            off = yf > x
        else:
            step = tl.where(yf > 0, bits + 1, tl.where(yf < 0, bits - 1, 1))
            off = yf < x
        out = tl.where(off, step.to(tl.int16).to(MDT, bitcast=True), y).to(tl.float32)
    return out


@triton.jit
def _quotient(a, nb, inv):
    """a / b correctly rounded from nb = -b and inv = 1/b correctly rounded: one Markstein refinement of a·inv (as
    common.div_rn, with the divisor negated once per group rather than the product once per element)."""
    q0 = a * inv
    return tl.fma(tl.fma(q0, nb, a), inv, q0)


@triton.jit
def _reciprocal(b, nb, ASM: tl.constexpr):
    """1/b correctly rounded for a divisor b = -nb with at most 11 significant bits (a 16-bit scale, or 1), as
    _quotient needs: one Newton step from rcp.approx. 1/b lies at least 2^-12 ulp from a rounding midpoint when b has
    <= 11 significant bits, and the step lands within 2^-23 ulp of 1/b (its residual 1 - b·y is exact in the FMA).
    (Triton's fp32 `/` is div.full, not correctly rounded; rcp.rn branches to a slow path that costs registers.)"""
    if ASM:
        out = tl.inline_asm_elementwise("""{
            .reg .f32 y, e;
            rcp.approx.f32 y, $1;
            fma.rn.f32 e, $2, y, 0f3F800000;
            fma.rn.f32 $0, y, e, y;
            }""", "=f,f,f", [b, nb], dtype=tl.float32, is_pure=True, pack=1)
    else:
        out = 1.0 / b
    return out


@triton.jit
def _stats(lo, hi, MDT: tl.constexpr, LEVELS: tl.constexpr, ASM: tl.constexpr, RCP: tl.constexpr):
    """A group's min and max (fp32) -> stored min (rounded down), stored scale ((hi - mn) / LEVELS rounded up; 0 for
    a constant group), and the divisor's -b and 1/b for _quotient (b = scale, or 1 where the scale is 0).
    (hi - mn) / LEVELS is rounded as the reference's `(hi - mn) / levels` is on its device. RCP (CUDA): one product
    with fl(1/LEVELS), as PyTorch's CUDA kernel divides by a Python scalar (and as v3's `/ LEVELS` compiled: ptxas
    turns div.full by a constant into an FMUL by fl(1/LEVELS)). Else (CPU): the correctly rounded quotient. The two
    differ by an fp32 ulp now and then; the scale's rounding up to 16 bits shows it when the quotient is (nearly) a
    16-bit value, e.g. hi - mn = 15·s exactly: never at LEVELS = 3, often at 15 and 255."""
    mn = _round_toward(lo, MDT, True, ASM)
    if RCP:
        q = (hi - mn) * (1.0 / LEVELS)
    else:
        q = _quotient(hi - mn, -LEVELS, 1.0 / LEVELS)
    sc = _round_toward(q, MDT, False, ASM)
    div = tl.where(sc == 0.0, 1.0, sc)
    return mn, sc, -div, _reciprocal(div, -div, ASM)


@triton.jit
def _code_bits(u, LEVELS: tl.constexpr, CLAMP: tl.constexpr, ASM: tl.constexpr):
    """u = fl(t + 0.5) or t + rand (fp32, >= 0) -> int32 bits MAGIC + min(floor(u), LEVELS): one add rounding down.
    Nearest rounding needs no clamp: t <= LEVELS·(1 + 2^-22) since the stored scale is rounded up, and t >= 0 since
    the stored min is rounded down. CLAMP (stochastic rounding) clamps, t + rand may reach LEVELS + 1."""
    if ASM:
        y = tl.inline_asm_elementwise("add.rm.f32 $0, $1, 0f4B400000;", "=r,f", [u], dtype=tl.int32, is_pure=True,
                                      pack=1)
    else:
        y = (tl.floor(u) + 12582912.0).to(tl.int32, bitcast=True)
    if CLAMP:
        y = tl.minimum(y, MAGIC + LEVELS)
    return y


@triton.jit
def _halves(w, BF16: tl.constexpr):
    """int32 words holding two 16-bit values (bf16 if BF16, else fp16; little-endian) -> (low, high) as fp32."""
    if BF16:
        lo = (w << 16).to(tl.float32, bitcast=True)
        hi = (w & -65536).to(tl.float32, bitcast=True)
    else:
        lo = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _min_bf16x2(a, b):
    return tl.inline_asm_elementwise("min.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _max_bf16x2(a, b):
    return tl.inline_asm_elementwise("max.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _min_f16x2(a, b):
    return tl.inline_asm_elementwise("min.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _max_f16x2(a, b):
    return tl.inline_asm_elementwise("max.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _pair_min(w, axis: tl.constexpr, BF16: tl.constexpr):
    """Min along `axis` of words of two 16-bit values, each half on its own (ptxas joins the packed mins into
    3-operand VHMNMX: ~4x fewer instructions than fp32 min)."""
    if BF16:
        out = tl.reduce(w, axis, _min_bf16x2)
    else:
        out = tl.reduce(w, axis, _min_f16x2)
    return out


@triton.jit
def _pair_max(w, axis: tl.constexpr, BF16: tl.constexpr):
    if BF16:
        out = tl.reduce(w, axis, _max_bf16x2)
    else:
        out = tl.reduce(w, axis, _max_f16x2)
    return out


@triton.jit
def _block(X, CODES, MN, SC, SUMS, seed, blk, c0, PI: tl.constexpr, D: tl.constexpr, CS: tl.constexpr,
           G: tl.constexpr, TW: tl.constexpr, BITS: tl.constexpr, PER_CHANNEL: tl.constexpr,
           TOKEN_SUMS: tl.constexpr, STOCH: tl.constexpr, MDT: tl.constexpr, ALONG_TOKENS: tl.constexpr,
           R: tl.constexpr, BF16: tl.constexpr, F32: tl.constexpr, ASM: tl.constexpr, EVICT: tl.constexpr,
           BIAS_T: tl.constexpr, BIAS_D: tl.constexpr, RCP: tl.constexpr):
    """Block blk (int64), channels [c0, c0 + CS) of it. X: fp32 input (F32), else the 16-bit input (bf16 if BF16,
    else fp16) read as int32 words of two channels."""
    C: tl.constexpr = D // G
    GS: tl.constexpr = CS // C  # channel groups in this program's slice
    NW: tl.constexpr = PI // TW
    PW: tl.constexpr = 8 if BITS <= 4 else 4  # codes per packed word along D, within a thread's 8-channel chunk
    LEVELS: tl.constexpr = (1 << BITS) - 1
    ww = tl.arange(0, NW)[:, None, None]
    ii = tl.arange(0, TW)[None, :, None]
    tok = ww * TW + ii  # (NW, TW, 1): token of [w, i]
    # read as (NW, TW, R, CS/R): Triton gives the last axis the lanes, then axis 0, so a thread holds R chunks of 8
    # channels CS/R apart (R > 1: fewer lanes share, and repeat, a token's statistics). 16-bit input: int32 words of
    # channel pairs, (NW, TW, R, CS/2R)
    PAIRS: tl.constexpr = ASM and not F32  # min/max on the packed pairs
    E: tl.constexpr = 1 if F32 else 2  # elements a loaded word
    rr = tl.arange(0, R)[None, None, :, None]
    mm = tl.arange(0, CS // E // R)[None, None, None, :]
    offs = ((blk * PI + tok) * (D // E) + c0 // E)[:, :, :, None] + rr * (CS // E // R) + mm
    if EVICT:
        xw = tl.reshape(tl.load(X + offs, eviction_policy="evict_first"), (NW, TW, CS // E))
    else:
        xw = tl.reshape(tl.load(X + offs), (NW, TW, CS // E))
    if F32:
        x = xw  # (NW, TW, CS) fp32
    else:
        lo, hi = _halves(xw, BF16)  # xw: (NW, TW, CS/2) words
        x = tl.reshape(tl.join(lo, hi), (NW, TW, CS))  # (NW, TW, CS) fp32: channel 2k + j from half j of word k
    if PER_CHANNEL:
        if PAIRS:
            cmin = tl.reshape(tl.join(*_halves(_pair_min(_pair_min(xw, 1, BF16), 0, BF16), BF16)), (CS,))
            cmax = tl.reshape(tl.join(*_halves(_pair_max(_pair_max(xw, 1, BF16), 0, BF16), BF16)), (CS,))
        else:
            cmin = tl.min(tl.min(x, axis=1), axis=0)
            cmax = tl.max(tl.max(x, axis=1), axis=0)
        mn, sc, nb, inv = _stats(cmin, cmax, MDT, LEVELS, ASM, RCP)  # (CS,)
        t = _quotient(x - mn[None, None, :], nb[None, None, :], inv[None, None, :])
        cc = c0 + tl.arange(0, CS)
        tl.store(MN + blk * D + cc, mn.to(MDT))
        tl.store(SC + blk * D + cc, sc.to(MDT))
    else:
        x4 = tl.reshape(x, (NW, TW, GS, C))
        if PAIRS:
            xw4 = tl.reshape(xw, (NW, TW, GS, C // 2))
            ml, mh = _halves(_pair_min(xw4, 3, BF16), BF16)  # (NW, TW, GS): min of even, odd channels
            xl, xh = _halves(_pair_max(xw4, 3, BF16), BF16)
            gmin, gmax = tl.minimum(ml, mh), tl.maximum(xl, xh)
        else:
            gmin, gmax = tl.min(x4, axis=3), tl.max(x4, axis=3)
        mn, sc, nb, inv = _stats(gmin, gmax, MDT, LEVELS, ASM, RCP)  # (NW, TW, GS)
        t = tl.reshape(_quotient(x4 - mn[:, :, :, None], nb[:, :, :, None], inv[:, :, :, None]), (NW, TW, CS))
        meta = (blk * PI + tok) * G + c0 // C + tl.arange(0, GS)[None, None, :]  # (NW, TW, GS)
        tl.store(MN + meta, mn.to(MDT))
        tl.store(SC + meta, sc.to(MDT))
    if STOCH:
        idx = (blk * PI + tok) * D + c0 + tl.arange(0, CS)[None, None, :]  # (NW, TW, CS) element offsets
        bits = _code_bits(t + tl.rand(seed, idx), LEVELS, True, ASM)  # (NW, TW, CS) MAGIC + code
    else:
        bits = _code_bits(t + 0.5, LEVELS, False, ASM)
    if ALONG_TOKENS:  # TW codes of a channel -> one word of TW·BITS bits; a channel's row holds NW words
        word = tl.sum(bits << (tl.arange(0, TW) * BITS)[None, :, None], axis=1) - BIAS_T  # (NW, CS)
        wp = (blk * D + c0 + tl.arange(0, CS)[None, :]) * NW + tl.arange(0, NW)[:, None]  # (NW, CS) word offsets
        if TW * BITS == 32:
            tl.store(CODES.to(tl.pointer_type(tl.int32)) + wp, word)
        elif TW * BITS == 16:
            tl.store(CODES.to(tl.pointer_type(tl.int16)) + wp, word.to(tl.int16))
        else:
            tl.store(CODES + wp, word.to(tl.uint8))
    else:  # PW codes of a token -> one word of PW·BITS bits along D
        b4 = tl.reshape(bits, (NW, TW, CS // PW, PW))
        word = tl.sum(b4 << (tl.arange(0, PW) * BITS)[None, None, None, :], axis=3) - BIAS_D  # (NW, TW, CS/PW)
        wp = (blk * PI + tok) * (D // PW) + c0 // PW + tl.arange(0, CS // PW)[None, None, :]
        if PW * BITS == 32:
            tl.store(CODES.to(tl.pointer_type(tl.int32)) + wp, word)
        elif PW * BITS == 16:
            tl.store(CODES.to(tl.pointer_type(tl.int16)) + wp, word.to(tl.int16))
        else:
            tl.store(CODES + wp, word.to(tl.uint8))
    # sums of MAGIC + code: n·MAGIC is a multiple of 2^22, so the low 22 bits are the sum of the codes
    if TOKEN_SUMS:
        sums = tl.sum(tl.reshape(bits, (NW, TW, GS, C)), axis=3) & 0x3FFFFF  # (NW, TW, GS)
        sp = (blk * PI + tok) * G + c0 // C + tl.arange(0, GS)[None, None, :]
        tl.store(SUMS + sp, sums.to(SUMS.dtype.element_ty))
    else:
        sums = tl.sum(tl.sum(bits, axis=1), axis=0) & 0x3FFFFF  # (CS,)
        tl.store(SUMS + blk * D + c0 + tl.arange(0, CS), sums.to(SUMS.dtype.element_ty))


@triton.jit(do_not_specialize=["seed", "nblk"])
def _quantize_kernel(X, CODES, MN, SC, SUMS, seed, nblk, PI: tl.constexpr, D: tl.constexpr, CS: tl.constexpr,
                     G: tl.constexpr, TW: tl.constexpr, BITS: tl.constexpr, PER_CHANNEL: tl.constexpr,
                     TOKEN_SUMS: tl.constexpr, STOCH: tl.constexpr, MDT: tl.constexpr, ALONG_TOKENS: tl.constexpr,
                     R: tl.constexpr, BF16: tl.constexpr, F32: tl.constexpr, ASM: tl.constexpr,
                     EVICT: tl.constexpr, BIAS_T: tl.constexpr, BIAS_D: tl.constexpr, LOOP: tl.constexpr,
                     STAGES: tl.constexpr, RCP: tl.constexpr):
    """Grid (programs, D / CS): program p takes blocks p, p + programs, ... (one block without LOOP)."""
    c0 = tl.program_id(1) * CS
    if LOOP:
        for blk in tl.range(tl.program_id(0), nblk, tl.num_programs(0), num_stages=STAGES):
            _block(X, CODES, MN, SC, SUMS, seed, tl.cast(blk, tl.int64), c0, PI, D, CS, G, TW, BITS, PER_CHANNEL,
                   TOKEN_SUMS, STOCH, MDT, ALONG_TOKENS, R, BF16, F32, ASM, EVICT, BIAS_T, BIAS_D, RCP)
    else:
        _block(X, CODES, MN, SC, SUMS, seed, tl.program_id(0).to(tl.int64), c0, PI, D, CS, G, TW, BITS,
               PER_CHANNEL, TOKEN_SUMS, STOCH, MDT, ALONG_TOKENS, R, BF16, F32, ASM, EVICT, BIAS_T, BIAS_D, RCP)


def sum_dtype(count: int, bits: int) -> torch.dtype:
    """As hack's quantizer: uint8 when `count` codes of `bits` bits fit, else int16."""
    return torch.uint8 if count * (2**bits - 1) <= 255 else torch.int16


def _bias(n: int, bits: int) -> int:
    """Σ_j MAGIC << (bits·j) over j < n, as a signed int32: what n codes' bits add to a packed word."""
    b = sum(MAGIC.value << (bits * j) for j in range(n)) % 2**32
    return b - 2**32 if b >= 2**31 else b


# Launch defaults for D = 128 by (bits, Π, per_channel): (num_warps, channels a program, programs an SM looping over
# the blocks (0: one block a program, no loop), num_stages of that loop, chunks of 8 channels a thread). Π = 32 and
# 64 were predicted from SASS instruction counts and occupancy (kernels/NOTES.md) and are the sweep's "default" rows
# (`python -m hack_kernels.tune_quantize`; results/kernels/tune_quantize_{h100,h200}_2026-11-27.txt). Π = 128: 4 warps,
# whole blocks, one a program, 2 chunks a thread (the sweep's `w4 ch2`), measured best of the sweep on an H100 and an
# H200 (80% / 81% of copy at 2 bits; the persistent loop it replaced, 8 warps and 2 programs an SM: 60% / 57%).
LAUNCH = {**{(b, 32, k): (2, 128, 0, 1, 1) for b in (2, 4) for k in (True, False)},  # one block a program
          **{(b, 64, k): (2, 64, 0, 1, 1 if k else 2) for b in (2, 4) for k in (True, False)},  # split in two
          **{(b, 128, k): (4, 128, 0, 1, 2) for b in (2, 4) for k in (True, False)}}  # `w4 ch2`


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def launch_config(bits: int, P: int, D: int, group: int, per_channel: bool, token_sums: bool, nblk: int, sms: int,
                  num_warps: int | None = None, channels: int | None = None, blocks_per_program: int | None = None,
                  num_stages: int | None = None, chunks: int | None = None) -> tuple[int, int, int, int, int]:
    """(num_warps, channels, blocks_per_program, num_stages, chunks) for nblk blocks on sms SMs: the arguments
    given, else LAUNCH's (other shapes: 2 warps up to 8192 elements a block, else 4; whole blocks, one a program;
    1 chunk). A channel split must hold whole groups of `group` channels, except for per-channel statistics
    without token sums; a chunk count must divide the channels by 8."""
    base = (2 if P * D <= 8192 else 4, D, 0, 1, 1)
    warps, cs, per_sm, stages, ch = LAUNCH.get((bits, P, per_channel), base) if D == 128 else base
    need = 1 if per_channel and not token_sums else group
    if channels is None and (D % cs or cs % need):
        cs = D
    cs = channels or cs
    if D % cs or cs % need:
        raise ValueError(f"channels={cs} must divide D={D} and be a multiple of {need}")
    ch = chunks or (ch if cs % (8 * ch) == 0 else 1)
    if cs % (8 * ch):
        raise ValueError(f"chunks={ch} of 8 channels must divide channels={cs}")
    bpp = blocks_per_program or (-(-nblk * (D // cs) // (per_sm * sms)) if per_sm else 1)  # grid: per_sm an SM
    return num_warps or warps, cs, max(1, bpp), num_stages or stages, ch


def kernel_args(bits: int, P: int, D: int, group: int, per_channel: bool, token_sums: bool, along_tokens: bool,
                x_dtype: torch.dtype, meta_dtype: torch.dtype, stochastic: bool, num_warps: int, channels: int,
                blocks_per_program: int, num_stages: int, chunks: int, evict_first: bool = False,
                rcp_scale: bool | None = None) -> dict:
    """_quantize_kernel's constexprs for one launch configuration (see quantize_blocks; rcp_scale None: as the
    reference on this run's device, i.e. on the GPU unless interpreting)."""
    lanes = max(1, 256 * chunks // channels)  # threads of a warp along the tokens (16-byte loads: 8 channels a chunk)
    # tokens per word along the tokens: the largest whose words still spread over every thread
    tw = next((w // bits for w in (32, 16, 8) if P % (w // bits) == 0 and P // (w // bits) >= lanes * num_warps),
              8 // bits)
    mdt = tl.bfloat16 if meta_dtype == torch.bfloat16 else tl.float16
    return dict(PI=P, D=D, CS=channels, G=D // group, TW=tw, BITS=bits, PER_CHANNEL=per_channel,
                TOKEN_SUMS=token_sums, STOCH=stochastic, MDT=mdt, ALONG_TOKENS=along_tokens, R=chunks,
                BF16=x_dtype == torch.bfloat16, F32=x_dtype == torch.float32,
                ASM=not interpreting(), EVICT=evict_first,
                BIAS_T=_bias(tw, bits), BIAS_D=_bias(8 if bits <= 4 else 4, bits), LOOP=blocks_per_program > 1,
                STAGES=num_stages, RCP=(not interpreting()) if rcp_scale is None else rcp_scale)


def quantize_blocks(x: torch.Tensor, bits: int, group: int, per_channel: bool, token_sums: bool,
                    rounding: str = "nearest", seed: int = 0, meta_dtype: torch.dtype = torch.float16,
                    out: dict | None = None, num_warps: int | None = None, along_tokens: bool = False,
                    channels: int | None = None, blocks_per_program: int | None = None,
                    num_stages: int | None = None, chunks: int | None = None, evict_first: bool = False,
                    maxnreg: int | None = None, rcp_scale: bool | None = None) -> dict[str, torch.Tensor]:
    """x (NBLK, Π, D) whole blocks (fp16/bf16, or fp32 holding such values) -> dict codes (NBLK, Π, D·b/8) uint8
    (along_tokens: (NBLK, D, Π·b/8), packed along each block's tokens), mn/scale ((NBLK, D) per_channel, else
    (NBLK, Π, G)) in meta_dtype, sums ((NBLK, Π, G) with token_sums, else (NBLK, D)). `out` may supply the tensors.
    Launch (None: `launch_config`'s defaults): num_warps; channels a program (a split of each block by channel
    groups); blocks_per_program (a grid of ceil(NBLK / it) programs, program p looping over blocks p, p + grid,
    ...; the defaults size it from the SM count); num_stages of that loop (> 1: the next block's load is issued
    before this block's arithmetic); chunks of 8 channels a thread holds of each token (more: fewer lanes repeat a
    token's statistics); evict_first on the loads; maxnreg (a register cap for ptxas). rcp_scale: how (hi - mn) /
    levels is rounded before the scale's rounding up (_stats): None as hack's quantizer on x's device (CUDA: a
    product with fl(1/levels), PyTorch's division by a scalar there; CPU: correctly rounded), or True / False."""
    nblk, P, D = x.shape
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or D % 8 or bits not in (2, 4, 8):
        raise ValueError(f"quantize_blocks takes fp16/bf16/fp32 blocks, D a multiple of 8, 2/4/8 bits; got {x.dtype} "
                         f"D={D} bits={bits}")
    G = D // group
    if out is None:
        meta = (nblk, D) if per_channel else (nblk, P, G)
        codes = (nblk, D, P * bits // 8) if along_tokens else (nblk, P, D * bits // 8)
        out = {"codes": torch.empty(codes, dtype=torch.uint8, device=x.device),
               "mn": torch.empty(meta, dtype=meta_dtype, device=x.device),
               "scale": torch.empty(meta, dtype=meta_dtype, device=x.device),
               "sums": torch.empty((nblk, P, G) if token_sums else (nblk, D),
                                   dtype=sum_dtype(group if token_sums else P, bits), device=x.device)}
    warps, cs, bpp, stages, ch = launch_config(bits, P, D, group, per_channel, token_sums, nblk, _sm_count(x.device),
                                               num_warps, channels, blocks_per_program, num_stages, chunks)
    if nblk:
        x = x.contiguous()
        if x.data_ptr() % 4:  # 16-bit input is read as int32 words of two channels
            x = x.clone()
        consts = kernel_args(bits, P, D, group, per_channel, token_sums, along_tokens, x.dtype,
                             meta_dtype, rounding == "stochastic", warps, cs, bpp, stages, ch, evict_first,
                             x.is_cuda if rcp_scale is None else rcp_scale)
        opts = {"num_warps": 1 if interpreting() else warps, **({"maxnreg": maxnreg} if maxnreg else {})}
        xin = x if x.dtype == torch.float32 else x.view(torch.int32)
        _quantize_kernel[(triton.cdiv(nblk, bpp), D // cs)](xin, out["codes"], out["mn"],
                                                           out["scale"], out["sums"], seed, nblk, **consts, **opts)
    return out
