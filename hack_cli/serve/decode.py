"""The decode instance: iteration-level (continuous) batching over each request's own method stores.

Semantics (the simulator, `hack_cli.sim`, mirrors them):
  * Received payloads wait FCFS. The head is admitted when its KV at full length fits the budget:
    reserve = payload_bytes * (prompt_len + output_len) / prompt_len (the method's bytes per token as sent, for
    the prompt and every output token), and sum(reserve of admitted) <= cluster.decode_kv_budget_gb. Admission
    stops at the first request that does not fit (no overtaking). A request larger than the whole budget is an
    error.
  * Admission installs the payload: `import_seq` into one fresh `LayerKV` per layer (`KVMethod.import_layers`;
    HACK keeps the quantized pages as they are; other methods do what their design does: entropy-decode,
    dequantize, ...). A method that decodes ahead (`KVMethod.decodes_ahead`: CacheGen on coder processes) starts
    when the payload is received (`receive`: unpacked, its entropy decoding submitted to the pool in the
    background) while the loop keeps stepping; admission then waits for whatever of that work is left and installs
    the symbols. The `install` phase is what remains on the request's critical path at admission: all of the
    work for other methods, the unfinished decoding plus the copy to the device for CacheGen; the receive-side
    start (unpacking, submitting) falls in the request's `queue_decode`.
  * Every iteration, every admitted request produces one token. The model's linear layers run once over the
    whole batch (B, 1); attention runs per request over its own store (`RaggedStores`: one `attend` per request;
    the kernels' ragged-batch attention can replace that loop without changing anything else).
  * A request that has produced its last token leaves the batch and frees its reservation at once.
"""
from __future__ import annotations

import json
import math
import queue
import time
from collections import deque
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from hack_cli.errors import HackError
from hack_cli.serve.link import (H_ARRIVAL, H_COMPRESS_END, H_FIRST_TOKEN, H_OUTPUT, H_PREFILL_END,
                                 H_PREFILL_START, H_PROMPT, H_RID, H_SEND_START, HEADER_LEN, H_MANIFEST_BYTES,
                                 H_PAYLOAD_BYTES, LinkError, unpack_payload)
from hack_cli.serve.metrics import RequestRecord
from hack_cli.serve.prefill import sync


class RaggedStores:
    """The stores of one layer for the requests of a batch, attended one by one."""

    def __init__(self, stores):
        self.stores = stores

    def attend(self, q: torch.Tensor, scaling: float, window=None) -> torch.Tensor:
        """q: (B, Hq, 1, D) -> (B, Hq, 1, D)."""
        return torch.cat([s.attend(q[i:i + 1], scaling, window) for i, s in enumerate(self.stores)], 0)


class BatchLayer(DynamicLayer):
    def __init__(self, stores):
        super().__init__()
        self.stores, self.is_initialized = stores, True
        self.seen = max(int(s.lengths[0]) for s in stores)  # masks are built but unused: attention is per store

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states, value_states: (B, H, 1, D), one new token per request."""
        for i, s in enumerate(self.stores):
            s.append(key_states[i:i + 1], value_states[i:i + 1])
        return RaggedStores(self.stores), (key_states, value_states, False)

    def get_seq_length(self, *args) -> int:
        return self.seen

    def get_mask_sizes(self, query, *args) -> tuple[int, int]:
        q = query.shape[0] if isinstance(query, torch.Tensor) else query  # 5.17: cache_position; 5.2x: length
        return self.seen + q, 0


class BatchCache(Cache):
    """A transformers Cache over a batch of requests whose KV lives in separate per-request stores."""

    def __init__(self, per_layer: list[list]):
        super().__init__(layers=[BatchLayer(stores) for stores in per_layer])


class NullWriter:
    """A record writer that keeps nothing: engines run for warm-up or timing, not for a run's results."""

    def write(self, record) -> None:
        pass


@dataclass
class Active:
    record: RequestRecord
    stores: list | int  # one LayerKV (batch 1) per layer; the graph engine: the request's slot
    token: int  # the next input token
    pos: int  # its position
    left: int  # decode iterations still to run
    tokens: list  # output token ids so far


class DecodeEngine:
    name = "eager"

    def __init__(self, model, method, device: torch.device, budget_bytes: float, writer, t0: float,
                 tokens_path=None, steps_path=None):
        from hack_cli.hf.attention import text_config

        cfg = text_config(model)
        self.model, self.method, self.device, self.writer, self.t0 = model, method, device, writer, t0
        self.layers, self.kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.dtype = next(model.parameters()).dtype
        self.budget = budget_bytes
        self.used = 0
        self.waiting: deque = deque()  # (record, manifest, payload, first token, prepared import or None)
        self.active: list[Active] = []
        self.done = 0
        self.tokens_file = open(tokens_path, "w") if tokens_path else None  # jct.save_tokens: outputs, per request
        self.steps_file = open(steps_path, "w") if steps_path else None  # one line per iteration: start, batch, s
        if self.steps_file:
            self.steps_file.write("start_s,batch,context_tokens,step_s\n")

    def now(self) -> float:
        return time.monotonic() - self.t0

    def receive(self, msg) -> None:
        header, manifest, payload, recv_end = msg
        h = [float(x) for x in header[:HEADER_LEN]]
        rec = RequestRecord(rid=int(h[H_RID]), prompt_len=int(h[H_PROMPT]), output_len=int(h[H_OUTPUT]),
                            warmup=False, arrival=h[H_ARRIVAL] - self.t0,
                            prefill_start=h[H_PREFILL_START] - self.t0, prefill_end=h[H_PREFILL_END] - self.t0,
                            compress_end=h[H_COMPRESS_END] - self.t0, send_start=h[H_SEND_START] - self.t0,
                            recv_end=recv_end - self.t0, payload_bytes=int(h[H_PAYLOAD_BYTES]),
                            bytes_sent=int(h[H_PAYLOAD_BYTES] + h[H_MANIFEST_BYTES]) + HEADER_LEN * 8)
        rec.kv_reserved_bytes = math.ceil(rec.payload_bytes * (rec.prompt_len + rec.output_len) / rec.prompt_len)
        prepared = None
        if self.method.decodes_ahead:  # decoding starts now, in the background; the payload is no longer needed
            prepared, payload = self.method.prepare_import(self.unpack(manifest, payload)), None
        self.waiting.append((rec, manifest, payload, int(h[H_FIRST_TOKEN]), prepared))

    def unpack(self, manifest, payload: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """A received payload's tensors on this worker's device, one dict per layer."""
        return unpack_payload(payload.to(self.device), manifest, self.layers)

    def room(self, rec: RequestRecord) -> bool:
        """Whether `rec` may be admitted now: its reservation fits what is left of the budget."""
        return self.used + rec.kv_reserved_bytes <= self.budget

    def admit(self) -> None:
        while self.waiting and self.room(self.waiting[0][0]):
            rec, manifest, payload, first, prepared = self.waiting.popleft()
            rec.admit = self.now()
            self.used += rec.kv_reserved_bytes
            stores = self.install(manifest, payload, rec, prepared)
            sync(self.device)
            rec.install_end = self.now()
            act = Active(rec, stores, first, rec.prompt_len, rec.output_len - 1, [first])
            if act.left == 0:
                self.finish(act, rec.install_end)
            else:
                self.active.append(act)
        if self.waiting and not self.active:
            rec = self.waiting[0][0]
            raise HackError(f"request {rec.rid} needs {rec.kv_reserved_bytes / 1e9:.3f} GB of decode KV, more than "
                            f"the whole cluster.decode_kv_budget_gb={self.budget / 1e9:g}")

    def install(self, manifest, payload: torch.Tensor | None, rec: RequestRecord | None = None,
                prepared=None) -> list:
        """A request's payload installed into fresh stores, one per layer. prepared: what `receive` started for it
        (`KVMethod.prepare_import`), if anything; otherwise the payload is unpacked here."""
        if prepared is None:
            prepared = self.method.prepare_import(self.unpack(manifest, payload))
        stores = [self.method.new_layer(layer, self.layers, 1, self.kv_heads, self.head_dim, self.device, self.dtype)
                  for layer in range(self.layers)]
        self.method.import_layers(stores, 0, prepared)
        return stores

    @torch.no_grad()
    def step(self) -> None:
        """One iteration: every active request produces one token."""
        batch = self.active
        begin = self.now()
        tokens = self.forward(batch)
        end = self.now()
        if self.steps_file:
            self.steps_file.write(f"{begin:.6f},{len(batch)},{sum(a.pos for a in batch)},{end - begin:.6f}\n")
        still = []
        for a, tok in zip(batch, tokens):
            a.token, a.pos, a.left = tok, a.pos + 1, a.left - 1
            a.tokens.append(tok)
            if a.left == 0:
                self.finish(a, end)
            else:
                still.append(a)
        self.active = still

    def forward(self, batch: list[Active]) -> list[int]:
        """The next token of every request of the batch (greedy); the stores hold the input tokens' K/V after."""
        from hack_cli.hf import cache_keyword

        ids = torch.tensor([[a.token] for a in batch], device=self.device)  # (B, 1)
        pos = torch.tensor([[a.pos] for a in batch], device=self.device)  # (B, 1)
        cache = BatchCache([[a.stores[layer] for a in batch] for layer in range(self.layers)])
        out = self.model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **{cache_keyword(self.model): cache})
        return out.logits[:, -1].argmax(-1).tolist()  # synchronizes

    def release(self, a: Active) -> int:
        """The bytes a finished request's KV held; its stores are dropped."""
        return sum(s.stored_bytes().total for s in a.stores)

    def finish(self, a: Active, end: float) -> None:
        a.record.finish = end
        a.record.kv_stored_bytes = self.release(a)
        self.used -= a.record.kv_reserved_bytes
        self.writer.write(a.record)
        if self.tokens_file:
            self.tokens_file.write(json.dumps({"rid": a.record.rid, "tokens": a.tokens}) + "\n")
            self.tokens_file.flush()
        self.done += 1


def serve_decode(engine: DecodeEngine, receiver, num_requests: int, warmup: int, idle_timeout: float) -> None:
    """Run the decode instance until all `num_requests` requests have finished."""
    ended = False
    while engine.done < num_requests:
        block = not engine.active and not ended
        msgs = []
        try:
            if block:
                msgs.append(receiver.queue.get(timeout=idle_timeout))
            while True:
                msgs.append(receiver.queue.get_nowait())
        except queue.Empty:
            if block and not msgs:
                raise LinkError(f"no message from the prefill worker for {idle_timeout:.0f} s") from None
        for msg in msgs:
            if isinstance(msg, BaseException):
                raise msg
            if msg is None:
                ended = True
                continue
            engine.receive(msg)
            engine.waiting[-1][0].warmup = engine.waiting[-1][0].rid < warmup
        engine.admit()
        if engine.active:
            engine.step()
        elif ended and not engine.waiting and engine.done < num_requests:
            raise LinkError(f"the prefill worker closed the link after {engine.done} of {num_requests} requests")
