"""The uncompressed baseline: K and V kept (and sent) as they are, in 16 bits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from hack_cli.methods.base import Bytes, KVMethod, LayerKV, QuantConfig, key_mask


@dataclass
class Config(QuantConfig):
    """`bits` and `partition` have no meaning for fp16; they exist only so sweeps can cross methods."""

    name: str = "fp16"


class FP16LayerKV(LayerKV):
    """K/V (B, H, capacity, D) in the model's 16-bit dtype (fp16 for an fp32 CPU model), grown by doubling."""

    def __init__(self, batch, kv_heads, head_dim, device, dtype):
        super().__init__(batch, kv_heads, head_dim, device, dtype)
        self.store_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
        self.kv = {x: torch.zeros(batch, kv_heads, 0, head_dim, dtype=self.store_dtype, device=self.device)
                   for x in "kv"}

    def _append_seq(self, b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        start, n = int(self.lengths[b]), k.shape[1]
        cap = self.kv["k"].shape[2]
        if start + n > cap:
            grow = max(start + n, 2 * cap) - cap
            for x in "kv":
                pad = self.kv[x].new_zeros(self.batch, self.kv_heads, grow, self.head_dim)
                self.kv[x] = torch.cat([self.kv[x], pad], 2)
        self.kv["k"][b, :, start:start + n] = k.to(self.store_dtype)
        self.kv["v"][b, :, start:start + n] = v.to(self.store_dtype)

    def attend(self, q: torch.Tensor, scaling: float, window: Optional[int] = None) -> torch.Tensor:
        B, Hq, Tq, D = q.shape
        n = int((self.lengths).max())
        k, v = (self.kv[x][:, :, :n].to(q.dtype) for x in "kv")  # (B, H, N, D)
        pos = torch.arange(n).expand(B, n)
        ok = key_mask(pos, pos < self.lengths[:, None], self.q_pos[:, -Tq:], window).to(q.device)  # (B, 1, Tq, N)
        mask = None if bool(ok.all()) else ok  # no mask lets CUDA pick its fused kernels (decode, equal lengths)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=Hq != k.shape[1])
        return out.masked_fill(~ok.any(-1, keepdim=True), 0.0)  # padding queries see nothing

    def stored_bytes(self) -> Bytes:
        return Bytes(fp16=2 * int(self.lengths.sum()) * self.kv_heads * self.head_dim * 2)

    def export_seq(self, b: int) -> dict[str, torch.Tensor]:
        n = int(self.lengths[b])
        return {x: self.kv[x][b, :, :n].clone() for x in "kv"}

    def import_seq(self, b: int, state: dict[str, torch.Tensor]) -> None:
        self._append_seq(b, state["k"], state["v"])
        self.lengths[b] += state["k"].shape[1]


class Method(KVMethod):
    def new_layer(self, layer_idx, num_layers, batch, kv_heads, head_dim, device, dtype):
        return FP16LayerKV(batch, kv_heads, head_dim, device, dtype)
