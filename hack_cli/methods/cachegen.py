"""CacheGen (Liu et al., SIGCOMM 2024): delta coding against anchor tokens, layer-wise levels, entropy coding.

The prompt's KV (a sequence's first append: what the prefill instance computes and sends) is split into chunks
of `chunk` tokens and groups of `group` tokens. Per chunk and channel (head h, dim d), symmetric max-abs scales:
  * the group's first token, its anchor, gets 255 levels: â = scale_a · round(a / scale_a), |code| <= 127;
  * every other token is coded as its delta to the reconstructed anchor with L levels, L from the layer's group
    (three equal groups of layers: keys `key_levels`, values `value_levels`; layer 0 `first_layer_levels`).
The symbols are then entropy-coded (ANS, `cachegen_codec`) per chunk: deltas with one frequency table per
channel, anchors with one table per layer (a 255-entry table per channel would outweigh the chunk's ~150 anchors
of that channel). The wire (`export_seq`, `transfer_bytes`) is that real byte string plus the uint8 tables, the
fp16 scales and the stream lengths; the payload is encoded when first asked for and kept until the sequence
changes. The receiver (`import_seq`) entropy-decodes back to the symbols.

The store holds the symbols, not 16-bit values, and dequantizes before attention:
  a_sym (B, H, cap/group, D) uint8        anchor symbols (code + 127)
  d_sym (B, H, cap, D·b/8) uint8          delta symbols (code + (L-1)/2), packed at b = 2, 4 or 8 bits, the
                                          smallest holding L; anchor slots hold the zero delta
  a_scale, d_scale (B, H, cap/chunk, D) fp16
  tail_k, tail_v (B, H, cap, D) 16-bit    tokens appended after the prompt
CacheGen compresses only the transferred prompt KV: tokens generated on the decode side stay 16-bit (the tail).
`bits` and `partition` are unused (levels are set per layer group, groups are `group` tokens).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from hack_cli.errors import ConfigError, HackError
from hack_cli.methods import cachegen_codec as codec
from hack_cli.methods.base import Bytes, KVMethod, LayerKV, QuantConfig
from hack_cli.methods.dequant import grow, sdpa_over, unpack_codes
from hack_cli.methods.hack.quantizer import check_finite, pack

ANCHOR_LEVELS = 255


@dataclass
class Config(QuantConfig):
    name: str = "cachegen"
    group: int = 10  # tokens per group: one anchor + deltas
    chunk: int = 1500  # tokens per entropy-coding chunk (own scales and symbol statistics)
    key_levels: list[int] = field(default_factory=lambda: [15, 15, 7])  # deltas, per third of the layers
    value_levels: list[int] = field(default_factory=lambda: [5, 5, 5])
    first_layer_levels: list[int] = field(default_factory=lambda: [31, 15])  # (key, value) deltas of layer 0

    def __post_init__(self):
        super().__post_init__()
        if self.group < 2:
            raise ConfigError("quant.group", self.group, "expected >= 2 (an anchor and its deltas)")
        if self.chunk <= 0 or self.chunk % self.group:
            raise ConfigError("quant.chunk", self.chunk, f"expected a positive multiple of quant.group={self.group}")
        for key, levels, n in (("key_levels", self.key_levels, 3), ("value_levels", self.value_levels, 3),
                               ("first_layer_levels", self.first_layer_levels, 2)):
            if len(levels) != n or any(not 3 <= x <= 255 or x % 2 == 0 for x in levels):
                raise ConfigError(f"quant.{key}", list(levels), f"expected {n} odd level counts in [3, 255]")


def level_counts(cfg: Config, layer_idx: int, num_layers: int) -> tuple[int, int]:
    """(key, value) delta levels of a layer: layer 0 finer, then three equal groups of layers."""
    if layer_idx == 0:
        return tuple(cfg.first_layer_levels)
    third = min(2, layer_idx * 3 // num_layers)
    return cfg.key_levels[third], cfg.value_levels[third]


def quantize_chunk(x: torch.Tensor, group: int, levels: int):
    """x (H, n, D) of one chunk -> anchor symbols (H, ceil(n/group), D), delta symbols (H, n, D) (zero delta at
    anchors), anchor and delta scales (H, D) fp16. Codes are computed against the stored fp16 scales."""
    half_a, half_d = (ANCHOR_LEVELS - 1) // 2, (levels - 1) // 2
    anchors = x[:, ::group]  # (H, ng, D)
    scale_a = (anchors.abs().amax(1) / half_a).half()  # (H, D)
    scale_a = torch.where(scale_a == 0, torch.ones_like(scale_a), scale_a)
    a_code = (anchors / scale_a.float()[:, None]).round().clamp(-half_a, half_a)
    a_hat = (a_code * scale_a.float()[:, None]).repeat_interleave(group, 1)[:, :x.shape[1]]  # (H, n, D)
    delta = x - a_hat
    is_anchor = (torch.arange(x.shape[1], device=x.device) % group == 0)[None, :, None]
    delta = delta.masked_fill(is_anchor, 0.0)
    scale_d = (delta.abs().amax(1) / half_d).half()
    scale_d = torch.where(scale_d == 0, torch.ones_like(scale_d), scale_d)
    d_code = (delta / scale_d.float()[:, None]).round().clamp(-half_d, half_d)
    return (a_code + half_a).to(torch.uint8), (d_code + half_d).to(torch.uint8), scale_a, scale_d


def non_anchor(n: int, group: int) -> np.ndarray:
    """Indices of the tokens of n that are not a group's anchor."""
    return np.flatnonzero(np.arange(n) % group)


def with_anchor_slots(rows: np.ndarray, n: int, group: int, fill: int) -> np.ndarray:
    """rows (H, n - ceil(n/group), X) of the non-anchor tokens -> (H, n, X) with `fill` at every group's anchor."""
    H, _, X = rows.shape
    full = np.empty((H, n, X), dtype=rows.dtype)
    q = n // group  # whole groups
    full[:, ::group] = fill
    full[:, :q * group].reshape(H, q, group, X)[:, :, 1:] = rows[:, :q * (group - 1)].reshape(H, q, group - 1, X)
    full[:, q * group + 1:] = rows[:, q * (group - 1):]
    return full


def storage_bits(levels: int) -> int:
    return next(b for b in (2, 4, 8) if 2**b >= levels)


class CacheGenLayerKV(LayerKV):
    def __init__(self, cfg: Config, layer_idx: int, num_layers: int, batch, kv_heads, head_dim, device, dtype):
        super().__init__(batch, kv_heads, head_dim, device, dtype)
        self.cfg, self.layer_idx, self.group, self.chunk = cfg, layer_idx, cfg.group, cfg.chunk
        self.levels = dict(zip("kv", level_counts(cfg, layer_idx, num_layers)))
        self.dbits = {x: storage_bits(L) for x, L in self.levels.items()}
        self.tail_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
        B, H, D, dev = batch, kv_heads, head_dim, self.device
        self.n_prompt = torch.zeros(B, dtype=torch.long)
        self.n_tail = torch.zeros(B, dtype=torch.long)
        self.t = {}
        for x in "kv":
            self.t[f"{x}_a_sym"] = torch.zeros(B, H, 0, D, dtype=torch.uint8, device=dev)
            self.t[f"{x}_d_sym"] = torch.zeros(B, H, 0, D * self.dbits[x] // 8, dtype=torch.uint8, device=dev)
            self.t[f"{x}_a_scale"] = torch.zeros(B, H, 0, D, dtype=torch.float16, device=dev)
            self.t[f"{x}_d_scale"] = torch.zeros(B, H, 0, D, dtype=torch.float16, device=dev)
        self.tail = {x: torch.zeros(B, H, 0, D, dtype=self.tail_dtype, device=dev) for x in "kv"}
        self.wire: dict[int, dict] = {}  # sequence -> its encoded prompt (made when first asked for)

    # ------------------------------------------------------------------------------------------ append
    def _append_seq(self, b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.wire.pop(b, None)
        if int(self.lengths[b]) == 0:  # the prompt: quantized (and later entropy-coded) chunk by chunk
            n = k.shape[1]
            for x, new in (("k", k), ("v", v)):
                new = new.to(self.tail_dtype).float()  # (H, n, D) as a serving model makes it
                check_finite(new, f"cachegen layer {self.layer_idx} {x.upper()}")
                for c0 in range(0, n, self.chunk):
                    self._store_chunk(b, x, c0, *quantize_chunk(new[:, c0:c0 + self.chunk], self.group,
                                                                self.levels[x]))
            self.n_prompt[b] = n
            return
        t0, n = int(self.n_tail[b]), k.shape[1]
        for x, new in (("k", k), ("v", v)):
            self.tail[x] = grow(self.tail[x], t0 + n)
            self.tail[x][b, :, t0:t0 + n] = new.to(self.tail_dtype)
        self.n_tail[b] += n

    def _store_chunk(self, b: int, x: str, c0: int, a_sym, d_sym, a_scale, d_scale) -> None:
        """Install one chunk's symbols (starting at prompt token c0) and scales for sequence b."""
        n, G = d_sym.shape[1], self.group
        g0, ci = c0 // G, c0 // self.chunk
        t = self.t
        t[f"{x}_a_sym"] = grow(t[f"{x}_a_sym"], g0 + a_sym.shape[1])
        t[f"{x}_d_sym"] = grow(t[f"{x}_d_sym"], c0 + n)
        for name in ("a_scale", "d_scale"):
            t[f"{x}_{name}"] = grow(t[f"{x}_{name}"], ci + 1)
        t[f"{x}_a_sym"][b, :, g0:g0 + a_sym.shape[1]] = a_sym.to(self.device)
        t[f"{x}_d_sym"][b, :, c0:c0 + n] = pack(d_sym.to(self.device), self.dbits[x])
        t[f"{x}_a_scale"][b, :, ci] = a_scale.to(self.device)
        t[f"{x}_d_scale"][b, :, ci] = d_scale.to(self.device)

    # ------------------------------------------------------------------------------------------ attend
    def dequantize(self, x: str, n: int) -> torch.Tensor:
        """The first n prompt tokens of every sequence as the receiver dequantizes them: (B, H, n, D) fp32."""
        G, half_a, half_d = self.group, (ANCHOR_LEVELS - 1) // 2, (self.levels[x] - 1) // 2
        t, ng, nc = self.t, -(-n // G), -(-n // self.chunk)
        per_chunk = lambda scale, size: scale[:, :, :nc].float().repeat_interleave(size, 2)  # chunk -> its slots
        a = (t[f"{x}_a_sym"][:, :, :ng].float() - half_a) * per_chunk(t[f"{x}_a_scale"], self.chunk // G)[:, :, :ng]
        d = unpack_codes(t[f"{x}_d_sym"][:, :, :n], self.dbits[x]).float() - half_d  # (B, H, n, D)
        return a.repeat_interleave(G, 2)[:, :, :n] + d * per_chunk(t[f"{x}_d_scale"], self.chunk)[:, :, :n]

    def attend(self, q: torch.Tensor, scaling: float, window: Optional[int] = None) -> torch.Tensor:
        B, n = self.batch, int(self.n_prompt.max())
        nt = self.tail["k"].shape[2]
        k, v = (torch.cat([self.dequantize(x, n).to(self.tail_dtype), self.tail[x]], 2) for x in "kv")
        slot_p, slot_t = torch.arange(n).expand(B, n), torch.arange(nt).expand(B, nt)
        pos = torch.cat([slot_p, self.n_prompt[:, None] + slot_t], 1)  # (B, N)
        ok = torch.cat([slot_p < self.n_prompt[:, None], slot_t < self.n_tail[:, None]], 1)
        return sdpa_over(q, k, v, pos, ok, self.q_pos[:, -q.shape[2]:], scaling, window)

    # ------------------------------------------------------------------------------------------ wire
    def _chunks(self, b: int) -> list[tuple[int, int]]:
        """(first token, tokens) of each chunk of sequence b's prompt."""
        n = int(self.n_prompt[b])
        return [(c0, min(self.chunk, n - c0)) for c0 in range(0, n, self.chunk)]

    def _spans(self, b: int) -> list[tuple[int, int, int, int]]:
        """Per chunk of sequence b's prompt: its anchor rows [g0, g1) and non-anchor delta rows [j0, j1) in the
        sequence's host symbol arrays (`_host_symbols`); chunks start at multiples of `group`."""
        G = self.group
        out = []
        for c0, n in self._chunks(b):
            g0, g1 = c0 // G, -(-(c0 + n) // G)
            out.append((g0, g1, c0 - g0, c0 + n - g1))
        return out

    def _host_symbols(self, b: int, x: str, on_device: Optional[bool] = None):
        """Sequence b's prompt symbols of K or V on the host, brought over once: anchors (ng, H·D) int32 row-major,
        non-anchor deltas (n - ng, H·D) int32 column-contiguous (the transpose of a channel-major array: each
        channel of each chunk is one contiguous run), channel = h·D + d; and the uint8 tables of every chunk: anchors
        (chunks, 1, 255) pooled over channels, deltas (chunks, H·D, L). A GPU store unpacks and counts on the GPU
        (`on_device`, default: the store is not on the CPU); a CPU store does it in numpy (torch's CPU thread pool,
        once woken, spins beside the single-threaded coder)."""
        G, C = self.group, self.kv_heads * self.head_dim
        n, L, bits = int(self.n_prompt[b]), self.levels[x], self.dbits[x]
        ng, per, mask = -(-n // G), 8 // bits, 2**bits - 1
        a, packed = self.t[f"{x}_a_sym"][b, :, :ng], self.t[f"{x}_d_sym"][b, :, :n]  # (H, ng, D), (H, n, D·b/8)
        if on_device is None:
            on_device = a.device.type != "cpu"
        if on_device:
            a = a.transpose(0, 1).to(torch.int32).reshape(ng, C)
            keep = torch.from_numpy(non_anchor(n, G)).to(a.device)
            packed = packed.index_select(1, keep).transpose(1, 2).to(torch.int32)
            shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=a.device)[:, None]  # element j: bits j·b..
            d = torch.bitwise_right_shift(packed[:, :, None], shifts).bitwise_and_(mask).reshape(C, n - ng)
        else:
            a = np.ascontiguousarray(a.numpy().transpose(1, 0, 2), dtype=np.int32).reshape(ng, C)
            packed = np.ascontiguousarray(packed.numpy().take(non_anchor(n, G), 1).transpose(0, 2, 1))
            d = np.empty((*packed.shape[:2], per, n - ng), dtype=np.int32)  # (H, D·b/8, per, n - ng)
            for j in range(per):
                np.bitwise_and(packed >> (j * bits), mask, out=d[:, :, j], casting="unsafe")
            d = d.reshape(C, n - ng)
        spans = self._spans(b)
        stack = (lambda ts: torch.stack(ts).cpu()) if isinstance(a, torch.Tensor) else np.stack
        ta = stack([codec.counts(a[g0:g1], ANCHOR_LEVELS, per_channel=False) for g0, g1, _, _ in spans])
        td = stack([codec.counts(d[:, j0:j1], L, per_channel=True) for _, _, j0, j1 in spans])
        host = lambda t: t.cpu().numpy() if isinstance(t, torch.Tensor) else t
        return host(a), host(d).T, torch.from_numpy(codec.scaled(ta)), torch.from_numpy(codec.scaled(td))

    def encode_seq(self, b: int) -> dict:
        """Entropy-code sequence b's prompt: per chunk one ANS stream (K then V), its uint8 tables and scales."""
        if b in self.wire:
            return self.wire[b]
        spans = self._spans(b)
        sym = {x: self._host_symbols(b, x) for x in "kv"} if spans else {}
        streams = []
        for ci, (g0, g1, j0, j1) in enumerate(spans):
            parts = []
            for x in "kv":
                a, d, ta, td = sym[x]
                parts += [(a[g0:g1], ta[ci]), (d[j0:j1], td[ci])]  # (ng, H·D) + (1, 255), (n - ng, H·D) + (H·D, L)
            streams.append(codec.encode(parts))
        chunks = len(streams)
        wire = {"payload": torch.frombuffer(bytearray(b"".join(streams)), dtype=torch.uint8)
                if streams else torch.zeros(0, dtype=torch.uint8),
                "stream_bytes": torch.tensor([len(s) for s in streams], dtype=torch.int32),
                "tokens": torch.tensor([int(self.n_prompt[b])], dtype=torch.int32)}
        for x in "kv":
            for i, kind in ((2, "a_table"), (3, "d_table")):
                wire[f"{x}_{kind}"] = sym[x][i] if chunks else torch.zeros(0, dtype=torch.uint8)
        for x in "kv":
            for name in ("a_scale", "d_scale"):
                wire[f"{x}_{name}"] = self.t[f"{x}_{name}"][b, :, :chunks].transpose(0, 1).cpu().clone()
        self.wire[b] = wire
        return wire

    def export_seq(self, b: int) -> dict[str, torch.Tensor]:
        out = dict(self.encode_seq(b))
        nt = int(self.n_tail[b])
        if nt:  # tokens appended after the prompt travel as they are held: 16-bit
            out.update({f"tail_{x}": self.tail[x][b, :, :nt].clone() for x in "kv"})
        return out

    def import_seq(self, b: int, state: dict[str, torch.Tensor]) -> None:
        """Receiver: entropy-decode the prompt's symbols chunk by chunk on the host (into channel-major arrays), then
        pack and install the whole prompt at once, one copy to the store's device per tensor (and any 16-bit tail)."""
        if int(self.lengths[b]):
            raise HackError("cachegen: import_seq installs a transferred sequence into an empty slot")
        G, H, D = self.group, self.kv_heads, self.head_dim
        state = {name: t.cpu() for name, t in state.items()}  # the entropy decoder reads host bytes
        n_total = int(state["tokens"][0])
        self.n_prompt[b] = n_total
        payload = state["payload"].numpy().tobytes()
        C, ng = H * D, -(-n_total // G)
        a_host = {x: np.empty((ng, C), dtype=np.uint8) for x in "kv"}  # row-major, as encoded
        d_host = {x: np.empty((C, n_total - ng), dtype=np.uint8) for x in "kv"}  # channel-major
        offset = 0
        for ci, (g0, g1, j0, j1) in enumerate(self._spans(b)):
            size = int(state["stream_bytes"][ci])
            shapes, tables, out = [], [], []
            for x in "kv":
                shapes += [(g1 - g0, C), (j1 - j0, C)]
                tables += [state[f"{x}_a_table"][ci], state[f"{x}_d_table"][ci]]
                out += [a_host[x][g0:g1], d_host[x][:, j0:j1].T]
            codec.decode(payload[offset:offset + size], shapes, tables, out=out)
            offset += size
        chunks = len(state["stream_bytes"])
        for name, size in (("a_sym", ng), ("d_sym", n_total), ("a_scale", chunks), ("d_scale", chunks)):
            for x in "kv":  # allocate once, not chunk by chunk
                self.t[f"{x}_{name}"] = grow(self.t[f"{x}_{name}"], size)
        for x in "kv":
            bits = self.dbits[x]
            per, zero = 8 // bits, (self.levels[x] - 1) // 2  # codes per byte; anchors hold the zero delta
            cm = d_host[x].reshape(H, D // per, per, n_total - ng)  # element j of a byte: bits [j·b, (j+1)·b)
            packed = cm[:, :, 0].copy()
            for j in range(1, per):
                packed |= cm[:, :, j] << (j * bits)
            fill = sum(zero << (j * bits) for j in range(per))
            d_sym = with_anchor_slots(packed.transpose(0, 2, 1), n_total, G, fill)  # (H, n, D·b/8)
            self.t[f"{x}_a_sym"][b, :, :ng] = torch.from_numpy(a_host[x]).view(ng, H, D).transpose(0, 1).to(self.device)
            self.t[f"{x}_d_sym"][b, :, :n_total] = torch.from_numpy(d_sym).to(self.device)
            for name in ("a_scale", "d_scale"):
                self.t[f"{x}_{name}"][b, :, :chunks] = state[f"{x}_{name}"].transpose(0, 1).to(self.device)
        nt = state["tail_k"].shape[1] if "tail_k" in state else 0
        if nt:
            for x in "kv":
                self.tail[x] = grow(self.tail[x], nt)
                self.tail[x][b, :, :nt] = state[f"tail_{x}"].to(self.device)
        self.n_tail[b] = nt
        self.lengths[b] = n_total + nt

    def decoded_seq(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V (H, n, D) of sequence b in 16 bits as the receiver reconstructs them: the prompt dequantized, then
        the 16-bit tail (what `attend` reads, for a decode side that keeps ordinary 16-bit KV)."""
        n, nt = int(self.n_prompt[b]), int(self.n_tail[b])
        return tuple(torch.cat([self.dequantize(x, n)[b].to(self.tail_dtype), self.tail[x][b, :, :nt]], 1)
                     for x in "kv")

    # ------------------------------------------------------------------------------------------ bytes
    def _seq_stored(self, b: int) -> Bytes:
        H, D, G = self.kv_heads, self.head_dim, self.group
        n, nt = int(self.n_prompt[b]), int(self.n_tail[b])
        chunks = -(-n // self.chunk)
        tail = torch.finfo(self.tail_dtype).bits // 8
        codes = sum(H * -(-n // G) * D + H * n * D * self.dbits[x] // 8 for x in "kv")
        return Bytes(codes=codes, meta=2 * 2 * H * chunks * D * 2, fp16=2 * H * nt * D * tail)

    def stored_bytes(self) -> Bytes:
        return sum((self._seq_stored(b) for b in range(self.batch)), Bytes())

    def transfer_bytes(self) -> Bytes:
        """Exactly the bytes of each sequence's `export_seq` tensors, by kind (encodes what is not yet encoded)."""
        total = Bytes()
        kinds = {"payload": "codes", "stream_bytes": "index", "tokens": "index", "tail_k": "fp16", "tail_v": "fp16"}
        for b in range(self.batch):
            for name, t in self.export_seq(b).items():
                kind = kinds.get(name, "meta")  # tables and scales
                setattr(total, kind, getattr(total, kind) + t.numel() * t.element_size())
        return total


class Method(KVMethod):
    def new_layer(self, layer_idx, num_layers, batch, kv_heads, head_dim, device, dtype):
        return CacheGenLayerKV(self.config, layer_idx, num_layers, batch, kv_heads, head_dim, device, dtype)
