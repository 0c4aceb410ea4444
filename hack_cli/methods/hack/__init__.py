"""HACK: homomorphic quantization of the KV cache (HACK.md §2–6). Defaults follow the authors' ATC artifact;
`conf/quant/hack_v1.yaml` sets the arXiv v1 choices (token layout, stochastic rounding, quantized prefill)."""
from __future__ import annotations

from dataclasses import dataclass

from hack_cli.config import check_choice
from hack_cli.errors import ConfigError
from hack_cli.methods.base import KVMethod, QuantConfig
from hack_cli.methods.hack.store import HackLayerKV


@dataclass
class Config(QuantConfig):
    name: str = "hack"
    bits: int = 2
    partition: int = 64  # Π
    layout: str = "channel"  # channel (ATC artifact) | token (arXiv v1)
    rounding: str = "nearest"  # nearest (artifact) | stochastic (arXiv v1; seeded, unbiased)
    summation_elimination: bool = True  # cache code sums per partition (else recompute them: same numbers)
    requant_elimination: bool = True  # keep the partly filled block in 16-bit (else re-quantize it every step)
    sink_tokens: int = 4  # leading tokens kept in 16-bit
    quantized_prefill: bool = False  # prefill attention on the quantized KV (else 16-bit over the fresh K/V)
    send_sums: bool = True  # a prefill->decode transfer carries the sums (else the receiver rebuilds them)
    meta_dtype: str = "float16"  # storage of per-partition min and scale: float16 | bfloat16
    # GPU decode kernel's dot operands: int8 (the paper's: Q̃/P̃ quantized to 8 bits per block, int32 dots) | fp16
    # (Q̃/P̃ rounded to fp16, codes widened to fp16: 1.5-2.6x faster on an H100 and closer to exact) | fp8
    operand: str = "int8"

    def __post_init__(self):
        super().__post_init__()
        if self.bits is None or self.partition is None:
            raise ConfigError("quant.bits" if self.bits is None else "quant.partition", None, "hack needs a value")
        check_choice("quant.layout", self.layout, ("channel", "token"))
        check_choice("quant.rounding", self.rounding, ("nearest", "stochastic"))
        check_choice("quant.meta_dtype", self.meta_dtype, ("float16", "bfloat16"))
        check_choice("quant.operand", self.operand, ("int8", "fp16", "fp8"))
        if self.sink_tokens < 0:
            raise ConfigError("quant.sink_tokens", self.sink_tokens, "expected >= 0")


class Method(KVMethod):
    @property
    def quantized_prefill(self) -> bool:
        return self.config.quantized_prefill

    def new_layer(self, layer_idx, num_layers, batch, kv_heads, head_dim, device, dtype):
        return HackLayerKV(self.config, layer_idx, batch, kv_heads, head_dim, device, dtype)
