"""KVQuant (Hooper et al., NeurIPS 2024): non-uniform 2-bit KV with dense-and-sparse outliers, keys before RoPE.

Per layer, from a calibration file (`hack calibrate kvquant`, see `kvquant_calib.py`):
  * keys, per channel: outlier thresholds [lo, hi] (the fraction/2 and 1 - fraction/2 quantiles of calibration
    keys) and 2^b levels in [-1, 1] fitted by 1-D k-means on the channel's normalized inliers (x - zero) / half,
    zero = (hi + lo)/2, half = (hi - lo)/2. Keys outside [lo, hi] are outliers.
  * values, per token: the `outlier_fraction` largest |v| of the token (over all its KV heads) are outliers; each
    (token, head) is normalized by its inliers' own range (zero, half in fp16, computed online) onto the layer's
    2^b k-means levels.
Codes are indices of the nearest level; outliers keep their exact 16-bit value in a sparse layout; the first
`sink_tokens` tokens stay 16-bit (attention sinks). Plain k-means: the paper weights it by Fisher information.

Pre-RoPE keys: the HF attention hands the cache keys *after* RoPE, so the store inverts the rotation at each
token's position with the model's own inverse frequencies (recorded at calibration; a rotation is exactly
invertible), quantizes the pre-RoPE key, and re-applies RoPE after dequantizing, before attention. Positions are
the sequence's own token indices; if a caller's position ids differ by a constant offset the key is quantized in a
slightly rotated basis but re-rotated exactly, so attention stays correct. `pre_rope=false` quantizes post-RoPE
keys with their own calibrated statistics (the ablation).

Stored tensors of one layer (B sequences, H KV heads, D head dim, S sinks; slot j is position S + j):
  sink_k, sink_v (B, H, S, D) 16-bit       sink tokens (K after RoPE)
  k_codes, v_codes (B, H, cap, D·b/8) uint8 level indices packed as in hack's `pack`
  v_zero, v_half (B, H, cap) fp16           per-token, per-head value normalization
  per sequence, CSR over its quantized tokens (slot order):
  k_count (n,) int16, k_idx (nnz,) int16 = h·D + d, k_val (nnz,) 16-bit     key outliers (pre-RoPE values)
  v_idx (n, o) int16, v_val (n, o) 16-bit                                   value outliers, o per token
Levels, thresholds and RoPE tables are per model (like the weights), not per sequence: they are not sent.
`partition` is unused (KVQuant has no groups); `bits` is the code width of the nuq levels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from hack_cli.errors import ConfigError, HackError
from hack_cli.methods.base import Bytes, KVMethod, LayerKV, QuantConfig
from hack_cli.methods.dequant import grow, sdpa_over, unpack_codes
from hack_cli.methods.hack.quantizer import check_finite, pack


@dataclass
class Config(QuantConfig):
    name: str = "kvquant"
    bits: int = 2
    outlier_fraction: float = 0.01  # per vector, kept in 16 bits (sparse)
    sink_tokens: int = 1  # leading tokens kept in 16 bits
    pre_rope: bool = True  # quantize keys before RoPE (the paper); false: after (ablation)
    calibration: Optional[str] = None  # file written by `hack calibrate kvquant`

    def __post_init__(self):
        super().__post_init__()
        if self.bits is None:
            raise ConfigError("quant.bits", None, "kvquant needs a value")
        if not 0 <= self.outlier_fraction < 0.5:
            raise ConfigError("quant.outlier_fraction", self.outlier_fraction, "expected 0 <= fraction < 0.5")
        if self.sink_tokens < 0:
            raise ConfigError("quant.sink_tokens", self.sink_tokens, "expected >= 0")


# ---------------------------------------------------------------------------------------------- RoPE
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return torch.cat([-x2, x1], -1)


def rope_cos_sin(inv_freq: torch.Tensor, scaling: float, pos: torch.Tensor):
    """inv_freq (R/2,), pos (n,) -> cos, sin (n, R), computed as transformers' rotary embeddings do (fp32)."""
    freqs = pos.float()[:, None] * inv_freq.float()[None]  # (n, R/2)
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos() * scaling, emb.sin() * scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., n, D); cos, sin (n, R), R <= D (partial rotary leaves channels R.. as they are)."""
    r = cos.shape[-1]
    return torch.cat([x[..., :r] * cos + rotate_half(x[..., :r]) * sin, x[..., r:]], -1)


def invert_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The exact inverse of `apply_rope` (rotation by -θ, divided by the attention scaling squared)."""
    r = cos.shape[-1]
    a2 = cos[..., :1] ** 2 + sin[..., :1] ** 2  # (n, 1): scaling² (cos² + sin² = 1)
    return torch.cat([(x[..., :r] * cos - rotate_half(x[..., :r]) * sin) / a2, x[..., r:]], -1)


# ---------------------------------------------------------------------------------------------- quantizer
def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """x (...), levels (..., L) sorted, broadcastable -> index of the nearest level (...) uint8."""
    mids = (levels[..., 1:] + levels[..., :-1]) / 2  # (..., L-1)
    return (x[..., None] > mids).sum(-1).to(torch.uint8)


def key_outliers(k: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """k (H, n, D), lo/hi (H, D) -> (H, n, D) bool: outside the channel's calibrated range."""
    return (k < lo[:, None]) | (k > hi[:, None])


def quantize_keys(k: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """k (H, n, D), levels (H, D, L) -> codes (H, n, D). Outliers get the code of their clamped value."""
    zero, half = (hi + lo) / 2, ((hi - lo) / 2).clamp_min(1e-8)  # (H, D)
    norm = ((k - zero[:, None]) / half[:, None]).clamp(-1, 1)
    return nearest_level(norm, levels[:, None])


def value_outliers(v: torch.Tensor, count: int) -> torch.Tensor:
    """v (H, n, D) -> (H, n, D) bool marking each token's `count` largest |v| over all its heads."""
    H, n, D = v.shape
    mask = torch.zeros(n, H * D, dtype=torch.bool, device=v.device)
    if count:
        top = v.abs().transpose(0, 1).reshape(n, H * D).topk(count, -1).indices  # (n, count)
        mask.scatter_(1, top, True)
    return mask.reshape(n, H, D).transpose(0, 1)


def value_range(v: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (head, token) zero and half-range of the inliers, rounded to fp16: (H, n) each."""
    lo = torch.where(out, torch.inf, v).amin(-1)
    hi = torch.where(out, -torch.inf, v).amax(-1)
    lo, hi = torch.where(lo > hi, 0.0, lo), torch.where(lo > hi, 0.0, hi)  # every element an outlier
    zero = ((hi + lo) / 2).half()
    half = ((hi - lo) / 2).half()
    return zero, torch.where(half == 0, torch.ones_like(half), half)


def quantize_values(v, zero, half, levels):
    """v (H, n, D), zero/half (H, n), levels (L,) -> codes (H, n, D)."""
    norm = ((v - zero.float()[..., None]) / half.float()[..., None]).clamp(-1, 1)
    return nearest_level(norm, levels)


# ---------------------------------------------------------------------------------------------- calibration
CALIBRATE_HINT = "run `hack calibrate kvquant model=<model name>` and point quant.calibration at its file"


def load_calibration(path: Optional[str], bits: int, fraction: float) -> tuple[dict, dict]:
    """(tensors, metadata) of a calibration file, checked against the method's settings."""
    from safetensors import safe_open

    if path is None or not Path(path).expanduser().exists():
        where = "quant.calibration is not set" if path is None else f"{path} does not exist"
        raise HackError(f"kvquant is not calibrated ({where}): {CALIBRATE_HINT}")
    with safe_open(str(Path(path).expanduser()), "pt") as f:
        meta, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    if int(meta["bits"]) != bits or abs(float(meta["outlier_fraction"]) - fraction) > 1e-9:
        raise HackError(f"kvquant calibration {path} has bits={meta['bits']}, outlier_fraction="
                        f"{meta['outlier_fraction']}, not {bits}, {fraction}: {CALIBRATE_HINT} with those settings")
    return tensors, meta


# ---------------------------------------------------------------------------------------------- store
class KVQuantLayerKV(LayerKV):
    def __init__(self, cfg: Config, calib: dict, layer_idx: int, batch, kv_heads, head_dim, device, dtype):
        super().__init__(batch, kv_heads, head_dim, device, dtype)
        self.cfg, self.layer_idx, self.bits, self.sinks = cfg, layer_idx, cfg.bits, cfg.sink_tokens
        self.tail_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
        which = "pre" if cfg.pre_rope else "post"
        dev = self.device
        self.k_lo, self.k_hi = (calib[f"key_{e}_{which}"][layer_idx].float().to(dev) for e in ("lo", "hi"))  # (H, D)
        self.k_levels = calib[f"key_levels_{which}"][layer_idx].float().to(dev)  # (H, D, L)
        zero, half = (self.k_hi + self.k_lo) / 2, ((self.k_hi - self.k_lo) / 2).clamp_min(1e-8)  # (H, D)
        L = self.k_levels.shape[-1]
        self.k_table = (zero[..., None] + half[..., None] * self.k_levels).reshape(-1)  # (H·D·L,) value per code
        self.k_base = (torch.arange(kv_heads * head_dim, device=dev, dtype=torch.int32) * L).reshape(
            kv_heads, 1, head_dim)  # (H, 1, D): where each channel's entries start in k_table
        self.v_levels = calib["value_levels"][layer_idx].float().to(dev)  # (L,)
        self.inv_freq = calib["rope_inv_freq"][layer_idx].float().to(dev)  # (R/2,)
        self.rope_scaling = float(calib["rope_scaling"][layer_idx])
        self.rope = rope_cos_sin(self.inv_freq, self.rope_scaling, torch.arange(0, device=dev))  # grown on demand
        self.v_count = round(cfg.outlier_fraction * kv_heads * head_dim)  # value outliers per token
        B, H, D, S = batch, kv_heads, head_dim, self.sinks
        self.sink = {x: torch.zeros(B, H, S, D, dtype=self.tail_dtype, device=dev) for x in "kv"}
        self.t = {"k_codes": torch.zeros(B, H, 0, D * self.bits // 8, dtype=torch.uint8, device=dev),
                  "v_codes": torch.zeros(B, H, 0, D * self.bits // 8, dtype=torch.uint8, device=dev),
                  "v_zero": torch.zeros(B, H, 0, dtype=torch.float16, device=dev),
                  "v_half": torch.zeros(B, H, 0, dtype=torch.float16, device=dev)}
        empty = lambda *shape, dtype=torch.int16: torch.zeros(*shape, dtype=dtype, device=dev)
        o = self.v_count
        self.sparse = [{"k_count": empty(0), "k_idx": empty(0), "k_val": empty(0, dtype=self.tail_dtype),
                        "v_idx": empty(0, o), "v_val": empty(0, o, dtype=self.tail_dtype)} for _ in range(B)]

    def _cos_sin(self, pos: torch.Tensor):
        """RoPE cos, sin (n, R) at positions pos (n,), from a table of positions grown by doubling."""
        need = int(pos.max()) + 1 if pos.numel() else 0
        if need > self.rope[0].shape[0]:
            size = max(need, 2 * self.rope[0].shape[0])
            self.rope = rope_cos_sin(self.inv_freq, self.rope_scaling, torch.arange(size, device=self.device))
        pos = pos.to(self.device)
        return self.rope[0][pos], self.rope[1][pos]

    def n_quant(self, b: int) -> int:
        return max(0, int(self.lengths[b]) - self.sinks)

    # ------------------------------------------------------------------------------------------ append
    def _append_seq(self, b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        start, S = int(self.lengths[b]), self.sinks
        k, v = k.to(self.tail_dtype), v.to(self.tail_dtype)  # quantize what a serving model holds
        take = max(0, min(S - start, k.shape[1]))
        if take:
            self.sink["k"][b, :, start:start + take] = k[:, :take]
            self.sink["v"][b, :, start:start + take] = v[:, :take]
        k, v = k[:, take:].float(), v[:, take:].float()  # (H, n, D)
        n = k.shape[1]
        if not n:
            return
        where = f"kvquant layer {self.layer_idx}"
        check_finite(k, where + " K")
        check_finite(v, where + " V")
        if self.cfg.pre_rope:
            k = invert_rope(k, *self._cos_sin(torch.arange(start + take, start + take + n)))
        j0 = start + take - S  # first slot
        for name in self.t:
            self.t[name] = grow(self.t[name], j0 + n)
        k_out = key_outliers(k, self.k_lo, self.k_hi)
        self.t["k_codes"][b, :, j0:j0 + n] = pack(quantize_keys(k, self.k_lo, self.k_hi, self.k_levels), self.bits)
        v_out = value_outliers(v, self.v_count)
        zero, half = value_range(v, v_out)
        self.t["v_codes"][b, :, j0:j0 + n] = pack(quantize_values(v, zero, half, self.v_levels), self.bits)
        self.t["v_zero"][b, :, j0:j0 + n], self.t["v_half"][b, :, j0:j0 + n] = zero, half
        self._add_outliers(b, k, k_out, v, v_out)

    def _add_outliers(self, b, k, k_out, v, v_out) -> None:
        """Append the new tokens' outliers (token-major, h·D + d order) to sequence b's CSR arrays."""
        H, n, D = k.shape
        flat = lambda x: x.transpose(0, 1).reshape(n, H * D)  # (n, H·D)
        km, kf = flat(k_out), flat(k)
        tok, idx = km.nonzero(as_tuple=True)
        vm, vf = flat(v_out), flat(v)
        v_idx = vm.nonzero(as_tuple=True)[1].reshape(n, self.v_count)  # exactly v_count per token
        new = {"k_count": km.sum(-1).to(torch.int16), "k_idx": idx.to(torch.int16),
               "k_val": kf[tok, idx].to(self.tail_dtype), "v_idx": v_idx.to(torch.int16),
               "v_val": vf.gather(1, v_idx).to(self.tail_dtype)}
        sp = self.sparse[b]
        for name, t in new.items():
            sp[name] = torch.cat([sp[name], t])

    # ------------------------------------------------------------------------------------------ attend
    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K̂ (pre-RoPE when `pre_rope`), V̂ (B, H, n, D) fp32 of the quantized slots, outliers restored."""
        B, H, D = self.batch, self.kv_heads, self.head_dim
        nq = max(self.n_quant(b) for b in range(B))
        kc = unpack_codes(self.t["k_codes"][:, :, :nq], self.bits).int() + self.k_base  # (B, H, nq, D)
        k = self.k_table.index_select(0, kc.reshape(-1)).reshape(kc.shape)  # zero + half · level, per channel
        vc = unpack_codes(self.t["v_codes"][:, :, :nq], self.bits).int()
        v = (self.t["v_zero"][:, :, :nq].float()[..., None] + self.t["v_half"][:, :, :nq].float()[..., None]
             * self.v_levels.index_select(0, vc.reshape(-1)).reshape(vc.shape))  # (B, H, nq, D)
        for b in range(B):
            n, sp = self.n_quant(b), self.sparse[b]
            tok = torch.arange(n, device=self.device).repeat_interleave(sp["k_count"].long())  # (nnz,)
            idx = sp["k_idx"].long()
            k[b, idx // D, tok, idx % D] = sp["k_val"].float()
            vt = torch.arange(n, device=self.device)[:, None].expand(n, self.v_count)
            vi = sp["v_idx"].long()
            v[b, vi // D, vt, vi % D] = sp["v_val"].float()
        return k, v

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """16-bit K (after RoPE), V (B, H, S + n, D): the sinks, then the dequantized slots."""
        k, v = self.dequantize()
        if self.cfg.pre_rope:
            k = apply_rope(k, *self._cos_sin(torch.arange(self.sinks, self.sinks + k.shape[2])))
        return (torch.cat([self.sink["k"], k.to(self.tail_dtype)], 2),
                torch.cat([self.sink["v"], v.to(self.tail_dtype)], 2))

    def attend(self, q: torch.Tensor, scaling: float, window: Optional[int] = None) -> torch.Tensor:
        k, v = self.materialize()
        pos = torch.arange(k.shape[2]).expand(self.batch, -1)  # (B, N): sinks then slots, in position order
        return sdpa_over(q, k, v, pos, pos < self.lengths[:, None], self.q_pos[:, -q.shape[2]:], scaling, window)

    # ------------------------------------------------------------------------------------------ bytes / wire
    def seq_bytes(self, b: int) -> Bytes:
        H, D = self.kv_heads, self.head_dim
        n, sp = self.n_quant(b), self.sparse[b]
        sinks = min(int(self.lengths[b]), self.sinks)
        tail = torch.finfo(self.tail_dtype).bits // 8
        return Bytes(codes=2 * H * n * D * self.bits // 8, meta=2 * H * n * 2,  # v_zero, v_half
                     fp16=2 * H * sinks * D * tail + (sp["k_val"].numel() + sp["v_val"].numel()) * tail,
                     index=2 * (sp["k_count"].numel() + sp["k_idx"].numel() + sp["v_idx"].numel()))

    def stored_bytes(self) -> Bytes:
        return sum((self.seq_bytes(b) for b in range(self.batch)), Bytes())

    def export_seq(self, b: int) -> dict[str, torch.Tensor]:
        n, s = self.n_quant(b), min(int(self.lengths[b]), self.sinks)
        out = {f"sink_{x}": self.sink[x][b, :, :s].clone() for x in "kv"}
        out.update({name: t[b, :, :n].clone() for name, t in self.t.items()})
        out.update({name: t.clone() for name, t in self.sparse[b].items()})
        return out

    def import_seq(self, b: int, state: dict[str, torch.Tensor]) -> None:
        if int(self.lengths[b]):
            raise HackError("kvquant: import_seq installs a transferred sequence into an empty slot")
        s, n = state["sink_k"].shape[1], state["k_codes"].shape[1]
        for x in "kv":
            self.sink[x][b, :, :s] = state[f"sink_{x}"]
        for name in self.t:
            self.t[name] = grow(self.t[name], n)
            self.t[name][b, :, :n] = state[name]
        self.sparse[b] = {name: state[name].clone() for name in self.sparse[b]}
        self.lengths[b] = s + n


class Method(KVMethod):
    def __init__(self, config: Config):
        super().__init__(config)
        self.calib, self.meta = load_calibration(config.calibration, config.bits, config.outlier_fraction)

    def new_layer(self, layer_idx, num_layers, batch, kv_heads, head_dim, device, dtype):
        shape = (num_layers, kv_heads, head_dim)
        have = tuple(int(self.meta[k]) for k in ("num_layers", "kv_heads", "head_dim"))
        if have != shape:
            raise HackError(f"kvquant calibration {self.config.calibration} is for model {self.meta['model']} "
                            f"(layers, kv heads, head dim = {have}), not {shape}: {CALIBRATE_HINT}")
        return KVQuantLayerKV(self.config, self.calib, layer_idx, batch, kv_heads, head_dim, device, dtype)
