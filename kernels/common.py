"""Helpers shared by the Triton kernels: code unpacking in registers and on-the-fly 8-bit quantization.

Codes are packed 8/b per byte along the axis a product contracts (K: the head dim; V: a block's tokens), element j
of a byte at bits [j·b, (j+1)·b) (the layout of hack_cli.methods.hack.quantizer.pack). On the GPU one `and`/`shr`
on a 32-bit register unpacks four codes at once (inline PTX, `pack=4`); the interpreter, which has no PTX, does the
same per byte.

Dot operand kinds (OPER): 0 = int8: Q̃/P̃ quantized to 8 bits with an offset, exact int32 accumulation (the
reference's scheme). 1 = fp8 e4m3: codes 0..15 are exact in e4m3 (as masked bytes they are e4m3 subnormals or the
first binade, code·2^-9, so the unpack needs no conversion), Q̃/P̃ quantized symmetrically to e4m3 (a documented
deviation: 3 mantissa bits). 2 = fp16: the same e4m3 codes widened to fp16, Q̃/P̃ merely rounded to fp16 (no
per-block 8-bit quantization at all; a deviation with less error than int8).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FP8_CODE = 2.0**-9  # a code byte v < 16 read as e4m3 is v·2^-9
FP8_MAX = 448.0


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_dtypes(operand: str):
    """operand name -> (OPER, DT): the dot dtype on the device; fp16 in the interpreter (no fp8 dot there)."""
    if operand == "int8":
        return 0, tl.int8
    if operand == "fp8":
        return 1, (tl.float16 if interpreting() else tl.float8e4nv)
    if operand == "fp16":
        return 2, tl.float16
    raise ValueError(f"operand must be int8, fp8 or fp16, got {operand!r}")


def tail_dot_dtype(t: torch.Tensor):
    """16-bit tails (sinks, open block): dot in their own dtype on the GPU (as SDPA does), fp32 in the interpreter."""
    if interpreting():
        return tl.float32
    return tl.bfloat16 if t.dtype == torch.bfloat16 else tl.float16


@triton.jit
def code_plane(packed, SHIFT: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """Code j of every byte (SHIFT = j·BITS) as DT: int8 -> the code; fp8/fp16 -> code·2^-9 (e4m3 bits = code)."""
    if ASM:
        if BITS == 2:
            if SHIFT == 0:
                out = tl.inline_asm_elementwise("and.b32 $0, $1, 0x03030303;", "=r,r", [packed], dtype=tl.int8,
                                                is_pure=True, pack=4)
            elif SHIFT == 2:
                out = tl.inline_asm_elementwise("shr.b32 $0, $1, 2;\n\tand.b32 $0, $0, 0x03030303;", "=r,r",
                                                [packed], dtype=tl.int8, is_pure=True, pack=4)
            elif SHIFT == 4:
                out = tl.inline_asm_elementwise("shr.b32 $0, $1, 4;\n\tand.b32 $0, $0, 0x03030303;", "=r,r",
                                                [packed], dtype=tl.int8, is_pure=True, pack=4)
            else:
                out = tl.inline_asm_elementwise("shr.b32 $0, $1, 6;\n\tand.b32 $0, $0, 0x03030303;", "=r,r",
                                                [packed], dtype=tl.int8, is_pure=True, pack=4)
        else:
            if SHIFT == 0:
                out = tl.inline_asm_elementwise("and.b32 $0, $1, 0x0F0F0F0F;", "=r,r", [packed], dtype=tl.int8,
                                                is_pure=True, pack=4)
            else:
                out = tl.inline_asm_elementwise("shr.b32 $0, $1, 4;\n\tand.b32 $0, $0, 0x0F0F0F0F;", "=r,r",
                                                [packed], dtype=tl.int8, is_pure=True, pack=4)
        if DT != tl.int8:
            out = out.to(tl.float8e4nv, bitcast=True).to(DT)
    else:
        code = (packed >> SHIFT) & ((1 << BITS) - 1)
        if DT == tl.int8:
            out = code.to(tl.int8)
        else:
            out = (code.to(tl.float32) * 0.001953125).to(DT)
    return out


@triton.jit
def unpack_codes(packed, BITS: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """packed (N, DB) uint8 -> (N, DB·8/BITS) codes as DT, element byte·8/BITS + j from code j of each byte."""
    N: tl.constexpr = packed.shape[0]
    DB: tl.constexpr = packed.shape[1]
    if BITS == 2:
        c0 = code_plane(packed, 0, BITS, DT, ASM)
        c1 = code_plane(packed, 2, BITS, DT, ASM)
        c2 = code_plane(packed, 4, BITS, DT, ASM)
        c3 = code_plane(packed, 6, BITS, DT, ASM)
        c = tl.join(tl.join(c0, c2), tl.join(c1, c3))  # (N, DB, 2, 2): [.., x, y] = code 2x + y
        out = tl.reshape(c, (N, DB * 4))
    else:
        c = tl.join(code_plane(packed, 0, BITS, DT, ASM), code_plane(packed, 4, BITS, DT, ASM))  # (N, DB, 2)
        out = tl.reshape(c, (N, DB * 2))
    return out


@triton.jit
def div_rn(a, b, inv):
    """a / b correctly rounded (as PyTorch's division in the references) from inv = 1/b: one Markstein refinement
    of a·inv with the remainder exact through the FMA, cheaper than the division instruction sequence."""
    q0 = a * inv
    return tl.fma(tl.fma(-q0, b, a), inv, q0)


@triton.jit
def quant8_rows(x, OPER: tl.constexpr, DT: tl.constexpr):
    """On-the-fly 8-bit quantization of x (A, B, N) along its last axis (the reference's `quantize_int8`).

    int8: codes = round((x - lo)/scale) - 128, returns (codes, scale, mn = lo + 128·scale) with x ≈ mn + scale·code.
    fp8: symmetric e4m3, scale = amax/448: returns (codes, scale, 0). fp16: x rounded to fp16, scale 1, min 0.
    Codes come back as fp32 values (exact in the dot dtype; the caller casts); scales and mins are (A, B).
    """
    if OPER == 0:
        lo = tl.min(x, axis=2)
        hi = tl.max(x, axis=2)
        scale = (hi - lo) / 255.0
        scale = tl.where(scale == 0.0, 1.0, scale)
        t = div_rn(x - lo[:, :, None], scale[:, :, None], (1.0 / scale)[:, :, None]) + 0.5  # bit-exact codes
        codes = tl.minimum(tl.maximum(tl.floor(t), 0.0), 255.0) - 128.0
        return codes, scale, lo + 128.0 * scale
    elif OPER == 2:
        ones = tl.full([x.shape[0], x.shape[1]], 1.0, tl.float32)
        return x.to(tl.float16).to(tl.float32), ones, ones * 0.0
    else:
        scale = tl.max(tl.abs(x), axis=2) / 448.0
        scale = tl.where(scale == 0.0, 1.0, scale)
        codes = (x * (1.0 / scale)[:, :, None]).to(tl.float8e4nv).to(tl.float32)
        return codes, scale, scale * 0.0


@triton.jit
def dot_codes(a, packed, BITS: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """a (M, N) DT · (codes of packed (R, N·BITS/8))ᵀ -> (M, R) fp32 (int8: the exact int32 sums), contracting over
    the packed axis. 2-bit codes with fp16 operands: one dot per code plane (code j of every byte: elements 4e + j)
    against the matching columns of a, split in registers, so the widened codes are never joined into one tile
    (1.07-1.55x faster on an H100; at 4 bits the same split was 0.8-1.0x, kernels/NOTES.md). Otherwise (4 bits,
    int8/fp8 operands, planes under 16 wide) one dot over the joined tile: Triton 3.6 rejects an int8 dot on split
    operands."""
    M: tl.constexpr = a.shape[0]
    NB: tl.constexpr = packed.shape[1]
    if DT == tl.float16 and BITS == 2 and NB >= 16:
        ay0, ay1 = tl.split(tl.reshape(a, (M, NB, 2, 2)))  # [m, e, x, y] = a[m, 4e + 2x + y] -> y = 0, 1
        a0, a2 = tl.split(ay0)
        a1, a3 = tl.split(ay1)
        out = tl.dot(a0, tl.trans(code_plane(packed, 0, BITS, DT, ASM)))
        out = tl.dot(a1, tl.trans(code_plane(packed, 2, BITS, DT, ASM)), out)
        out = tl.dot(a2, tl.trans(code_plane(packed, 4, BITS, DT, ASM)), out)
        out = tl.dot(a3, tl.trans(code_plane(packed, 6, BITS, DT, ASM)), out)
    else:
        out = tl.dot(a, tl.trans(unpack_codes(packed, BITS, DT, ASM)))
    return out.to(tl.float32)
