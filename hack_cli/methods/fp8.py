"""FP8 KV (e4m3), the production KV format of vLLM: one amax-based scale per sequence, layer, KV head and tensor.

x̂ = scale · fp8(x / scale) with scale = amax|x| / 448 (the e4m3 maximum), computed from the sequence's first
append (its prompt) and then fixed, as vLLM's per-head k_scale/v_scale are: later tokens that exceed the range
saturate at ±448·scale. Attention dequantizes to 16-bit K/V, then SDPA.

Stored tensors of one layer (B sequences, H KV heads, D head dim):
  k_codes, v_codes (B, H, cap, D) float8_e4m3fn
  k_scale, v_scale (B, H) fp32 (vLLM keeps its scales in fp32)
`bits` and `partition` are unused (FP8 is 8 bits with one scale per head); they exist for cross-method sweeps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from hack_cli.errors import HackError
from hack_cli.methods.base import Bytes, KVMethod, LayerKV, QuantConfig
from hack_cli.methods.dequant import grow, sdpa_over
from hack_cli.methods.hack.quantizer import check_finite

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


@dataclass
class Config(QuantConfig):
    name: str = "fp8"


class FP8LayerKV(LayerKV):
    def __init__(self, cfg: Config, layer_idx: int, batch, kv_heads, head_dim, device, dtype):
        super().__init__(batch, kv_heads, head_dim, device, dtype)
        self.layer_idx = layer_idx
        self.tail_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
        B, H, D = batch, kv_heads, head_dim
        self.codes = {x: torch.zeros(B, H, 0, D, dtype=FP8, device=self.device) for x in "kv"}
        self.scale = {x: torch.zeros(B, H, dtype=torch.float32, device=self.device) for x in "kv"}

    def _append_seq(self, b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        start, n = int(self.lengths[b]), k.shape[1]
        for x, new in (("k", k), ("v", v)):
            new = new.to(self.tail_dtype).float()  # (H, n, D) as a serving model makes it
            check_finite(new, f"fp8 layer {self.layer_idx} {x.upper()}")
            if start == 0:  # the prompt sets the per-head scale
                amax = new.abs().amax((-2, -1))  # (H,)
                self.scale[x][b] = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
            self.codes[x] = grow(self.codes[x], start + n)
            scaled = (new / self.scale[x][b][:, None, None]).clamp(-FP8_MAX, FP8_MAX)
            self.codes[x][b, :, start:start + n] = scaled.to(FP8)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """16-bit K, V (B, H, N, D) of the whole batch (N = the longest sequence)."""
        n = int(self.lengths.max())
        return tuple((self.codes[x][:, :, :n].float() * self.scale[x][:, :, None, None]).to(self.tail_dtype)
                     for x in "kv")

    def attend(self, q: torch.Tensor, scaling: float, window: Optional[int] = None) -> torch.Tensor:
        k, v = self.materialize()
        pos = torch.arange(k.shape[2]).expand(self.batch, -1)  # (B, N)
        return sdpa_over(q, k, v, pos, pos < self.lengths[:, None], self.q_pos[:, -q.shape[2]:], scaling, window)

    def seq_bytes(self, b: int) -> Bytes:
        n = int(self.lengths[b])
        return Bytes(codes=2 * self.kv_heads * n * self.head_dim, meta=2 * self.kv_heads * 4 if n else 0)

    def stored_bytes(self) -> Bytes:
        return sum((self.seq_bytes(b) for b in range(self.batch)), Bytes())

    def export_seq(self, b: int) -> dict[str, torch.Tensor]:
        n = int(self.lengths[b])
        return {**{f"{x}_codes": self.codes[x][b, :, :n].clone() for x in "kv"},
                **{f"{x}_scale": self.scale[x][b].clone() for x in "kv"}}

    def import_seq(self, b: int, state: dict[str, torch.Tensor]) -> None:
        if int(self.lengths[b]):
            raise HackError("fp8: import_seq installs a transferred sequence into an empty slot")
        n = state["k_codes"].shape[1]
        for x in "kv":
            self.codes[x] = grow(self.codes[x], n)
            self.codes[x][b, :, :n] = state[f"{x}_codes"]
            self.scale[x][b] = state[f"{x}_scale"]
        self.lengths[b] = n


class Method(KVMethod):
    def new_layer(self, layer_idx, num_layers, batch, kv_heads, head_dim, device, dtype):
        return FP8LayerKV(self.config, layer_idx, batch, kv_heads, head_dim, device, dtype)
