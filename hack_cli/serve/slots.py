"""Decode slots: every layer's KV for all requests of the decode instance, in one store per layer, attended by one
kernel call per layer — the storage of the graph decode engine (`hack_cli/serve/graph.py`).

A slot is one request's place in the decode batch: sequence b of each layer's `LayerKV`, built with batch = slots and
every tensor allocated at full capacity up front, so nothing moves during a run and a captured CUDA graph stays
valid. The method's own code installs a payload (`import_layers`); between steps, HACK's full open blocks are closed
and KIVI's full residual flushed with the method's quantizer over every layer at once (the layers' tensors are views
of one tensor per name with a leading layer axis, `_allocate_all`), not one layer at a time. The host keeps each
slot's counters and writes them, with the step's token ids and positions, into one device tensor before each step.
The step itself (`append`, `attend`) only reads that tensor: no host synchronization, no shape that depends on a
request, so it can be captured once per batch bucket and replayed.

Slots of a bucket that hold no request take part with zero counters: their attention covers nothing (output 0) and
their one written K/V row lands in a free slot, overwritten when a request is installed there.

Methods: fp16 (`FP16Slots`: ragged split-KV attention over 16-bit K/V, `hack_kernels.fp16_decode`), CacheGen
(`DecodedSlots`: decoded to 16-bit K/V at install, as its receiver does, then attended like fp16), HACK in the
channel layout with both eliminations (`HackSlots`: the homomorphic decode kernel over the quantized blocks, the
16-bit open block and sinks) and KIVI (`KiviSlots`: the fused-dequant kernel `hack_kernels.kivi_decode` over its
quantized groups and 16-bit residual).
"""
from __future__ import annotations

import heapq

import torch

from hack_cli.errors import HackError

IDS, POS = 0, 1  # rows of the step state: token ids and positions, then the method's counters


class Slots:
    """`slots` request places of `capacity` tokens each, for every layer of a model.

    The host counters of each slot live here as Python ints (`self.count[name][b]`): a step changes them for every
    active slot, and writing them into every layer's own counter tensors each step would cost more host time than
    the step. The layers' counters are brought up to date only where the method's code reads them (`_sync`)."""

    counters: tuple[str, ...] = ()  # the method's counters (host ints per slot and rows of the step state)
    holds_16bit = False  # True: the slots hold decoded 16-bit K/V, so a request reserves fp16's bytes

    def __init__(self, method, num_layers: int, slots: int, capacity: int, kv_heads: int, head_dim: int, device,
                 dtype: torch.dtype):
        self.method, self.slots, self.capacity, self.device = method, slots, capacity, torch.device(device)
        self.layers = [method.new_layer(i, num_layers, slots, kv_heads, head_dim, self.device, dtype)
                       for i in range(num_layers)]
        self.stacked = self._allocate_all()
        self.count = {name: [0] * slots for name in self.counters}
        self.free = list(range(slots))  # a heap: the lowest free slot is taken first, so buckets stay small
        rows = 2 + len(self.step_rows)
        self.state = torch.zeros(rows, slots, dtype=torch.int32, device=self.device)  # read by the captured step
        self.host = torch.zeros(rows, slots, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        self.host_np = self.host.numpy()

    # -- what each method defines
    @staticmethod
    def check(method, kv_heads: int, head_dim: int) -> None:
        """Raise HackError if these slots cannot hold `method`'s KV."""

    step_rows: tuple[str, ...] = ()  # the step state's counter rows (after ids and positions)

    def _allocate(self, layer) -> None:
        """Grow the layer's tensors to `capacity` tokens for every slot."""
        raise NotImplementedError

    def _step_counters(self, b: int) -> tuple[int, ...]:
        """Slot b's values of `step_rows` for the next step, its new token included."""
        raise NotImplementedError

    def tensors(self, layer) -> list[torch.Tensor]:
        """The device tensors a layer's store holds for all its slots."""
        raise NotImplementedError

    def _allocate_all(self) -> dict[str, torch.Tensor]:
        """Every layer's tensors at full capacity; returns those the method's between-step work (closing HACK's
        blocks, flushing KIVI's residual) updates for every layer at once, {name: (layers, slots, ...)} with each
        layer's own tensor a view of it (`_stack_layers`). By default one layer at a time, nothing stacked."""
        for layer in self.layers:
            self._allocate(layer)
        return {}

    def _home(self, store) -> dict[str, torch.Tensor]:
        """Where a store keeps a new token's 16-bit K and V: {"k": (slots, H, N, D), "v": ...}."""
        raise NotImplementedError

    def _stack_layers(self, where: str, shapes: dict) -> dict[str, torch.Tensor]:
        """One zero tensor per name of `shapes` ({name: (per-layer shape, dtype)}) with a leading layer axis, each
        layer's dict attribute `where` (`blocks`, `open`, `t`, ...) holding views of it, so the method's own code
        still reads and writes its layer's tensors. Allocated at once: the per-layer tensors it replaces must be
        small (not yet grown to capacity)."""
        out = {}
        for name, (shape, dtype) in shapes.items():
            out[name] = torch.zeros(len(self.layers), *shape, dtype=dtype, device=self.device)  # (layers, slots, ...)
            for i, layer in enumerate(self.layers):
                getattr(layer, where)[name] = out[name][i]
        return out

    def attend(self, layer: int, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """q: (c, Hq, 1, D) -> (c, Hq, 1, D) over everything slots 0..c-1 hold, the new token included."""
        raise NotImplementedError

    def advance(self, b: int) -> None:
        """Slot b's request stored one more token (after a step)."""
        raise NotImplementedError

    # -- shared
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (c, H, 1, D) the new token of slots 0..c-1, written where the step state's `write` row says."""
        c = k.shape[0]
        at = self.row("write", c).long()  # (c,)
        slot = torch.arange(c, device=k.device)
        for x, new in (("k", k), ("v", v)):
            home = self._home(self.layers[layer])[x]
            home[slot, :, at] = new[:, :, 0].to(home.dtype)  # (c, H, D)

    def _sync(self, b: int) -> None:
        """Every layer's own counters of slot b from the host ints."""
        for layer in self.layers:
            for name in self.counters:
                getattr(layer, name)[b] = self.count[name][b]

    def take(self) -> int:
        if not self.free:
            raise HackError("no free decode slot")  # the engine admits only when one is free
        return heapq.heappop(self.free)

    def install(self, b: int, state, tokens: int) -> None:
        """One request's payload into slot b: one dict per layer (`export_seq`'s), or what the method's
        `prepare_import` made of them."""
        if tokens > self.capacity:
            raise HackError(f"a request of {tokens} tokens does not fit decode slots of {self.capacity}")
        self.method.import_layers(self.layers, b, state)
        for name in self.counters:
            self.count[name][b] = int(getattr(self.layers[0], name)[b])

    def release(self, b: int) -> None:
        """Slot b is free again; its counters return to zero (its tensors are overwritten by the next install)."""
        for name in self.counters:
            self.count[name][b] = 0
        self._sync(b)
        heapq.heappush(self.free, b)

    def stored_bytes(self, b: int) -> int:
        self._sync(b)
        return sum(layer.seq_bytes(b).total for layer in self.layers)

    def prepare(self, tokens: dict[int, tuple[int, int]]) -> None:
        """The step state for slots {b: (token id, position)} active in the next step; one host-to-device copy."""
        h = self.host_np
        h[:] = 0
        for b, (token, pos) in tokens.items():
            h[IDS, b], h[POS, b] = token, pos
            h[2:, b] = self._step_counters(b)
        self.state.copy_(self.host, non_blocking=True)

    def row(self, name: str, c: int) -> torch.Tensor:
        """Device counter `name` of slots 0..c-1 (a view of the step state)."""
        return self.state[2 + self.step_rows.index(name), :c]


class FP16Slots(Slots):
    """16-bit K/V (slots, H, capacity, D) per layer (`FP16LayerKV`)."""

    counters = ("lengths",)
    step_rows = ("write", "length")  # where the new token goes; keys attended (new token included; 0 = idle)

    def _allocate(self, layer) -> None:
        from hack_cli.methods.dequant import grow

        for x in "kv":
            layer.kv[x] = grow(layer.kv[x], self.capacity)

    def _step_counters(self, b) -> tuple[int, ...]:
        n = self.count["lengths"][b]
        return n, n + 1

    def tensors(self, layer) -> list[torch.Tensor]:
        return list(layer.kv.values())

    def _home(self, store) -> dict[str, torch.Tensor]:
        return store.kv

    def attend(self, layer, q, scaling) -> torch.Tensor:
        from hack_kernels.fp16_decode import fp16_decode

        c = q.shape[0]
        store = self.layers[layer]
        out = fp16_decode(store.kv["k"][:c], store.kv["v"][:c], self.row("length", c), q[:, :, 0], scaling)
        return out[:, :, None]  # (c, Hq, 1, D)

    def advance(self, b) -> None:
        self.count["lengths"][b] += 1


class DecodedSlots(FP16Slots):
    """Methods whose decode side turns the payload into ordinary 16-bit K/V at install and attends it like fp16:
    CacheGen (its receiver entropy-decodes and dequantizes, HACK.md §7). The slots hold 16 bits, so a request's
    reservation and stored bytes are fp16's (`GraphDecodeEngine`), and install time includes what is left of the
    decoding (CacheGen's entropy decoding starts when the payload arrives, on its coder processes) and the
    dequantization."""

    def __init__(self, method, num_layers: int, *args, **kwargs):
        from hack_cli.methods.fp16 import Config, Method

        super().__init__(Method(Config()), num_layers, *args, **kwargs)
        self.source = method  # the method whose payloads arrive

    holds_16bit = True

    @staticmethod
    def check(method, kv_heads: int, head_dim: int) -> None:
        if method.name != "cachegen":
            raise HackError(f"decoded slots take CacheGen payloads, not {method.name!r}")

    def install(self, b: int, state, tokens: int) -> None:
        """The payload installed into one fresh store of the source method per layer (all layers' entropy decoding
        at once), then each layer dequantized into slot b's 16-bit K/V and its store dropped."""
        if tokens > self.capacity:
            raise HackError(f"a request of {tokens} tokens does not fit decode slots of {self.capacity}")
        layers = len(self.layers)
        sources = [self.source.new_layer(i, layers, 1, layer.kv_heads, layer.head_dim, self.device, layer.dtype)
                   for i, layer in enumerate(self.layers)]
        self.source.import_layers(sources, 0, state)
        for layer in self.layers:
            k, v = sources.pop(0).decoded_seq(0)  # (H, n, D)
            layer.import_seq(b, {"k": k, "v": v})
        self.count["lengths"][b] = int(self.layers[0].lengths[b])


class HackSlots(Slots):
    """HACK's blocks (`HackLayerKV`, channel layout, both eliminations): codes, min/scale and sums of closed blocks,
    the 16-bit open block and sinks. A block closes (is quantized by the method's one-pass kernel) between steps,
    as soon as its Π-th token is stored."""

    counters = ("lengths", "n_closed", "fill", "sink_fill")
    step_rows = ("write", "n_closed", "fill", "sink_fill")

    @staticmethod
    def check(method, kv_heads: int, head_dim: int) -> None:
        from hack_kernels.dispatch import covered

        cfg = method.config
        if cfg.layout != "channel" or not (cfg.requant_elimination and cfg.summation_elimination):
            raise HackError("the graph decode engine runs HACK in the channel layout with both eliminations "
                            "(quant.layout=channel); use jct.engine=eager for the others")
        if not covered(method.new_layer(0, 1, 1, kv_heads, head_dim, "cpu", torch.float16)):
            raise HackError("the HACK decode kernel does not cover this configuration (2/4-bit codes, Π >= 32, "
                            "powers of two); use jct.engine=eager")

    def _allocate_all(self) -> dict[str, torch.Tensor]:
        first = self.layers[0]
        nb = (self.capacity - first.cfg.sink_tokens) // first.part + 1  # blocks a slot may close, plus one
        blocks = self._stack_layers("blocks", first._shapes(nb))
        opened = self._stack_layers("open", {x: (t.shape, t.dtype) for x, t in first.open.items()})
        return {**blocks, **{f"{x}_open": t for x, t in opened.items()}}

    def _step_counters(self, b) -> tuple[int, ...]:
        fill = self.count["fill"][b]
        return fill, self.count["n_closed"][b], fill + 1, self.count["sink_fill"][b]

    def tensors(self, layer) -> list[torch.Tensor]:
        return [*layer.blocks.values(), *layer.open.values(), *layer.sinks.values()]

    def install(self, b, state, tokens) -> None:
        sinks = self.layers[0].cfg.sink_tokens
        if tokens <= sinks:
            raise HackError(f"a prompt of {tokens} tokens does not fill the {sinks} sink tokens")
        super().install(b, state, tokens)

    def _home(self, store) -> dict[str, torch.Tensor]:
        return store.open  # the 16-bit open block

    def attend(self, layer, q, scaling) -> torch.Tensor:
        from hack_kernels.decode import HackKV, hack_decode

        c = q.shape[0]
        s = self.layers[layer]
        t = {name: blocks[:c] for name, blocks in s.blocks.items()}
        kv = HackKV(s.cfg.layout, s.bits, t["k_codes"], t["k_mn"], t["k_scale"], t["k_sum"], t["v_codes"],
                    t["v_mn"], t["v_scale"], t["v_sum"], s.sinks["k"][:c], s.sinks["v"][:c], s.open["k"][:c],
                    s.open["v"][:c], self.row("n_closed", c), self.row("fill", c), self.row("sink_fill", c))
        out = hack_decode(kv, q[:, :, 0], scaling, operand=s.cfg.operand,
                          max_blocks=s.blocks["k_codes"].shape[2])  # (c, Hq, D)
        return out[:, :, None]

    def advance(self, b) -> None:
        n = self.count
        n["lengths"][b] += 1
        n["fill"][b] += 1
        if n["fill"][b] == self.layers[0].part:  # the open block is full: quantize it in every layer
            self._close(b, n["n_closed"][b])
            n["n_closed"][b] += 1
            n["fill"][b] = 0

    def _close(self, b: int, nc: int) -> None:
        """Slot b's open block becomes closed block nc in every layer: `close_block`'s work (the one-pass quantize
        kernel with `hack_kernels.dispatch.quantize_into`'s arguments) as one kernel call over all layers' blocks and
        one write per stored tensor, instead of a few dozen small operations per layer (kernels are bit-identical
        per block; with stochastic rounding one seed serves every layer)."""
        from hack_kernels.dispatch import block_seed, quantize_layer_blocks

        first, t = self.layers[0], self.stacked
        seed = block_seed(first)
        for x in "kv":
            L, _, H, P, D = t[f"{x}_open"].shape  # (layers, slots, H, Π, D)
            res = quantize_layer_blocks(first, x, t[f"{x}_open"][:, b].float().reshape(L * H, P, D), seed)
            meta = (L, H, D) if first.kind[x] == "per_channel" else (L, H, P, first.groups)
            t[f"{x}_codes"][:, b, :, nc] = res["codes"].view(L, H, *res["codes"].shape[1:])
            t[f"{x}_mn"][:, b, :, nc] = res["mn"].view(meta)
            t[f"{x}_scale"][:, b, :, nc] = res["scale"].view(meta)
            t[f"{x}_sum"][:, b, :, nc] = res["sums"].view((L, H, P, first.groups) if x == "k" else (L, H, D))
            t[f"{x}_open"][:, b] = 0  # empty slots hold zeros


class KiviSlots(Slots):
    """KIVI's tensors (`KiviLayerKV`): codes and min/scale of the quantized groups, the 16-bit residual, attended by
    the fused-dequant kernel. When a slot's residual is full (R+G-1 tokens), its oldest G tokens are quantized (the
    method's own `_quantize_into`) before the step that adds a token: what the method's append does as that token
    arrives, so attention and stored bytes equal the eager store's at every step."""

    counters = ("lengths", "n_q", "n_res")
    step_rows = ("write", "n_q", "n_res")  # where the new token goes; quantized tokens; residual (new token included)

    @staticmethod
    def check(method, kv_heads: int, head_dim: int) -> None:
        cfg = method.config
        pow2 = lambda n: n >= 16 and n & (n - 1) == 0  # noqa: E731  (tl.arange tiles, tl.dot operands)
        if cfg.bits not in (2, 4) or not (pow2(head_dim) and pow2(cfg.partition)) or cfg.residual < 1:
            raise HackError("the KIVI decode kernel does not cover this configuration (2/4-bit codes, head_dim and G "
                            "powers of two >= 16, a residual of >= 1 token); use jct.engine=eager")

    def _allocate_all(self) -> dict[str, torch.Tensor]:
        first = self.layers[0]
        groups = max(1, (self.capacity - first.residual) // first.group)  # most key groups a slot quantizes
        shape = lambda name, t: (*t.shape[:2], groups if name in ("k_mn", "k_scale") else groups * first.group,
                                 t.shape[3])
        quantized = self._stack_layers("t", {name: (shape(name, t), t.dtype) for name, t in first.t.items()})
        residual = self._stack_layers("res", {x: (t.shape, t.dtype) for x, t in first.res.items()})
        return {**quantized, **{f"res_{x}": t for x, t in residual.items()}}

    def _step_counters(self, b) -> tuple[int, ...]:
        n_res = self.count["n_res"][b]
        return n_res, self.count["n_q"][b], n_res + 1

    def tensors(self, layer) -> list[torch.Tensor]:
        return [*layer.t.values(), *layer.res.values()]

    def _home(self, store) -> dict[str, torch.Tensor]:
        return store.res  # the 16-bit residual

    def attend(self, layer, q, scaling) -> torch.Tensor:
        from hack_kernels.kivi_decode import kivi_decode

        c = q.shape[0]
        s = self.layers[layer]
        t = {name: x[:c] for name, x in s.t.items()}
        out = kivi_decode(t, s.res["k"][:c], s.res["v"][:c], self.row("n_q", c), self.row("n_res", c), q[:, :, 0],
                          scaling, s.bits, s.group, max_tokens=t["k_codes"].shape[2])  # (c, Hq, D)
        return out[:, :, None]

    def prepare(self, tokens: dict[int, tuple[int, int]]) -> None:
        for b in tokens:
            if self.count["n_res"][b] == self.layers[0].res["k"].shape[2]:  # full: the step's token needs room
                self._flush(b)
        super().prepare(tokens)

    def _flush(self, b: int) -> None:
        """Slot b's oldest G residual tokens become a key group (and G value rows) in every layer: the method's
        `_quantize_into` (`quantize_tokens`) over all layers at once, one write per stored tensor."""
        from hack_cli.methods.kivi import quantize_tokens, token_span

        first, t, t0 = self.layers[0], self.stacked, self.count["n_q"][b]
        G = first.group
        res = [t[f"res_{x}"][:, b] for x in "kv"]  # (layers, H, R+G-1, D) each
        new = quantize_tokens(*(r[:, :, :G].float() for r in res), first.bits, G, first.vgroup, "kivi flush")
        for name, val in new.items():  # (layers, H, G or 1, ...)
            t[name][:, b, :, token_span(name, t0, G, G)] = val
        for r in res:
            r[:, :, :-G] = r[:, :, G:].clone()  # the newest R-1 tokens move to the front
        self.count["n_q"][b] += G
        self.count["n_res"][b] -= G

    def advance(self, b) -> None:
        self.count["lengths"][b] += 1
        self.count["n_res"][b] += 1


KINDS = {"fp16": FP16Slots, "hack": HackSlots, "cachegen": DecodedSlots, "kivi": KiviSlots}


def slots_class(method) -> type[Slots]:
    if method.name not in KINDS:
        raise HackError(f"the graph decode engine supports quant={'/'.join(KINDS)}, not {method.name!r}; "
                        "use jct.engine=eager")
    return KINDS[method.name]


def make_slots(method, num_layers: int, slots: int, capacity: int, kv_heads: int, head_dim: int, device,
               dtype: torch.dtype) -> Slots:
    cls = slots_class(method)
    cls.check(method, kv_heads, head_dim)
    return cls(method, num_layers, slots, capacity, kv_heads, head_dim, device, dtype)
