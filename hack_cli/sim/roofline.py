"""Scale a measured profile to another model, GPU and tensor-parallel degree: the simulator's cost model.

A profile (`hack_cli.sim.profile`) holds, per method, least-squares fits of each phase's time over simple
features of the work. Each feature is bound by one resource, and its coefficient scales by that resource:

  phase      feature  what it is                               bound              model factor
  prefill    1        launch/host overhead                     fixed              layers
  prefill    L        GEMMs over the prompt (2·params·L)       compute, dtype     linear params
  prefill    L²       causal attention                         compute, attn(*)   layers·heads·head_dim
  compress   1, L     packing the payload                      fixed, memory      layers, KV bytes/token
  install    1, L     unpacking / decoding on the decode side  fixed, memory      layers, KV bytes/token
  decode     1        one step: weights read once (floor) +    memory + fixed     weight bytes, layers
                      host overhead (the rest)
  decode     B        per-sequence host work per step          fixed              layers
  decode     C        attention reads each request's KV        memory             KV bytes/token
                      (C: the batch's total context tokens)
  (*) the method's prefill attention arithmetic: HACK with homomorphic prefill runs its integer product at the
  INT8 tensor rate (FP8 operands at the FP8 rate); a card without that path (V100: no INT8 tensor cores) runs it
  at its FP16 rate, so the measured INT8 gain over FP16 disappears there. Everything else runs at the model's dtype
  (bf16 on cards without BF16 falls back to FP16).

compute scales by rate_source / rate_target, memory by bandwidth_source / bandwidth_target, fixed not at all (the
host is assumed alike). Tensor parallelism over `tp` GPUs divides compute and memory terms by `tp` and adds two
ring all-reduces of the layer's activations per layer (tp: the fewest GPUs of one instance holding the weights, and
on the decode side also the KV budget) (2·(tp−1)/tp · tokens·hidden·2 bytes over the
intra-instance link, plus a latency each). Bytes on the wire and in the decode budget scale with the model's KV
bytes per token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from hack_cli.errors import HackError
from hack_cli.sim.catalog import GPU, get_gpu
from hack_cli.sim.payload import exact_bytes

ALLREDUCE_LATENCY_S = 10e-6  # assumed per all-reduce (order of NCCL's small-message latency on one node)
WEIGHT_HEADROOM = 0.9  # weights (+ the decode KV budget) must fit this share of the TP group's GPU memory
FEATURES = {"prefill": ("1", "L", "L2"), "compress": ("1", "L"), "install": ("1", "L"), "decode": ("1", "B", "C")}
DTYPE_ARITHMETIC = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# Methods whose prefill attention can run on their compressed codes, and the arithmetic it then uses.
QUANTIZED_PREFILL_ARITHMETIC = {"hack": "int8", "fp8": "fp8"}


@dataclass(frozen=True)
class Arch:
    """What the roofline needs of a transformer architecture (a `model.architecture` mapping)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, a: dict) -> "Arch":
        heads = a["num_attention_heads"]
        return cls(a["num_hidden_layers"], a["hidden_size"], heads, a.get("num_key_value_heads", heads),
                   a.get("head_dim") or a["hidden_size"] // heads, a["intermediate_size"], a["vocab_size"],
                   bool(a.get("tie_word_embeddings", False)))

    @property
    def layer_params(self) -> int:
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden
        return attn + 3 * self.hidden * self.intermediate

    @property
    def linear_params(self) -> int:
        """Parameters a token's forward multiplies by: the layers and the LM head."""
        return self.layers * self.layer_params + self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + (0 if self.tied else self.vocab * self.hidden)

    @property
    def attention_width(self) -> int:
        return self.layers * self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """K and V elements per token over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim


def evaluate(fit: dict, **x: float) -> float:
    """A fitted phase at one work point, e.g. evaluate(fit, L=4096)."""
    values = {"1": 1.0, "L": x.get("L", 0.0), "L2": x.get("L", 0.0) ** 2, "B": x.get("B", 0.0),
              "C": x.get("C", 0.0)}
    return float(sum(c * values[f] for f, c in zip(fit["features"], fit["coef"])))


def tp_degree(arch: Arch, dtype_bytes: int, gpu: Optional[GPU], kv_bytes: float = 0.0) -> int:
    """Smallest power-of-two number of GPUs of one instance whose memory holds the weights and `kv_bytes`."""
    if gpu is None:
        return 1
    tp, weights = 1, arch.params * dtype_bytes
    while (weights + kv_bytes) / tp > WEIGHT_HEADROOM * gpu.memory_bytes:
        tp *= 2
        if tp > gpu.max_gpus:
            raise HackError(f"{weights / 1e9:.0f} GB of weights and {kv_bytes / 1e9:.0f} GB of KV do not fit one "
                            f"{gpu.name} instance ({gpu.max_gpus} x {gpu.memory_gb} GB)")
    return tp


class Costs:
    """Per-request phase times (seconds) and bytes of one method on one simulated cluster."""

    def __init__(self, profile: dict, method: dict, arch: dict, dtype: str, prefill_gpu: str, decode_gpu: str,
                 link_gbps: float, decode_kv_budget_gb: float = 0.0):
        self.profile, self.method = profile, method
        self.src, self.tgt = Arch.of(profile["model"]["architecture"]), Arch.of(arch)
        self.dtype, self.model_dtype = DTYPE_ARITHMETIC[dtype], dtype
        self.dtype_bytes = 4 if dtype == "float32" else 2
        self.source = None if profile["card"] in ("cpu", None) else get_gpu(profile["card"])
        self.prefill_gpu, self.decode_gpu = self._target(prefill_gpu), self._target(decode_gpu)
        self.tp_prefill = tp_degree(self.tgt, self.dtype_bytes, self.prefill_gpu)
        self.tp_decode = tp_degree(self.tgt, self.dtype_bytes, self.decode_gpu, decode_kv_budget_gb * 1e9)
        self.link_bytes_per_s = link_gbps * 1e9 / 8
        quant = method["quant"]
        self.attn_arithmetic = QUANTIZED_PREFILL_ARITHMETIC.get(quant["name"], self.dtype) \
            if quant.get("quantized_prefill") else self.dtype
        self.coef = {phase: self._scaled(phase) for phase in FEATURES}

    def _target(self, name: str) -> Optional[GPU]:
        """None: the profiled card itself (`local`, or the same card) — no scaling."""
        if name == "local" or (self.source is not None and get_gpu(name).name == self.source.name):
            return None
        if self.source is None:
            raise HackError(f"a CPU profile cannot be scaled to GPU {name!r}: profile on a GPU, or use cluster "
                            "prefill_gpu=local decode_gpu=local")
        return get_gpu(name)

    # --------------------------------------------------------------------------------------- scaling
    def _compute(self, arithmetic: str, gpu: Optional[GPU]) -> float:
        if gpu is None:
            return 1.0
        return self.source.rate(arithmetic)[0] / gpu.rate(arithmetic)[0]

    def _memory(self, gpu: Optional[GPU]) -> float:
        return 1.0 if gpu is None else self.source.bandwidth / gpu.bandwidth

    def factors(self, phase: str) -> dict[str, tuple[str, float]]:
        """feature -> (bound, factor) for `phase` on its instance: the per-phase split the report states."""
        s, t = self.src, self.tgt
        layers, kv = t.layers / s.layers, t.kv_width / s.kv_width
        if phase == "prefill":
            gpu, tp = self.prefill_gpu, self.tp_prefill
            return {"1": ("fixed", layers),
                    "L": (f"compute:{self.dtype}", t.linear_params / s.linear_params * self._compute(self.dtype, gpu) / tp),
                    "L2": (f"compute:{self.attn_arithmetic}",
                           t.attention_width / s.attention_width * self._compute(self.attn_arithmetic, gpu) / tp)}
        if phase in ("compress", "install"):
            gpu, tp = (self.prefill_gpu, self.tp_prefill) if phase == "compress" else (self.decode_gpu, self.tp_decode)
            return {"1": ("fixed", layers), "L": ("memory", kv * self._memory(gpu) / tp)}
        gpu, tp = self.decode_gpu, self.tp_decode
        return {"1": ("memory+fixed", layers), "B": ("fixed", layers), "C": ("memory", kv * self._memory(gpu) / tp)}

    def _scaled(self, phase: str) -> dict:
        fit = self.method["phases"][phase]
        factors = self.factors(phase)
        coef = [c * factors[f][1] for f, c in zip(fit["features"], fit["coef"])]
        if phase == "decode" and self.source is not None:
            # The intercept's weight-read floor scales with weight bytes and bandwidth; the rest is host time.
            weights = self.profile["model"]["weight_bytes"]
            floor = min(fit["coef"][0], weights / self.source.bandwidth)
            host = fit["coef"][0] - floor
            coef[0] = floor * self.tgt.params / self.src.params * self._memory(self.decode_gpu) / self.tp_decode \
                + host * self.tgt.layers / self.src.layers
        return {"features": fit["features"], "coef": coef}

    def _allreduce(self, tokens: float, gpu: Optional[GPU], tp: int) -> float:
        if tp == 1:
            return 0.0
        per = 2 * (tp - 1) / tp * tokens * self.tgt.hidden * self.dtype_bytes / (gpu.interconnect_gbs * 1e9)
        return 2 * self.tgt.layers * (per + ALLREDUCE_LATENCY_S)

    # --------------------------------------------------------------------------------------- costs
    def prefill(self, L: int) -> float:
        return evaluate(self.coef["prefill"], L=L) + self._allreduce(L, self.prefill_gpu, self.tp_prefill)

    def compress(self, L: int) -> float:
        return evaluate(self.coef["compress"], L=L)

    def install(self, L: int) -> float:
        return evaluate(self.coef["install"], L=L)

    def decode_step(self, contexts: list[int]) -> float:
        B = len(contexts)
        return evaluate(self.coef["decode"], B=B, C=sum(contexts)) + self._allreduce(B, self.decode_gpu, self.tp_decode)

    def _bytes(self, kind: str, tokens: int) -> int:
        if self.method["bytes"].get("exact"):  # the profiler checked `exact_bytes` against what it measured
            t = self.tgt
            payload, stored = exact_bytes(self.method["quant"], t.layers, t.kv_heads, t.head_dim, self.model_dtype,
                                          tokens)
            return payload if kind == "payload" else stored
        table = self.method["bytes"]
        per_token = np.interp(tokens, table["tokens"], np.asarray(table[kind]) / np.asarray(table["tokens"]))
        return int(round(per_token * tokens * self.tgt.kv_width / self.src.kv_width))

    def payload_bytes(self, L: int) -> int:
        """The method's transfer bytes for an L-token prompt: exact (`payload.exact_bytes`, where the profile found
        it to reproduce the measured bytes), else the profile's bytes per token interpolated between its lengths
        and scaled by the model's KV size."""
        return self._bytes("payload", L)

    def wire_bytes(self, L: int) -> int:
        return self.payload_bytes(L) + int(self.method["bytes"].get("header", 0))

    def reserved_bytes(self, L: int, output_len: int) -> int:
        """Decode budget a request holds: the payload's bytes per token for the prompt and every output token."""
        return math.ceil(self.payload_bytes(L) * (L + output_len) / L)

    def stored_bytes(self, tokens: int) -> int:
        """What the decode-side stores hold for a sequence of `tokens` tokens."""
        return self._bytes("stored", tokens)

    def transfer_time(self, L: int) -> float:
        return self.wire_bytes(L) / self.link_bytes_per_s

    def split(self) -> list[dict]:
        """Rows (phase, feature, bound, factor) describing how this cluster scales the profile (the decode
        intercept's factor is the effective one: its weight-read floor scaled, its host part not)."""
        rows = []
        for p in FEATURES:
            measured = dict(zip(self.method["phases"][p]["features"], self.method["phases"][p]["coef"]))
            scaled = dict(zip(self.coef[p]["features"], self.coef[p]["coef"]))
            for f, (bound, factor) in self.factors(p).items():
                if measured.get(f):
                    factor = scaled[f] / measured[f]
                rows.append({"phase": p, "feature": f, "bound": bound, "factor": factor})
        return rows
