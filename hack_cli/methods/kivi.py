"""KIVI (Liu et al., ICML 2024): asymmetric 2-bit KV, keys per channel, values per token, a 16-bit residual.

Quantizer: hack's asymmetric round-to-nearest `quantize` (x̂ = mn + scale·code, fp16 mn/scale), `bits` wide.
Keys are quantized per channel over groups of G = `partition` consecutive tokens (key outliers live in channels);
values per token over groups of c = min(G, D) channels. The most recent tokens stay 16-bit in the residual.

Stored tensors of one layer (B sequences, H KV heads, D head dim, cap a multiple of G):
  k_codes (B, H, cap, D·b/8) uint8  key codes, token-major, channels packed 8/b per byte as in hack's `pack`
  k_mn, k_scale (B, H, cap/G, D) fp16  one pair per channel per group of G tokens
  v_codes (B, H, cap, D·b/8) uint8  value codes, same packing
  v_mn, v_scale (B, H, cap, D/c) fp16  one pair per token per group of c channels
  res_k, res_v (B, H, R+G-1, D) 16-bit  the residual, oldest token first
Sequence b has n_q[b] quantized tokens (positions 0..n_q-1, a multiple of G) and n_res[b] residual tokens
(positions n_q..n_q+n_res-1). With N tokens, n_q = max(0, (N - R) // G)·G: the residual holds N tokens while
N < R, then between R and R+G-1; when it would reach R+G its oldest G tokens are quantized as one key group, so
no key group is ever narrower than G tokens and no group is ever re-quantized. Values flush with the keys (KIVI
flushes values one token at a time; here they keep up to G-1 extra 16-bit tokens to share the keys' boundary).

Attention (`backend=reference`): dequantize everything into 16-bit K/V, then SDPA — `dequantize_kv` is a pure
function of the stored tensors, the reference a fused-dequant kernel must match.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from hack_cli.config import check_choice
from hack_cli.errors import ConfigError, HackError
from hack_cli.methods.base import Bytes, KVMethod, LayerKV, QuantConfig
from hack_cli.methods.dequant import grow, sdpa_over, unpack_codes
from hack_cli.methods.hack.quantizer import pack, quantize


@dataclass
class Config(QuantConfig):
    """`bits`: code width (KIVI uses 2 or 4). `partition`: G, tokens per key group and channels per value group."""

    name: str = "kivi"
    bits: int = 2
    partition: int = 32  # G
    residual: int = 128  # R: most recent tokens kept in 16 bits

    def __post_init__(self):
        super().__post_init__()
        if self.bits is None or self.partition is None:
            raise ConfigError("quant.bits" if self.bits is None else "quant.partition", None, "kivi needs a value")
        if self.residual < 0:
            raise ConfigError("quant.residual", self.residual, "expected >= 0")
        # auto = reference until the fused-dequant Triton kernel lands
        check_choice("quant.backend", self.backend, ("auto", "reference"))


def dequantize_kv(k_codes, k_mn, k_scale, v_codes, v_mn, v_scale, bits: int, group: int, vgroup: int):
    """Stored tensors (layout in the module docstring) over n tokens -> K̂, V̂ (B, H, n, D) fp32."""
    kc = unpack_codes(k_codes, bits).float()  # (B, H, n, D)
    B, H, n, D = kc.shape
    kc = kc.reshape(B, H, n // group, group, D)
    k = (k_mn.float()[:, :, :, None] + k_scale.float()[:, :, :, None] * kc).reshape(B, H, n, D)
    vc = unpack_codes(v_codes, bits).float().reshape(B, H, n, D // vgroup, vgroup)
    v = (v_mn.float()[..., None] + v_scale.float()[..., None] * vc).reshape(B, H, n, D)
    return k, v


def quantize_tokens(k: torch.Tensor, v: torch.Tensor, bits: int, group: int, vgroup: int,
                    where: str) -> dict[str, torch.Tensor]:
    """KIVI's stored tensors of k, v (..., n, D) fp32, n a multiple of G = group: keys per channel over each group
    of G tokens, values per token in groups of `vgroup` channels -> {k_codes (..., n, D·b/8), k_mn/k_scale
    (..., n/G, D), v_codes (..., n, D·b/8), v_mn/v_scale (..., n, D/vgroup)}."""
    *lead, n, D = k.shape
    blocks = k.reshape(*lead, n // group, group, D).transpose(-1, -2)  # (..., n/G, D, G): a key group runs along tokens
    codes, mn, scale, _ = quantize(blocks, bits, group, "nearest", torch.float16, where=where)
    out = {"k_codes": pack(codes.transpose(-1, -2).reshape(*lead, n, D), bits), "k_mn": mn[..., 0],
           "k_scale": scale[..., 0]}
    codes, mn, scale, _ = quantize(v, bits, vgroup, "nearest", torch.float16, where=where)
    out.update(v_codes=pack(codes, bits), v_mn=mn, v_scale=scale)
    return out


def token_span(name: str, t0: int, n: int, group: int) -> slice:
    """Where n new quantized tokens after the first t0 go along a stored tensor's token axis: per key group for
    k_mn/k_scale (t0 and n multiples of G = group), per token for the others."""
    return slice(t0 // group, (t0 + n) // group) if name in ("k_mn", "k_scale") else slice(t0, t0 + n)


class KiviLayerKV(LayerKV):
    def __init__(self, cfg: Config, layer_idx: int, batch, kv_heads, head_dim, device, dtype):
        super().__init__(batch, kv_heads, head_dim, device, dtype)
        self.cfg, self.layer_idx = cfg, layer_idx
        self.bits, self.group, self.residual = cfg.bits, cfg.partition, cfg.residual
        self.vgroup = min(cfg.partition, head_dim)  # c
        if head_dim % self.vgroup:
            raise HackError(f"kivi: head_dim {head_dim} does not split into value groups of {self.vgroup} channels")
        self.tail_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
        B, H, D, G = batch, kv_heads, head_dim, self.group
        self.n_q = torch.zeros(B, dtype=torch.long)
        self.n_res = torch.zeros(B, dtype=torch.long)
        dev, f16, u8 = self.device, torch.float16, torch.uint8
        self.t = {  # token axis is dim 2 everywhere
            "k_codes": torch.zeros(B, H, 0, D * self.bits // 8, dtype=u8, device=dev),
            "k_mn": torch.zeros(B, H, 0, D, dtype=f16, device=dev),
            "k_scale": torch.zeros(B, H, 0, D, dtype=f16, device=dev),
            "v_codes": torch.zeros(B, H, 0, D * self.bits // 8, dtype=u8, device=dev),
            "v_mn": torch.zeros(B, H, 0, D // self.vgroup, dtype=f16, device=dev),
            "v_scale": torch.zeros(B, H, 0, D // self.vgroup, dtype=f16, device=dev),
        }
        self.res = {x: torch.zeros(B, H, self.residual + G - 1, D, dtype=self.tail_dtype, device=dev) for x in "kv"}

    # ------------------------------------------------------------------------------------------ append
    def _append_seq(self, b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n_res, G = int(self.n_res[b]), self.group
        recent = {x: torch.cat([self.res[x][b, :, :n_res], new.to(self.tail_dtype)], 1)  # (H, n_res + T, D)
                  for x, new in (("k", k), ("v", v))}
        total = int(self.lengths[b]) + k.shape[1]
        flush = max(0, (total - self.residual) // G) * G - int(self.n_q[b])  # whole key groups only
        if flush:
            self._quantize_into(b, recent["k"][:, :flush].float(), recent["v"][:, :flush].float())
        keep = recent["k"].shape[1] - flush
        for x in "kv":
            self.res[x][b, :, :keep] = recent[x][:, flush:]
        self.n_res[b] = keep

    def _quantize_into(self, b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (H, n, D), n a multiple of G, appended after sequence b's quantized tokens."""
        n, G, t0 = k.shape[1], self.group, int(self.n_q[b])
        for name, t in self.t.items():
            per_group = name in ("k_mn", "k_scale")
            self.t[name] = grow(t, (t0 + n) // G if per_group else t0 + n)
        new = quantize_tokens(k, v, self.bits, G, self.vgroup, f"kivi layer {self.layer_idx}")
        for name, val in new.items():
            self.t[name][b, :, token_span(name, t0, n, G)] = val
        self.n_q[b] += n

    # ------------------------------------------------------------------------------------------ attend
    def materialize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """16-bit K, V (B, H, N, D) of the whole batch with each slot's position and validity (B, N)."""
        B, G = self.batch, self.group
        nq = int(self.n_q.max())
        t = {name: x[:, :, :nq // G if name in ("k_mn", "k_scale") else nq] for name, x in self.t.items()}
        kq, vq = dequantize_kv(t["k_codes"], t["k_mn"], t["k_scale"], t["v_codes"], t["v_mn"], t["v_scale"],
                               self.bits, G, self.vgroup)  # (B, H, nq, D)
        k = torch.cat([kq.to(self.tail_dtype), self.res["k"]], 2)  # (B, H, N, D)
        v = torch.cat([vq.to(self.tail_dtype), self.res["v"]], 2)
        slot_q, slot_r = torch.arange(nq).expand(B, nq), torch.arange(self.res["k"].shape[2]).expand(B, -1)
        pos = torch.cat([slot_q, self.n_q[:, None] + slot_r], 1)  # (B, N)
        ok = torch.cat([slot_q < self.n_q[:, None], slot_r < self.n_res[:, None]], 1)
        return k, v, pos, ok

    def attend(self, q: torch.Tensor, scaling: float, window: Optional[int] = None) -> torch.Tensor:
        k, v, pos, ok = self.materialize()
        return sdpa_over(q, k, v, pos, ok, self.q_pos[:, -q.shape[2]:], scaling, window)

    # ------------------------------------------------------------------------------------------ bytes / wire
    def seq_bytes(self, b: int) -> Bytes:
        H, D, G = self.kv_heads, self.head_dim, self.group
        nq, nr = int(self.n_q[b]), int(self.n_res[b])
        tail = torch.finfo(self.tail_dtype).bits // 8
        return Bytes(codes=2 * H * nq * D * self.bits // 8,
                     meta=2 * H * (nq // G) * D * 2 + 2 * H * nq * (D // self.vgroup) * 2,  # (mn, scale) fp16
                     fp16=2 * H * nr * D * tail)

    def stored_bytes(self) -> Bytes:
        return sum((self.seq_bytes(b) for b in range(self.batch)), Bytes())

    def export_seq(self, b: int) -> dict[str, torch.Tensor]:
        nq, nr, G = int(self.n_q[b]), int(self.n_res[b]), self.group
        out = {name: t[b, :, :nq // G if name in ("k_mn", "k_scale") else nq].clone() for name, t in self.t.items()}
        out.update({f"res_{x}": self.res[x][b, :, :nr].clone() for x in "kv"})
        return out

    def import_seq(self, b: int, state: dict[str, torch.Tensor]) -> None:
        if int(self.lengths[b]):
            raise HackError("kivi: import_seq installs a transferred sequence into an empty slot")
        nq, nr = state["k_codes"].shape[1], state["res_k"].shape[1]
        for name in self.t:
            self.t[name] = grow(self.t[name], state[name].shape[1])
            self.t[name][b, :, :state[name].shape[1]] = state[name]
        for x in "kv":
            self.res[x][b, :, :nr] = state[f"res_{x}"]
        self.n_q[b], self.n_res[b] = nq, nr
        self.lengths[b] = nq + nr


class Method(KVMethod):
    def new_layer(self, layer_idx, num_layers, batch, kv_heads, head_dim, device, dtype):
        return KiviLayerKV(self.config, layer_idx, batch, kv_heads, head_dim, device, dtype)
