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
  k_count (B, cap) int16, and per sequence k_idx (nnz,) int16 = h·D + d, k_val (nnz,) 16-bit: key outliers
      (pre-RoPE values) in CSR over the sequence's slots
  v_idx (B, cap, o) int16, v_val (B, cap, o) 16-bit                        value outliers, o per token
A sequence's wire payload is its slice of each: k_count (n,), k_idx, k_val, v_idx (n, o), v_val (n, o).
An append quantizes every new token of the batch in one pass (four device syncs: the two finiteness checks, the key
outliers' positions and counts), and `dequantize` restores every sequence's outliers in one scatter: a decode step's
kernels are the same for 1 or 100 sequences, but for two concatenations per sequence that has new key outliers.
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


def value_outlier_index(v: torch.Tensor, count: int) -> torch.Tensor:
    """v (H, n, D) -> (n, count) positions h·D + d of each token's `count` largest |v| over its heads, ascending."""
    H, n, D = v.shape
    if not count:
        return torch.zeros(n, 0, dtype=torch.long, device=v.device)
    return v.abs().transpose(0, 1).reshape(n, H * D).topk(count, -1).indices.sort(-1).values


def index_mask(idx: torch.Tensor, H: int, D: int) -> torch.Tensor:
    """idx (n, count) positions h·D + d -> (H, n, D) bool, True at them."""
    n = idx.shape[0]
    mask = torch.zeros(n, H * D, dtype=torch.bool, device=idx.device).scatter_(1, idx, True)
    return mask.reshape(n, H, D).transpose(0, 1)


def value_outliers(v: torch.Tensor, count: int) -> torch.Tensor:
    """v (H, n, D) -> (H, n, D) bool marking each token's `count` largest |v| over all its heads."""
    H, _, D = v.shape
    return index_mask(value_outlier_index(v, count), H, D)


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
        B, H, D, S, o = batch, kv_heads, head_dim, self.sinks, self.v_count
        self.sink = {x: torch.zeros(B, H, S, D, dtype=self.tail_dtype, device=dev) for x in "kv"}
        zeros = lambda *shape, dtype=torch.int16: torch.zeros(*shape, dtype=dtype, device=dev)
        self.t = {"k_codes": zeros(B, H, 0, D * self.bits // 8, dtype=torch.uint8),  # slots along dim 2
                  "v_codes": zeros(B, H, 0, D * self.bits // 8, dtype=torch.uint8),
                  "v_zero": zeros(B, H, 0, dtype=torch.float16), "v_half": zeros(B, H, 0, dtype=torch.float16)}
        self.tok = {"k_count": zeros(B, 0), "v_idx": zeros(B, 0, o),  # slots along dim 1: per token
                    "v_val": zeros(B, 0, o, dtype=self.tail_dtype)}
        self.k_csr = [{"k_idx": zeros(0), "k_val": zeros(0, dtype=self.tail_dtype)} for _ in range(B)]

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

    def _grow(self, need: int) -> None:
        for name in self.t:
            self.t[name] = grow(self.t[name], need, 2)
        for name in self.tok:
            self.tok[name] = grow(self.tok[name], need, 1)

    # ------------------------------------------------------------------------------------------ append
    def append(self, k: torch.Tensor, v: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
        """k, v: (B, H, T, D); valid: (B, T) bool, False for padding (dropped). Every new token of the batch is
        quantized in one pass; no statistic is shared between tokens, so batching changes no stored bit."""
        B, H, T, D = k.shape
        valid = torch.ones(B, T, dtype=torch.bool) if valid is None else valid.to("cpu")
        pos = self._positions(valid)  # (B, T) host, -1 for padding
        k, v = k.to(self.tail_dtype), v.to(self.tail_dtype)  # quantize what a serving model holds
        sink = valid & (pos < self.sinks)
        if bool(sink.any()):
            sb, st = sink.nonzero(as_tuple=True)
            sb, st, sp = (x.to(self.device) for x in (sb, st, pos[sb, st]))
            self.sink["k"][sb, :, sp] = k[sb, :, st]  # (m, H, D)
            self.sink["v"][sb, :, sp] = v[sb, :, st]
        quant = valid & (pos >= self.sinks)  # (B, T)
        if bool(quant.any()):
            qb, qt = quant.nonzero(as_tuple=True)  # (m,) each, in (b, t) order
            if bool(quant.all()):  # a decode step, or a prefill without padding: no gather
                k, v = (x.transpose(0, 1).reshape(H, B * T, D) for x in (k, v))  # (H, m, D)
            else:
                qbd, qtd = qb.to(self.device), qt.to(self.device)
                k, v = (x[qbd, :, qtd].transpose(0, 1) for x in (k, v))  # (H, m, D)
            self._append_tokens(k, v, qb, pos[qb, qt])
        self.q_pos = pos
        self.lengths += valid.long().sum(-1)

    def _append_tokens(self, k: torch.Tensor, v: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor) -> None:
        """k, v (H, m, D) 16-bit: m new tokens of the batch, token i of sequence seq[i] at position pos[i] (host,
        sorted by sequence, then position)."""
        H, m, D = k.shape
        where = f"kvquant layer {self.layer_idx}"
        k, v = k.float(), v.float()
        check_finite(k, where + " K")
        check_finite(v, where + " V")
        if self.cfg.pre_rope:
            k = invert_rope(k, *self._cos_sin(pos))
        slot = pos - self.sinks  # (m,) host
        self._grow(int(slot.max()) + 1)
        b, j = seq.to(self.device), slot.to(self.device)
        k_out = key_outliers(k, self.k_lo, self.k_hi)  # (H, m, D)
        k_codes = pack(quantize_keys(k, self.k_lo, self.k_hi, self.k_levels), self.bits)  # (H, m, D·b/8)
        self.t["k_codes"][b, :, j] = k_codes.transpose(0, 1)
        v_idx = value_outlier_index(v, self.v_count)  # (m, o)
        zero, half = value_range(v, index_mask(v_idx, H, D))  # (H, m)
        self.t["v_codes"][b, :, j] = pack(quantize_values(v, zero, half, self.v_levels), self.bits).transpose(0, 1)
        self.t["v_zero"][b, :, j], self.t["v_half"][b, :, j] = zero.T, half.T
        flat = lambda x: x.transpose(0, 1).reshape(m, H * D)  # (m, H·D)
        self.tok["v_idx"][b, j] = v_idx.to(torch.int16)
        self.tok["v_val"][b, j] = flat(v).gather(1, v_idx).to(self.tail_dtype)
        km, kf = flat(k_out), flat(k)
        counts = km.sum(-1)  # (m,)
        self.tok["k_count"][b, j] = counts.to(torch.int16)
        tok, idx = km.nonzero(as_tuple=True)  # token-major, h·D + d order: each sequence's entries in a run
        per_seq = torch.zeros(self.batch, dtype=torch.long).index_add_(0, seq, counts.cpu()).tolist()
        k_idx, k_val = idx.to(torch.int16).split(per_seq), kf[tok, idx].to(self.tail_dtype).split(per_seq)
        for s, csr in enumerate(self.k_csr):
            if per_seq[s]:
                csr["k_idx"], csr["k_val"] = torch.cat([csr["k_idx"], k_idx[s]]), torch.cat([csr["k_val"], k_val[s]])

    # ------------------------------------------------------------------------------------------ attend
    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K̂ (pre-RoPE when `pre_rope`), V̂ (B, H, n, D) fp32 of the quantized slots, outliers restored. Slots past a
        sequence's own length hold whatever is there (attention masks them)."""
        B, H, D = self.batch, self.kv_heads, self.head_dim
        n = (self.lengths - self.sinks).clamp_min(0)  # (B,) host
        nq = int(n.max())
        kc = unpack_codes(self.t["k_codes"][:, :, :nq], self.bits).int() + self.k_base  # (B, H, nq, D)
        k = self.k_table.index_select(0, kc.reshape(-1)).reshape(kc.shape)  # zero + half · level, per channel
        vc = unpack_codes(self.t["v_codes"][:, :, :nq], self.bits).int()
        v = (self.t["v_zero"][:, :, :nq].float()[..., None] + self.t["v_half"][:, :, :nq].float()[..., None]
             * self.v_levels.index_select(0, vc.reshape(-1)).reshape(vc.shape))  # (B, H, nq, D)
        if nq == 0:
            return k, v
        # key outliers: every sequence's CSR at once; row r = b·nq + slot, counts of slots past n[b] are not its own
        live = (torch.arange(nq)[None] < n[:, None]).to(self.device)  # (B, nq)
        counts = (self.tok["k_count"][:, :nq].long() * live).reshape(-1)  # (B·nq,)
        nnz = sum(csr["k_idx"].numel() for csr in self.k_csr)
        rows = torch.repeat_interleave(torch.arange(B * nq, device=self.device), counts, output_size=nnz)  # (nnz,)
        idx = torch.cat([csr["k_idx"] for csr in self.k_csr]).long()
        k[rows // nq, idx // D, rows % nq, idx % D] = torch.cat([csr["k_val"] for csr in self.k_csr]).float()
        # value outliers: o per slot
        vi = self.tok["v_idx"][:, :nq].long()  # (B, nq, o)
        bb = torch.arange(B, device=self.device)[:, None, None]
        jj = torch.arange(nq, device=self.device)[None, :, None]
        v[bb, vi // D, jj, vi % D] = self.tok["v_val"][:, :nq].float()
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
        H, D, o = self.kv_heads, self.head_dim, self.v_count
        n, nnz = self.n_quant(b), self.k_csr[b]["k_idx"].numel()
        sinks = min(int(self.lengths[b]), self.sinks)
        tail = torch.finfo(self.tail_dtype).bits // 8
        return Bytes(codes=2 * H * n * D * self.bits // 8, meta=2 * H * n * 2,  # v_zero, v_half
                     fp16=2 * H * sinks * D * tail + (nnz + n * o) * tail,  # sinks, k_val, v_val
                     index=2 * (n + nnz + n * o))  # k_count, k_idx, v_idx (int16)

    def stored_bytes(self) -> Bytes:
        return sum((self.seq_bytes(b) for b in range(self.batch)), Bytes())

    def export_seq(self, b: int) -> dict[str, torch.Tensor]:
        n, s = self.n_quant(b), min(int(self.lengths[b]), self.sinks)
        out = {f"sink_{x}": self.sink[x][b, :, :s].clone() for x in "kv"}
        out.update({name: t[b, :, :n].clone() for name, t in self.t.items()})
        csr = self.k_csr[b]
        out.update(k_count=self.tok["k_count"][b, :n].clone(), k_idx=csr["k_idx"].clone(), k_val=csr["k_val"].clone(),
                   v_idx=self.tok["v_idx"][b, :n].clone(), v_val=self.tok["v_val"][b, :n].clone())
        return out

    def import_seq(self, b: int, state: dict[str, torch.Tensor]) -> None:
        if int(self.lengths[b]):
            raise HackError("kvquant: import_seq installs a transferred sequence into an empty slot")
        s, n = state["sink_k"].shape[1], state["k_codes"].shape[1]
        for x in "kv":
            self.sink[x][b, :, :s] = state[f"sink_{x}"]
        self._grow(n)
        for name in self.t:
            self.t[name][b, :, :n] = state[name]
        for name in self.tok:
            self.tok[name][b, :n] = state[name]
        self.k_csr[b] = {name: state[name].clone() for name in ("k_idx", "k_val")}
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
