"""A transformers `Cache` whose layers keep KV in a method's compressed form (see `methods.base.LayerKV`).

`update` compresses the new tokens and hands the attention function the layer store itself plus the fresh 16-bit
K/V (used only for 16-bit prefill attention); the registered attention function (`hf.attention`) does the rest.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import Cache, DynamicLayer


class MethodLayer(DynamicLayer):
    def __init__(self, cache: "MethodCache", layer_idx: int):
        super().__init__()
        self.cache, self.layer_idx = cache, layer_idx
        self.store = None
        self.seen = 0  # tokens appended including padding: the coordinates transformers builds masks in

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        c = self.cache
        self.device, self.is_initialized = key_states.device, True
        B, H, _, D = key_states.shape
        self.store = c.method.new_layer(self.layer_idx, c.num_layers, B, H, D, key_states.device, key_states.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states, value_states: (B, H, T, D) with RoPE applied."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        T = key_states.shape[2]
        fresh = int(self.store.lengths.sum()) == 0
        self.store.append(key_states, value_states, self.cache.valid(self.seen, T))
        self.seen += T
        prefill16 = fresh and T > 1 and not self.cache.method.quantized_prefill
        return self.store, (key_states, value_states, prefill16)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a compressed KV cache cannot be cropped")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("select sequences by building a new cache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("beam search is not supported on compressed KV caches")


class MethodCache(Cache):
    """One `MethodLayer` per decoder layer. `attention_mask` (B, T) of the first prefill marks left padding."""

    def __init__(self, method, num_layers: int, attention_mask: Optional[torch.Tensor] = None):
        self.method, self.num_layers = method, num_layers
        self.padding_mask = None if attention_mask is None else attention_mask.bool().cpu()  # (B, T0)
        super().__init__(layers=[MethodLayer(self, i) for i in range(num_layers)])

    def valid(self, start: int, n: int) -> Optional[torch.Tensor]:
        """(B, n) bool for tokens start..start+n (True = real token), or None when nothing is padded."""
        if self.padding_mask is None or start >= self.padding_mask.shape[1]:
            return None
        m = self.padding_mask[:, start:start + n]
        if m.shape[1] < n:  # tokens past the given mask (decode steps) are real
            m = torch.cat([m, torch.ones(m.shape[0], n - m.shape[1], dtype=torch.bool)], 1)
        return m

    @property
    def stores(self):
        return [layer.store for layer in self.layers if layer.store is not None]
