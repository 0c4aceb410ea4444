"""Where HackLayerKV (hack_cli/methods/hack/store.py) hands work to the Triton kernels.

The store calls these only when `cfg.backend` is triton, or auto on CUDA. Each returns None/False when its kernel does
not cover the case (prefill chunks, sliding windows, 8-bit codes, the ablations), and the store's PyTorch reference
runs instead.
"""
from __future__ import annotations

from typing import Optional

import torch

from hack_kernels.decode import from_layer, hack_decode
from hack_kernels.quantize import quantize_blocks


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0  # tl.dot tiles: powers of two, >= 16 (Π >= 32: int8 dots need K >= 32)


def covered(layer) -> bool:
    cfg = layer.cfg
    return (layer.bits in (2, 4) and cfg.summation_elimination and cfg.requant_elimination
            and _pow2(layer.head_dim) and _pow2(layer.part) and _pow2(layer.group) and layer.part >= 32)


def attend(layer, q: torch.Tensor, scaling: float, window: Optional[int]) -> Optional[torch.Tensor]:
    """Decode step (one query token per sequence, no window): the homomorphic decode kernel, else None."""
    if q.shape[2] != 1 or window is not None or not covered(layer):
        return None
    out = hack_decode(from_layer(layer), q[:, :, 0], scaling, operand=layer.cfg.operand,
                      max_blocks=int(layer.n_closed.max()))  # (B, Hq, D)
    active = layer.q_pos[:, -1] >= 0  # (B,) host
    if not bool(active.all()):  # padding queries see nothing
        out = out * active.to(out.device)[:, None, None].to(out.dtype)
    return out[:, :, None]


def block_seed(layer) -> int:
    """The quantize kernel's seed: drawn from the layer's generator under stochastic rounding, else 0."""
    if layer.cfg.rounding != "stochastic":
        return 0
    return int(torch.randint(2**31 - 1, (1,), generator=layer.gen, device=layer.gen.device))


def quantize_layer_blocks(layer, x: str, blocks: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Whole blocks (N, Π, D) of K or V (x) quantized as `layer` stores them (its bits, groups, kind, rounding,
    metadata dtype; V packed along tokens): `quantize_blocks`' dict. N: one layer's blocks or several layers'."""
    return quantize_blocks(blocks, layer.bits, layer.group, layer.kind[x] == "per_channel", x == "k",
                           layer.cfg.rounding, seed, layer.meta_dtype, along_tokens=x == "v")


def quantize_into(layer, b: int, x: str, slot0: int, vals: torch.Tensor) -> bool:
    """Whole blocks of raw values vals (H, n, D) into sequence b's blocks from slot0: the one-pass kernel."""
    H, n, D = vals.shape
    P = layer.part
    beta0, off = divmod(slot0, P)
    if off or n % P or not n or not covered(layer):
        return False
    nb = n // P
    layer._grow(beta0 + nb)
    res = quantize_layer_blocks(layer, x, vals.reshape(H * nb, P, D), block_seed(layer))
    t, sl = layer.blocks, (b, slice(None), slice(beta0, beta0 + nb))
    t[f"{x}_codes"][sl] = res["codes"].view(H, nb, *res["codes"].shape[1:])
    meta = (H, nb, D) if layer.kind[x] == "per_channel" else (H, nb, P, layer.groups)
    t[f"{x}_mn"][sl] = res["mn"].view(meta)
    t[f"{x}_scale"][sl] = res["scale"].view(meta)
    t[f"{x}_sum"][sl] = res["sums"].view((H, nb, P, layer.groups) if x == "k" else (H, nb, D))
    return True
