"""The homomorphic products of HACK.md §3–4 in PyTorch: the reference the Triton kernels must match.

Every product is an integer matmul of codes plus rank-1 corrections; K and V are never dequantized.

Codes enter the integer product *centered*, k'' = k' - z with z = 2^(b-1) (signed, as int8 tensor cores want),
and the center moves into the min term exactly: m + s·k' = (m + s·z) + s·k''. This matters for the channel
layout, where each block quantizes its own q̃ (or P̃): the int8 rounding error of q̃ then multiplies small signed
codes instead of codes near 2^(b-1), which would add a different offset to every block's scores (measured: 30%
attention error at 8 bits on a small random Phi-3 without centering, 0.1% with it). Sums are centered the same way
(Σk'' = Σk' - n·z), so the cached sums stay the plain code sums.
Notation: R query rows (GQA: the query heads of one KV head times the query tokens), N keys, NB blocks of Π
tokens, D head dim, G channel groups of c = D/G channels. Leading batch axes (...) broadcast.
"""
from __future__ import annotations

import torch

from hack_cli.methods.hack.quantizer import quantize_int8


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer product of code tensors, returned as float.

    fp32 holds every integer below 2^24 exactly; the largest sum here is 128 * 255 * 128 < 2^23, so an fp32 GEMM
    on CPU is exact. CUDA may run fp32 GEMMs in TF32, so the reference uses fp64 there.
    """
    dt = torch.float32 if a.device.type == "cpu" else torch.float64
    return torch.matmul(a.to(dt), b.to(dt)).float()


def split_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(..., D) -> (..., G, c)."""
    return x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)


# ------------------------------------------------------------------------------------- token layout (arXiv v1)
def centered(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned b-bit codes -> signed codes k'' = k' - 2^(b-1) (int8 for b <= 8)."""
    return (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)


def scores_token_k(q: torch.Tensor, k_codes: torch.Tensor, k_mn: torch.Tensor, k_scale: torch.Tensor,
                   k_sum: torch.Tensor, bits: int) -> torch.Tensor:
    """q·K̂ᵀ with K quantized per token in channel groups, Q quantized to int8 per the same groups.

    q: (..., R, D) float; k_codes: (..., N, D); k_mn, k_scale, k_sum: (..., N, G) -> scores (..., R, N).
    """
    groups, z = k_mn.shape[-1], 2 ** (bits - 1)
    c = q.shape[-1] // groups
    q8, q_mn, q_scale = quantize_int8(q, c)  # (..., R, D), (..., R, G), (..., R, G)
    qg = split_groups(q8, groups).transpose(-3, -2)  # (..., G, R, c)
    kg = split_groups(centered(k_codes, bits), groups).permute(*range(k_codes.dim() - 2), -2, -1, -3)  # (.., G,c,N)
    dot = int_matmul(qg, kg)  # (..., G, R, N): Σ_j q'_ij k''_nj per group
    q_sum = split_groups(q8, groups).float().sum(-1).transpose(-1, -2)[..., None]  # (..., G, R, 1)
    sq, mq = q_scale.transpose(-1, -2)[..., None], q_mn.transpose(-1, -2)[..., None]  # (..., G, R, 1)
    sk = k_scale.float().transpose(-1, -2)[..., None, :]  # (..., G, 1, N)
    mk = (k_mn.float() + k_scale.float() * z).transpose(-1, -2)[..., None, :]  # centered min
    ksum = (k_sum.float() - c * z).transpose(-1, -2)[..., None, :]  # Σ k'' per group: (..., G, 1, N)
    return (sq * sk * dot + sq * mk * q_sum + mq * sk * ksum + c * mq * mk).sum(-3)  # (..., R, N)


def values_token_v(p: torch.Tensor, tok_ok: torch.Tensor, v_codes: torch.Tensor, v_mn: torch.Tensor,
                   v_scale: torch.Tensor, v_sum: torch.Tensor, bits: int) -> torch.Tensor:
    """P·V̂ with V quantized per channel over blocks of Π tokens, P quantized to int8 per row per block.

    p: (..., R, NB, Π) attention probabilities; tok_ok: (..., NB, Π) which slots hold tokens;
    v_codes: (..., NB, Π, D); v_mn, v_scale, v_sum: (..., NB, D) -> out (..., R, D).
    """
    part, z = p.shape[-1], 2 ** (bits - 1)
    p8, p_mn, p_scale = quantize_int8(p, part)  # (..., R, NB, Π), (..., R, NB, 1), (..., R, NB, 1)
    p8 = p8.float() * tok_ok[..., None, :, :]  # empty slots contribute nothing
    dot = int_matmul(p8.transpose(-3, -2), centered(v_codes, bits))  # (..., NB, R, D)
    p_sum = p8.sum(-1).transpose(-1, -2)[..., None]  # (..., NB, R, 1)
    count = tok_ok.float().sum(-1)[..., None, None]  # (..., NB, 1, 1)
    sp, mp = p_scale.transpose(-3, -2), p_mn.transpose(-3, -2)  # (..., NB, R, 1)
    sv = v_scale.float()[..., None, :]  # (..., NB, 1, D)
    mv = (v_mn.float() + v_scale.float() * z)[..., None, :]  # centered min
    vs = v_sum.float()[..., None, :] - count * z  # Σ over the block's tokens of v'': (..., NB, 1, D)
    return (sp * sv * dot + sp * mv * p_sum + mp * sv * vs + count * mp * mv).sum(-3)  # (..., R, D)


# ---------------------------------------------------------------------------------- channel layout (artifact)
def scores_channel_k(q: torch.Tensor, k_codes: torch.Tensor, k_mn: torch.Tensor, k_scale: torch.Tensor,
                     k_sum: torch.Tensor, bits: int) -> torch.Tensor:
    """q·K̂ᵀ with K quantized per channel over blocks of Π tokens: K's scale folded into q, q̃ quantized to int8.

    q: (..., R, D); k_codes: (..., NB, Π, D); k_mn, k_scale: (..., NB, D); k_sum: (..., NB, Π, G)
    -> scores (..., R, NB, Π).
    """
    groups, z = k_sum.shape[-1], 2 ** (bits - 1)
    c = q.shape[-1] // groups
    q_t = q.float()[..., None, :, :] * k_scale.float()[..., :, None, :]  # q̃: (..., NB, R, D)
    q8, q_mn, q_scale = quantize_int8(q_t, c)  # (..., NB, R, D), (..., NB, R, G) x2
    qg = split_groups(q8, groups).transpose(-3, -2)  # (..., NB, G, R, c)
    kg = split_groups(centered(k_codes, bits), groups).permute(*range(k_codes.dim() - 2), -2, -1, -3)  # (.,NB,G,c,Π)
    dot = int_matmul(qg, kg)  # (..., NB, G, R, Π)
    ksum = (k_sum.float() - c * z).transpose(-1, -2)[..., None, :]  # Σ k'' per group: (..., NB, G, 1, Π)
    s = (q_scale.transpose(-1, -2)[..., None] * dot + q_mn.transpose(-1, -2)[..., None] * ksum).sum(-3)
    k_min = k_mn.float() + k_scale.float() * z  # centered min: (..., NB, D)
    s = s + torch.matmul(q.float()[..., None, :, :], k_min[..., :, :, None])  # + q·m^K: (..., NB, R, 1)
    return s.transpose(-3, -2)  # (..., R, NB, Π)


def values_channel_v(p: torch.Tensor, v_codes: torch.Tensor, v_mn: torch.Tensor, v_scale: torch.Tensor,
                     v_sum: torch.Tensor, bits: int) -> torch.Tensor:
    """P·V̂ with V quantized per token in channel groups: V's scale folded into P, P̃ quantized over a block's tokens.

    p: (..., R, NB, Π); v_codes: (..., NB, Π, D); v_mn, v_scale: (..., NB, Π, G); v_sum: (..., NB, D)
    -> out (..., R, D). Empty slots must hold zero codes, min and scale (so they add nothing).
    """
    groups, z = v_mn.shape[-1], 2 ** (bits - 1)
    p_t = p.float()[..., :, :, :, None] * v_scale.float()[..., None, :, :, :]  # P̃: (..., R, NB, Π, G)
    p_t = p_t.movedim(-1, -2)  # (..., R, NB, G, Π)
    p8, p_mn, p_scale = quantize_int8(p_t, p_t.shape[-1])  # (..., R, NB, G, Π), (..., R, NB, G, 1) x2
    vg = split_groups(centered(v_codes, bits), groups).movedim(-2, -3)  # (..., NB, G, Π, c)
    dot = int_matmul(p8.movedim(-4, -2), vg)  # (..., NB, G, R, c)
    vs = split_groups(v_sum.float() - v_codes.shape[-2] * z, groups)[..., None, :]  # Σ_t v'': (..., NB, G, 1, c)
    sp, mp = p_scale.movedim(-4, -2), p_mn.movedim(-4, -2)  # (..., NB, G, R, 1)
    out = (sp * dot + mp * vs).sum(-4)  # (..., G, R, c)
    out = out.movedim(-3, -2).flatten(-2)  # (..., R, D)
    v_min = v_mn.float() + v_scale.float() * z  # centered min: (..., NB, Π, G)
    mins = torch.einsum("...rbt,...btg->...rg", p.float(), v_min)  # Σ_t P_t m^V_{t,g}: (..., R, G)
    return out + mins.repeat_interleave(out.shape[-1] // groups, dim=-1)
