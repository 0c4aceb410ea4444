"""The prefill instance: FCFS, one request at a time, KV compressed by the method as the forward produces it.

For each request: wait for its arrival, run the model's prefill over a random-token prompt with a fresh
`MethodCache` (phase `prefill`; the method quantizes each layer's K/V inside the forward), export every layer
store's wire payload (`KVMethod.export_layers`: each store's `export_seq(0)`; CacheGen entropy-codes all layers'
streams at once on its coder processes) and pack it into one buffer (phase `compress`), and hand it to the link's
sender thread, which sends it while the next request is prefilled.
"""
from __future__ import annotations

import time

import torch

from hack_cli.serve.link import (H_ARRIVAL, H_COMPRESS_END, H_FIRST_TOKEN, H_OUTPUT, H_PREFILL_END,
                                 H_PREFILL_START, H_PROMPT, H_RID, HEADER_LEN, pack_payload)


def prompt_ids(seed: int, rid: int, prompt_len: int, vocab: int, device) -> torch.Tensor:
    """Random-token prompt of request `rid` (the artifact's workload): (1, prompt_len), seeded per request."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + rid)
    return torch.randint(0, vocab, (1, prompt_len), generator=g).to(device)


def sync(device: torch.device) -> None:
    """Wait for this thread's compute stream only: a device-wide synchronize would also wait for the link
    thread's pending NCCL receive, i.e. for the next message to arrive."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


@torch.no_grad()
def prefill_payload(model, method, ids: torch.Tensor):
    """Prefill `ids` (1, T) with `method`'s cache -> (the filled `MethodCache`, first output token id)."""
    from hack_cli.hf import cache_keyword, make_cache

    cache = make_cache(model, method)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
    first = int(out.logits[0, -1].argmax())
    return cache, first


def export_payload(cache) -> list[dict[str, torch.Tensor]]:
    """The wire payload of the cache's one sequence, one dict per layer."""
    return cache.method.export_layers(cache.stores, 0)


@torch.no_grad()
def serve_prefill(model, method, trace, seed: int, sender, t0: float, device: torch.device, wire: torch.device,
                  die_after: int | None = None) -> None:
    """Prefill every request of `trace` in arrival order and submit its payload to `sender`.

    wire: where the link's tensors live (the GPU with NCCL, the host with gloo).
    t0: the run's start on this worker's monotonic clock; `sender.to_decode_clock` converts timestamps to the
    decode worker's clock, in which all records are kept. die_after: fault injection, exit abruptly once that
    request's payload has been sent."""
    vocab = model.config.get_text_config().vocab_size
    offset = sender.to_decode_clock
    for req in trace:
        while (left := t0 + req.arrival_s - time.monotonic()) > 0:
            time.sleep(left)
        ids = prompt_ids(seed, req.rid, req.prompt_len, vocab, device)
        start = time.monotonic()
        cache, first = prefill_payload(model, method, ids)
        sync(device)
        prefill_end = time.monotonic()
        payload, manifest = pack_payload(export_payload(cache))
        payload = payload.to(wire)  # gloo sends host memory: copying a GPU payload out is part of the cost
        del cache
        sync(device)
        compress_end = time.monotonic()
        header = torch.zeros(HEADER_LEN, dtype=torch.float64)
        for i, v in ((H_RID, req.rid), (H_PROMPT, req.prompt_len), (H_OUTPUT, req.output_len),
                     (H_ARRIVAL, t0 + req.arrival_s + offset), (H_PREFILL_START, start + offset),
                     (H_PREFILL_END, prefill_end + offset), (H_COMPRESS_END, compress_end + offset),
                     (H_FIRST_TOKEN, first)):
            header[i] = v
        sender.submit(header, manifest, payload)
        if die_after is not None and req.rid == die_after:
            while sender.sent < req.rid and sender.error is None:
                time.sleep(0.01)
            import os

            os._exit(3)  # fault injection: the prefill worker crashes without any cleanup
