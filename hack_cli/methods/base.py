"""The one interface every KV method implements (fp16, hack, kivi, kvquant, cachegen, fp8).

A `KVMethod` is built from a `quant` config and makes one `LayerKV` per attention layer. A `LayerKV` holds the KV of
a batch of sequences in the method's own compressed form — never a 16-bit copy of what it compressed — and
  * `append(k, v, valid)` adds new tokens (a prefill chunk or one decode step), compressing them as the method does;
  * `attend(q, scaling, window)` computes attention of the queries of the last append over everything stored;
  * `stored_bytes()` / `transfer_bytes()` count exactly what it holds / what a prefill->decode transfer sends;
  * `export_seq(b)` / `import_seq(state)` give one sequence's wire payload (tensors whose bytes add up to
    `transfer_bytes` for that sequence) and install it on the decode side.
The `KVMethod` does the same for every layer of a request at once (`export_layers`, `prepare_import` +
`import_layers`): by default layer after layer; a method may work across layers and ahead of time (CacheGen codes
all its entropy-coded streams in parallel, and starts decoding a payload when it arrives).

Batches are ragged: sequence `b` owns tokens [0, lengths[b]); padding passed to `append` through `valid` is dropped,
so no scale or statistic is ever shared between sequences.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from hack_cli.config import check_choice, check_partition


@dataclass
class Bytes:
    """Exact byte counts of a KV representation, split by what the bytes are."""

    codes: int = 0  # packed quantization codes (or entropy-coded payload)
    meta: int = 0  # per-partition min/scale, levels, anchors, ...
    sums: int = 0  # cached code sums (HACK's summation elimination)
    fp16: int = 0  # 16-bit tails: open block, sinks, residual window, outliers' values
    index: int = 0  # sparse-layout indices (outlier positions), chunk headers

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def __add__(self, other: "Bytes") -> "Bytes":
        return Bytes(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, int]:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "total": self.total}


def fp16_bytes(batch_tokens: int, kv_heads: int, head_dim: int) -> int:
    """Bytes of K and V for `batch_tokens` tokens of one layer at 16 bits: the denominator of every ratio."""
    return 2 * batch_tokens * kv_heads * head_dim * 2


@dataclass
class QuantConfig:
    """Fields every method config has, so that one sweep can cross methods (`quant=fp16,hack quant.bits=2,4`).

    A method that has no use for `bits` or `partition` ignores them and says so in its docs.
    """

    name: str = "fp16"
    bits: Optional[int] = None  # code width: 2, 4 or 8
    partition: Optional[int] = None  # Π: elements per quantization group (a positive multiple of 16)
    backend: str = "auto"  # auto (Triton kernels on CUDA, PyTorch reference elsewhere) | reference | triton
    seed: int = 0  # for stochastic rounding and anything else random

    def __post_init__(self):
        if self.bits is not None:
            check_choice("quant.bits", self.bits, (2, 4, 8))
        if self.partition is not None:
            check_partition("quant.partition", self.partition)
        check_choice("quant.backend", self.backend, ("auto", "reference", "triton"))


class LayerKV:
    """KV of one attention layer for a ragged batch. Subclasses hold the method's compressed tensors."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, device, dtype: torch.dtype):
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.device, self.dtype = torch.device(device), dtype
        self.lengths = torch.zeros(batch, dtype=torch.long)  # (B,) real tokens per sequence (host)
        self.q_pos = torch.zeros(batch, 0, dtype=torch.long)  # (B, Tq) positions of the last append's tokens

    # -- bookkeeping shared by all methods
    def _positions(self, valid: torch.Tensor) -> torch.Tensor:
        """valid: (B, T) host bool -> positions of the appended tokens in each sequence's own coordinates; -1 marks
        padding."""
        pos = self.lengths[:, None] + valid.long().cumsum(-1) - 1  # (B, T)
        return torch.where(valid, pos, torch.full_like(pos, -1))

    def append(self, k: torch.Tensor, v: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
        """k, v: (B, H, T, D). valid: (B, T) bool, False for padding (dropped). Compresses and stores."""
        valid = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool) if valid is None else valid.to("cpu")
        self.q_pos = self._positions(valid)
        for b in range(self.batch):  # decided on the host: no device synchronization per layer
            keep = valid[b]
            if bool(keep.all()):
                self._append_seq(b, k[b], v[b])  # (H, T, D)
            elif bool(keep.any()):
                idx = keep.nonzero()[:, 0].to(k.device)
                self._append_seq(b, k[b].index_select(1, idx), v[b].index_select(1, idx))  # (H, T_b, D)
        self.lengths += valid.long().sum(-1)

    def _append_seq(self, b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (H, T, D) of sequence b's new real tokens."""
        raise NotImplementedError

    def attend(self, q: torch.Tensor, scaling: float, window: Optional[int] = None) -> torch.Tensor:
        """q: (B, Hq, Tq, D) for the last Tq tokens of the last append -> (B, Hq, Tq, D). Causal; padding queries
        get 0."""
        raise NotImplementedError

    def stored_bytes(self) -> Bytes:
        raise NotImplementedError

    def seq_bytes(self, b: int) -> Bytes:
        """Exact bytes held for sequence b (`stored_bytes` is their sum over the batch)."""
        raise NotImplementedError

    def transfer_bytes(self) -> Bytes:
        return self.stored_bytes()

    def export_seq(self, b: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def import_seq(self, b: int, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


def grown_capacity(have: int, need: int, min_step: int) -> int:
    """Slots to hold `need`, growing from `have`: exactly `need` when empty (an installed prompt), else at least 1/8
    (and `min_step`) more. Appends stay amortized O(1), and a decode server's store holds at most ~12% more than its
    tokens (doubling would hold up to twice a long prompt's KV once its first output token arrives)."""
    return need if have == 0 else max(need, have + max(min_step, have // 8))


def key_mask(key_pos: torch.Tensor, key_ok: torch.Tensor, q_pos: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """Which keys each query may see. key_pos, key_ok: (B, N); q_pos: (B, Tq) -> (B, 1, Tq, N) bool."""
    kp, qp = key_pos[:, None, :], q_pos[:, :, None]  # (B, 1, N), (B, Tq, 1)
    ok = key_ok[:, None, :] & (kp <= qp) & (qp >= 0)
    if window is not None:
        ok &= kp > qp - window
    return ok[:, None]


def masked_softmax(scores: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis in fp32; rows with no visible key give all zeros (padding queries)."""
    s = scores.float().masked_fill(~ok, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.nan_to_num(p, nan=0.0)


class KVMethod:
    """A KV method built from its validated config; makes one `LayerKV` per attention layer."""

    def __init__(self, config: QuantConfig):
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def quantized_prefill(self) -> bool:
        """True if prefill attention reads the compressed KV (else 16-bit attention over the fresh K/V)."""
        return False

    def new_layer(self, layer_idx: int, num_layers: int, batch: int, kv_heads: int, head_dim: int,
                  device, dtype: torch.dtype) -> LayerKV:
        raise NotImplementedError

    @property
    def decodes_ahead(self) -> bool:
        """True if `prepare_import` starts work in the background (a decode worker then calls it when a payload
        arrives, not at admission)."""
        return False

    def warm_up(self) -> None:
        """Start what serving the method uses before the first request (CacheGen: its coder processes)."""

    def export_layers(self, stores: list[LayerKV], b: int) -> list[dict[str, torch.Tensor]]:
        """Sequence b's wire payload of every layer (`export_seq` of each store, in order)."""
        return [s.export_seq(b) for s in stores]

    def prepare_import(self, states: list[dict[str, torch.Tensor]]):
        """Start installing a received payload (one `export_seq` dict per layer) before its stores exist; returns
        what `import_layers` takes. By default nothing to start: the payload itself."""
        return states

    def import_layers(self, stores: list[LayerKV], b: int, prepared) -> None:
        """Install a payload (`prepare_import`'s result, or the per-layer dicts as received) into sequence b of each
        layer's store."""
        for store, state in zip(stores, prepared):
            store.import_seq(b, state)
