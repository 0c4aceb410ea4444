"""The graph decode engine: the decode instance's iteration as one captured CUDA graph per batch bucket.

The eager engine (`decode.py`) runs the transformers model as it is and attends each request's own stores one by
one: every step pays Python and kernel-launch time per (layer, request), tens of milliseconds on an H100 host for an
8B model, far above the ~6-10 ms the GPU needs (results/jct/README.md). This engine keeps the same semantics
(admission, phases, records) and removes that cost the way serving systems do:
  * all requests live in fixed decode slots (`slots.py`), one store per layer, attended by one ragged kernel call
    per layer (HACK: the homomorphic decode kernel; fp16: a split-KV 16-bit kernel of the same structure; KIVI:
    its fused-dequant kernel);
  * the model's own decoder layers run over the slot batch (c, 1) with our cache in place of theirs, and the
    whole iteration — embeddings, layers, norm, head, argmax — is captured once per bucket c (powers of two up to
    the number of slots) and replayed each step after one host-to-device copy of ids, positions and counters.
Between steps the host does only what changes shapes: installing payloads, closing HACK's full blocks (the
method's quantize kernel), flushing KIVI's full residual into a quantized group, freeing slots. On CPU (tests, under
TRITON_INTERPRET=1) the same step runs eagerly.

Admission is the eager engine's (the KV budget's reservations, FCFS, no overtaking) plus a free slot; the number
of slots is what the budget holds at full capacity (every slot is allocated for the longest request of the trace).
Architectures: decoder layers that take rotary `position_embeddings` (Llama, Mistral, Qwen2/3).
"""
from __future__ import annotations

import inspect
import math

import torch

from hack_cli.errors import HackError
from hack_cli.serve.decode import Active, DecodeEngine
from hack_cli.serve.metrics import RequestRecord
from hack_cli.serve.slots import IDS, POS, Slots, make_slots, slots_class

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


class SlotAttention:
    """What the cache hands the attention function for one layer: attention over the slots."""

    def __init__(self, slots: Slots, layer: int):
        self.slots, self.layer = slots, layer

    def attend(self, q: torch.Tensor, scaling: float, window=None) -> torch.Tensor:
        if window is not None:
            raise HackError("the graph decode engine has no sliding-window attention")
        return self.slots.attend(self.layer, q, scaling)


class SlotCache:
    """The cache object the decoder layers call: `update` stores the new token's K/V in the slots."""

    def __init__(self, slots: Slots):
        self.slots = slots

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key_states, value_states: (c, H, 1, D), one new token per slot of the bucket."""
        self.slots.append(layer_idx, key_states, value_states)
        return SlotAttention(self.slots, layer_idx), (key_states, value_states, False)


def buckets(slots: int) -> list[int]:
    """Batch sizes a graph is captured for: powers of two below `slots`, and `slots`."""
    return sorted({min(1 << i, slots) for i in range(math.ceil(math.log2(slots)) + 1)})


def check_graph(model, method) -> None:
    """Raise HackError (naming jct.engine=eager) if the graph engine cannot run `method` on `model`."""
    from hack_cli.hf.attention import text_config

    cfg = text_config(model)
    if cfg.model_type not in ARCHITECTURES:
        raise HackError(f"the graph decode engine supports {', '.join(ARCHITECTURES)} models, not "
                        f"{cfg.model_type!r}; use jct.engine=eager")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        raise HackError("the graph decode engine has no sliding-window attention; use jct.engine=eager")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    slots_class(method).check(method, cfg.num_key_value_heads, head_dim)


def graph_applies(model, method) -> bool:
    try:
        check_graph(model, method)
    except HackError:
        return False
    return True


class DecodeStep:
    """One decode iteration over slots 0..c-1: token ids and positions in, next tokens (greedy) out."""

    def __init__(self, model, slots: Slots, graphs: bool):
        self.model, self.slots = model, slots
        layer_forward = inspect.signature(type(model.model.layers[0]).forward).parameters
        self.cache_kw = "cache" if "cache" in layer_forward else "past_key_values"  # transformers 5.2x / 5.17
        self.sizes = buckets(slots.slots)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if graphs:
            self.capture()

    @torch.no_grad()
    def forward(self, c: int) -> torch.Tensor:
        """Next tokens (c,) of slots 0..c-1 from the step state (ids, positions, counters)."""
        m = self.model.model
        ids = self.slots.state[IDS, :c, None]  # (c, 1)
        pos = self.slots.state[POS, :c, None]
        h = m.embed_tokens(ids)  # (c, 1, hidden)
        pe = m.rotary_emb(h, pos)
        cache = {self.cache_kw: SlotCache(self.slots)}
        for layer in m.layers:
            out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe, use_cache=True, **cache)
            h = out[0] if isinstance(out, tuple) else out
        return self.model.lm_head(m.norm(h)[:, -1]).argmax(-1)  # (c,)

    def capture(self) -> None:
        """One graph per bucket, largest first, sharing one memory pool. The slots are all free: the warm-up and
        capture runs write only into free slots."""
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for c in self.sizes:
                self.forward(c)  # compile and autotune outside the capture
        torch.cuda.current_stream().wait_stream(side)
        for c in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.forward(c)
            self.graphs[c] = (graph, out)
        torch.cuda.synchronize()

    def __call__(self, c: int) -> list[int]:
        size = next(s for s in self.sizes if s >= c)
        if size in self.graphs:
            graph, out = self.graphs[size]
            graph.replay()
        else:
            out = self.forward(size)
        return out.tolist()  # synchronizes


class GraphDecodeEngine(DecodeEngine):
    """`DecodeEngine` over decode slots with a captured step (see the module docstring)."""

    name = "graph"

    def __init__(self, model, method, device, budget_bytes: float, writer, t0: float, capacity: int,
                 max_slots: int = 64, graphs: bool | None = None, **files):
        check_graph(model, method)
        super().__init__(model, method, device, budget_bytes, writer, t0, **files)
        per_slot = slot_bytes(method, self.layers, capacity, self.kv_heads, self.head_dim, self.device, self.dtype)
        n = int(min(max_slots, budget_bytes // per_slot))
        if n < 1:
            raise HackError(f"one decode slot of {capacity} tokens needs {per_slot / 1e9:.2f} GB, more than "
                            f"cluster.decode_kv_budget_gb={budget_bytes / 1e9:g}")
        self.slots = make_slots(method, self.layers, n, capacity, self.kv_heads, self.head_dim, self.device,
                                self.dtype)
        graphs = self.device.type == "cuda" if graphs is None else graphs
        self.run_step = DecodeStep(model, self.slots, graphs)

    def receive(self, msg) -> None:
        super().receive(msg)
        if self.slots.holds_16bit:  # what the slots hold is 16-bit K/V, whatever crossed the link
            rec = self.waiting[-1][0]
            per_token = 2 * self.layers * self.kv_heads * self.head_dim * 2  # (K, V) x layers x heads x dim x 2 B
            rec.kv_reserved_bytes = per_token * (rec.prompt_len + rec.output_len)

    def room(self, rec: RequestRecord) -> bool:
        return bool(self.slots.free) and super().room(rec)

    def install(self, manifest, payload: torch.Tensor | None, rec: RequestRecord | None = None,
                prepared=None) -> int:
        if prepared is None:
            prepared = self.method.prepare_import(self.unpack(manifest, payload))
        b = self.slots.take()
        self.slots.install(b, prepared, rec.prompt_len + rec.output_len if rec else 0)
        return b

    def release(self, a: Active) -> int:
        held = self.slots.stored_bytes(a.stores)
        self.slots.release(a.stores)
        return held

    def forward(self, batch: list[Active]) -> list[int]:
        self.slots.prepare({a.stores: (a.token, a.pos) for a in batch})
        tokens = self.run_step(max(a.stores for a in batch) + 1)
        for a in batch:
            self.slots.advance(a.stores)
        return [tokens[a.stores] for a in batch]


def slot_bytes(method, layers: int, capacity: int, kv_heads: int, head_dim: int, device, dtype) -> int:
    """Device bytes of one decode slot at `capacity` tokens, all layers: a one-slot store allocated and measured."""
    probe = make_slots(method, 1, 1, capacity, kv_heads, head_dim, device, dtype)
    return layers * sum(t.nbytes for t in probe.tensors(probe.layers[0]))
