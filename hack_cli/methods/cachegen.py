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

The streams of a request, one per (layer, chunk), are coded on a pool of worker processes (`cachegen_pool`,
`quant.coder_workers`; the same bytes as coding them one by one): `Method.export_layers` codes every layer's streams
at once, `Method.prepare_import` starts decoding a received payload in the background (the decode worker calls it
when the payload arrives) and `Method.import_layers` waits for the symbols and installs them.

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

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from hack_cli.errors import ConfigError, HackError
from hack_cli.methods import cachegen_codec as codec
from hack_cli.methods import cachegen_pool as pool
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
    coder_workers: int = 0  # entropy-coder processes: 0 = auto (half the cores, <= 16), 1 = in process, N

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
        if self.coder_workers < 0:
            raise ConfigError("quant.coder_workers", self.coder_workers,
                              "expected 0 (auto), 1 (code in process) or a number of worker processes")


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


def with_anchor_slots(rows: np.ndarray, group: int, fill: int, out: np.ndarray) -> None:
    """rows (H, n - ceil(n/group), X) of the non-anchor tokens -> out (H, n, X), `fill` at every group's anchor."""
    H, n, X = out.shape
    q = n // group  # whole groups
    out[:, ::group] = fill
    out[:, :q * group].reshape(H, q, group, X)[:, :, 1:] = rows[:, :q * (group - 1)].reshape(H, q, group - 1, X)
    out[:, q * group + 1:] = rows[:, q * (group - 1):]


def storage_bits(levels: int) -> int:
    return next(b for b in (2, 4, 8) if 2**b >= levels)


def spans(n: int, group: int, chunk: int) -> list[tuple[int, int, int, int]]:
    """Per chunk of an n-token prompt: its tokens [c0, c1) and anchors [g0, g1); chunks start at multiples of
    `group`, so its non-anchor tokens are rows [c0 - g0, c1 - g1) of the prompt's non-anchor tokens."""
    return [(c0, min(c0 + chunk, n), c0 // group, -(-min(c0 + chunk, n) // group)) for c0 in range(0, n, chunk)]


def pack_deltas(deltas: np.ndarray, group: int, bits: int, zero: int, out: np.ndarray) -> None:
    """Channel-major delta symbols (H·D, m) of a chunk's non-anchor tokens -> out (H, n, D·b/8): b-bit codes packed
    along D (element j of a byte: bits [j·b, (j+1)·b)), the zero delta at every group's anchor (the chunk starts at
    one)."""
    H, _, Db = out.shape
    per = 8 // bits  # codes per byte
    cm = deltas.reshape(H, Db, per, deltas.shape[1])
    packed = cm[:, :, 0].copy()  # (H, D·b/8, m)
    for j in range(1, per):
        packed |= cm[:, :, j] << (j * bits)
    with_anchor_slots(packed.transpose(0, 2, 1), group, sum(zero << (j * bits) for j in range(per)), out)


def decode_chunk(stream: np.ndarray, tables: list, a_out: list, d_out: list, group: int, bits: list[int],
                 zero: list[int]) -> None:
    """One chunk's ANS stream -> its symbols in the store's layout, K then V (index x = 0, 1): anchors a_out[x]
    (H, g, D); delta codes d_out[x] (H, n, D·b/8) packed at bits[x], the zero delta zero[x] at every anchor. A coder
    job (numpy and constriction only), on a pool worker or in process."""
    shapes, outs, host = [], [], []
    for a, d in zip(a_out, d_out):
        H, g, D = a.shape
        m = d.shape[1] - g  # non-anchor tokens
        anchors = np.empty((g, H * D), np.uint8)  # row-major, as encoded
        deltas = np.empty((H * D, m), np.uint8)  # channel-major: each channel's symbols one contiguous run
        shapes += [(g, H * D), (m, H * D)]
        outs += [anchors, deltas.T]
        host.append((anchors, deltas))
    codec.decode(stream, shapes, tables, out=outs)
    for (anchors, deltas), a, d, b, z in zip(host, a_out, d_out, bits, zero):
        H, g, D = a.shape
        a[...] = anchors.reshape(g, H, D).transpose(1, 0, 2)
        pack_deltas(deltas, group, b, z, d)


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
    def _spans(self, b: int) -> list[tuple[int, int, int, int]]:
        return spans(int(self.n_prompt[b]), self.group, self.chunk)

    def _symbol_shapes(self, b: int) -> list[tuple[int, int]]:
        """Shapes of sequence b's host symbol arrays (`_host_symbols`), K then V: anchors, channel-major deltas."""
        n, C = int(self.n_prompt[b]), self.kv_heads * self.head_dim
        ng = -(-n // self.group)
        return [(ng, C), (C, n - ng)] * 2

    def _host_symbols(self, b: int, x: str, coder: Optional[pool.Coder] = None, on_device: Optional[bool] = None):
        """Sequence b's prompt symbols of K or V on the host, uint8 in arrays of `coder` (default: in process):
        anchors (ng, H·D) row-major, non-anchor deltas (n - ng, H·D) column-contiguous (the transpose of a
        channel-major array: each channel of each chunk is one contiguous run), channel = h·D + d; and the uint8
        tables of every chunk: anchors (chunks, 1, 255) pooled over channels, deltas (chunks, H·D, L). A GPU store
        unpacks and counts on the GPU (`on_device`, default: the store is not on the CPU) and copies the symbols
        over once; a CPU store does it in numpy (torch's CPU thread pool, once woken, spins beside the coder)."""
        G, C = self.group, self.kv_heads * self.head_dim
        n, L, bits = int(self.n_prompt[b]), self.levels[x], self.dbits[x]
        ng, per, mask = -(-n // G), 8 // bits, 2**bits - 1
        array = (coder or pool.InProcess()).array
        a, packed = self.t[f"{x}_a_sym"][b, :, :ng], self.t[f"{x}_d_sym"][b, :, :n]  # (H, ng, D), (H, n, D·b/8)
        spans_ = self._spans(b)
        if on_device is None:
            on_device = a.device.type != "cpu"
        if on_device:
            a = a.transpose(0, 1).reshape(ng, C)
            keep = torch.from_numpy(non_anchor(n, G)).to(a.device)
            packed = packed.index_select(1, keep).transpose(1, 2)  # (H, D·b/8, n - ng)
            shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=a.device)[:, None]  # element j: bits j·b..
            d = torch.bitwise_right_shift(packed[:, :, None], shifts).bitwise_and_(mask).reshape(C, n - ng)
            ta = torch.stack([codec.counts(a[g0:g1], ANCHOR_LEVELS, per_channel=False) for _, _, g0, g1 in spans_])
            td = torch.stack([codec.counts(d[:, c0 - g0:c1 - g1], L, per_channel=True) for c0, c1, g0, g1 in spans_])
            a_host, d_host = array((ng, C)), array((C, n - ng))
            torch.from_numpy(a_host).copy_(a)
            torch.from_numpy(d_host).copy_(d)
            ta, td = ta.cpu(), td.cpu()
        else:
            a_host = array((ng, C))
            a_host.reshape(ng, self.kv_heads, self.head_dim)[...] = a.numpy().transpose(1, 0, 2)
            packed = np.ascontiguousarray(packed.numpy().take(non_anchor(n, G), 1).transpose(0, 2, 1))
            d_host = array((C, n - ng))
            d = d_host.reshape(*packed.shape[:2], per, n - ng)  # (H, D·b/8, per, n - ng)
            for j in range(per):
                np.bitwise_and(packed >> (j * bits), mask, out=d[:, :, j])
            ta = np.stack([codec.counts(a_host[g0:g1], ANCHOR_LEVELS, per_channel=False) for _, _, g0, g1 in spans_])
            td = np.stack([codec.counts(d_host[:, c0 - g0:c1 - g1], L, per_channel=True)
                           for c0, c1, g0, g1 in spans_])
        return a_host, d_host.T, torch.from_numpy(codec.scaled(ta)), torch.from_numpy(codec.scaled(td))

    def _start_encode(self, b: int, coder: pool.Coder) -> tuple[list, dict]:
        """Bring sequence b's prompt symbols to the host (into `coder`'s arrays) and submit one ANS stream per chunk
        (`codec.encode`, K then V parts): (the streams' jobs, {x: (anchor tables, delta tables)})."""
        if not self._spans(b):
            return [], {}
        sym = {x: self._host_symbols(b, x, coder) for x in "kv"}
        jobs = []
        for ci, (c0, c1, g0, g1) in enumerate(self._spans(b)):
            parts = []
            for x in "kv":
                a, d, ta, td = sym[x]  # (ng, H·D) + (chunks, 1, 255); (n - ng, H·D) + (chunks, H·D, L)
                parts += [(a[g0:g1], ta[ci].numpy()), (d[c0 - g0:c1 - g1], td[ci].numpy())]
            jobs.append(coder.submit(codec.encode, parts))
        return jobs, {x: sym[x][2:] for x in "kv"}

    def _wire(self, b: int, streams: list[bytes], tables: dict) -> dict:
        """Sequence b's encoded prompt: its streams back to back and their lengths, the token count, the tables (of
        `_start_encode`) and the scales."""
        chunks = len(streams)
        wire = {"payload": torch.frombuffer(bytearray(b"".join(streams)), dtype=torch.uint8)
                if streams else torch.zeros(0, dtype=torch.uint8),
                "stream_bytes": torch.tensor([len(s) for s in streams], dtype=torch.int32),
                "tokens": torch.tensor([int(self.n_prompt[b])], dtype=torch.int32)}
        for x in "kv":
            for i, kind in ((0, "a_table"), (1, "d_table")):
                wire[f"{x}_{kind}"] = tables[x][i] if chunks else torch.zeros(0, dtype=torch.uint8)
        for x in "kv":
            for name in ("a_scale", "d_scale"):
                wire[f"{x}_{name}"] = self.t[f"{x}_{name}"][b, :, :chunks].transpose(0, 1).cpu().clone()
        return wire

    def encode_seq(self, b: int) -> dict:
        """Entropy-code sequence b's prompt: per chunk one ANS stream (K then V), its uint8 tables and scales."""
        encode_layers([self], b)
        return self.wire[b]

    def export_seq(self, b: int) -> dict[str, torch.Tensor]:
        out = dict(self.encode_seq(b))
        nt = int(self.n_tail[b])
        if nt:  # tokens appended after the prompt travel as they are held: 16-bit
            out.update({f"tail_{x}": self.tail[x][b, :, :nt].clone() for x in "kv"})
        return out

    def import_seq(self, b: int, state: dict[str, torch.Tensor]) -> None:
        """Receiver: entropy-decode the prompt's symbols chunk by chunk on the host, straight into the store's layout
        (`Decoding`), then install the whole prompt at once."""
        Decoding(self.cfg, [state], [self.levels]).install([self], b)

    def _install(self, b: int, state: dict[str, torch.Tensor], out: dict) -> None:
        """Install a received prompt that `Decoding` decoded, out {x: (anchors (H, ng, D), packed deltas
        (H, n, D·b/8))} uint8 on the host, with its scales and any 16-bit tail: one copy to the device per tensor."""
        n_total = int(state["tokens"][0])
        ng, chunks = -(-n_total // self.group), len(state["stream_bytes"])
        self.n_prompt[b] = n_total
        for name, size in (("a_sym", ng), ("d_sym", n_total), ("a_scale", chunks), ("d_scale", chunks)):
            for x in "kv":  # allocate once, not chunk by chunk
                self.t[f"{x}_{name}"] = grow(self.t[f"{x}_{name}"], size)
        for x in "kv":
            self.t[f"{x}_a_sym"][b, :, :ng].copy_(torch.from_numpy(out[x][0]))
            self.t[f"{x}_d_sym"][b, :, :n_total].copy_(torch.from_numpy(out[x][1]))
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


def encode_layers(stores: list[CacheGenLayerKV], b: int) -> None:
    """Entropy-code sequence b's prompt in every store not yet coded (each store's `wire[b]`): one ANS stream per
    (layer, chunk), all submitted at once (a layer's symbols come to the host while earlier layers' streams are
    coded) on the coder pool when it pays (`cachegen_pool.coder`), in this process otherwise; the same bytes either
    way."""
    todo = [s for s in stores if b not in s.wire]
    if not todo:
        return
    shapes = [shape for s in todo for shape in s._symbol_shapes(b)]
    symbols = sum(math.prod(shape) for shape in shapes)
    with pool.coder(todo[0].cfg.coder_workers, symbols, pool.arena_bytes(shapes)) as coder:
        started = [s._start_encode(b, coder) for s in todo]
        for s, (jobs, tables) in zip(todo, started):
            s.wire[b] = s._wire(b, pool.gather(jobs), tables)


class Decoding:
    """A received CacheGen payload of every layer (their `export_seq` dicts) being entropy-decoded, one job per
    (layer, chunk) straight into the stores' layout (`decode_chunk`): on the coder pool from construction on, in the
    background (the decode worker builds it when the payload arrives: `Method.prepare_import`), or in this process
    once `install` asks for the symbols. levels: each layer's delta levels {"k": L, "v": L}."""

    def __init__(self, cfg: Config, states: list[dict[str, torch.Tensor]], levels: list[dict[str, int]]):
        self.states = [{name: t.cpu() for name, t in st.items()} for st in states]  # the decoder reads host bytes
        shapes = [self._shapes(st, lv, cfg.group) for st, lv in zip(self.states, levels)]
        symbols = sum(2 * int(st["tokens"][0]) * math.prod(st["k_a_scale"].shape[1:]) for st in self.states)
        arrays = [tuple(st["payload"].shape) for st in self.states] + \
            [shape for sh in shapes for pair in sh.values() for shape in pair]
        self.coder = pool.coder(cfg.coder_workers, symbols, pool.arena_bytes(arrays))
        self.out = [{x: tuple(self.coder.array(shape) for shape in sh[x]) for x in "kv"} for sh in shapes]
        self.jobs = [job for st, out, lv in zip(self.states, self.out, levels)
                     for job in self._submit(st, out, lv, cfg)]

    @staticmethod
    def _shapes(state: dict, levels: dict[str, int], group: int) -> dict[str, tuple]:
        """The store-layout arrays one layer decodes into: {x: ((H, ng, D) anchors, (H, n, D·b/8) packed deltas)}."""
        n = int(state["tokens"][0])
        _, H, D = state["k_a_scale"].shape  # (chunks, H, D)
        return {x: ((H, -(-n // group), D), (H, n, D * storage_bits(levels[x]) // 8)) for x in "kv"}

    def _submit(self, state: dict, out: dict, levels: dict[str, int], cfg: Config) -> list:
        """One `decode_chunk` job per chunk of one layer's streams."""
        payload = self.coder.share(state["payload"].numpy())
        ends = state["stream_bytes"].long().cumsum(0).tolist()
        bits = [storage_bits(levels[x]) for x in "kv"]
        zero = [(levels[x] - 1) // 2 for x in "kv"]
        jobs = []
        for ci, (c0, c1, g0, g1) in enumerate(spans(int(state["tokens"][0]), cfg.group, cfg.chunk)):
            stream = payload[ends[ci] - int(state["stream_bytes"][ci]):ends[ci]]
            tables = [state[f"{x}_{kind}"][ci].numpy() for x in "kv" for kind in ("a_table", "d_table")]
            jobs.append(self.coder.submit(decode_chunk, stream, tables, [out[x][0][:, g0:g1] for x in "kv"],
                                          [out[x][1][:, c0:c1] for x in "kv"], cfg.group, bits, zero))
        return jobs

    def install(self, stores: list[CacheGenLayerKV], b: int) -> None:
        """Wait for the symbols and install layer i's into sequence b (empty) of stores[i]."""
        if any(int(s.lengths[b]) for s in stores):
            raise HackError("cachegen: import_seq installs a transferred sequence into an empty slot")
        done = False
        try:
            pool.gather(self.jobs)
            done = True
            for i, store in enumerate(stores):
                store._install(b, self.states[i], self.out[i])
        finally:
            self.jobs = self.out = None  # the arrays go before their arena
            self.coder.close(done)


class Method(KVMethod):
    def new_layer(self, layer_idx, num_layers, batch, kv_heads, head_dim, device, dtype):
        return CacheGenLayerKV(self.config, layer_idx, num_layers, batch, kv_heads, head_dim, device, dtype)

    @property
    def decodes_ahead(self) -> bool:
        return pool.resolve(self.config.coder_workers) > 1

    def warm_up(self) -> None:
        """Start the coder pool's processes (seconds of imports) before the first request."""
        if self.decodes_ahead:
            pool.get_pool(pool.resolve(self.config.coder_workers)).start()

    def export_layers(self, stores: list[CacheGenLayerKV], b: int) -> list[dict[str, torch.Tensor]]:
        encode_layers(stores, b)  # every layer's streams at once
        return [s.export_seq(b) for s in stores]

    def prepare_import(self, states: list[dict[str, torch.Tensor]]) -> Decoding:
        num = len(states)
        return Decoding(self.config, states, [dict(zip("kv", level_counts(self.config, i, num))) for i in range(num)])

    def import_layers(self, stores: list[CacheGenLayerKV], b: int, prepared) -> None:
        if not isinstance(prepared, Decoding):  # the payload as received
            prepared = Decoding(self.config, prepared, [s.levels for s in stores])
        prepared.install(stores, b)
