"""The uncompressed baseline: K and V kept (and sent) as they are, in 16 bits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from hack_cli.methods.base import Bytes, KVMethod, LayerKV, QuantConfig
from hack_cli.methods.dequant import grow, sdpa_over


@dataclass
class Config(QuantConfig):
    """`bits` and `partition` have no meaning for fp16; they exist only so sweeps can cross methods."""

    name: str = "fp16"


class FP16LayerKV(LayerKV):
    """K/V (B, H, capacity, D) in the model's 16-bit dtype (fp16 for an fp32 CPU model), grown geometrically."""

    def __init__(self, batch, kv_heads, head_dim, device, dtype):
        super().__init__(batch, kv_heads, head_dim, device, dtype)
        self.store_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
        self.kv = {x: torch.zeros(batch, kv_heads, 0, head_dim, dtype=self.store_dtype, device=self.device)
                   for x in "kv"}

    def _append_seq(self, b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        start, n = int(self.lengths[b]), k.shape[1]
        for x in "kv":
            self.kv[x] = grow(self.kv[x], start + n)
        self.kv["k"][b, :, start:start + n] = k.to(self.store_dtype)
        self.kv["v"][b, :, start:start + n] = v.to(self.store_dtype)

    def attend(self, q: torch.Tensor, scaling: float, window: Optional[int] = None) -> torch.Tensor:
        n = int(self.lengths.max())
        pos = torch.arange(n).expand(self.batch, n)  # (B, N)
        k, v = (self.kv[x][:, :, :n] for x in "kv")  # (B, H, N, D)
        return sdpa_over(q, k, v, pos, pos < self.lengths[:, None], self.q_pos[:, -q.shape[2]:], scaling, window)

    def seq_bytes(self, b: int) -> Bytes:
        return Bytes(fp16=2 * int(self.lengths[b]) * self.kv_heads * self.head_dim * 2)

    def stored_bytes(self) -> Bytes:
        return sum((self.seq_bytes(b) for b in range(self.batch)), Bytes())

    def export_seq(self, b: int) -> dict[str, torch.Tensor]:
        n = int(self.lengths[b])
        return {x: self.kv[x][b, :, :n].clone() for x in "kv"}

    def import_seq(self, b: int, state: dict[str, torch.Tensor]) -> None:
        self._append_seq(b, state["k"], state["v"])
        self.lengths[b] += state["k"].shape[1]


class Method(KVMethod):
    def new_layer(self, layer_idx, num_layers, batch, kv_heads, head_dim, device, dtype):
        return FP16LayerKV(batch, kv_heads, head_dim, device, dtype)
