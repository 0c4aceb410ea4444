"""Timing of one method's serving costs on this device, through the very code `hack bench jct` runs.

Each phase is timed around the serving pipeline's own functions (`hack_cli.serve`), so the simulator replays
measured costs of the same work:
  prefill   `prefill_payload`: the model's prefill with the method's cache (compressing as KV is produced)
  compress  `pack_payload(export_payload(cache))`: every layer's wire payload in one buffer
  install   `DecodeEngine.install`: unpacking and `import_seq` into fresh decode-side stores
  decode    `DecodeEngine.step`: one iteration of a batch of B requests with C tokens of context each
and the bytes: payload (the method's transfer bytes, exact), the manifest that travels with it, and what the
decode-side stores hold. Times are wall-clock (the pipeline's host work included), synchronized, median of
`repeats`.
"""
from __future__ import annotations

import copy
import pickle
import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device):
    """(seconds, result) of fn(), synchronized on both ends."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


@torch.no_grad()
def measure_prompt(model, method, device: torch.device, L: int, repeats: int) -> dict:
    """prefill, compress and install times and the bytes of one L-token prompt."""
    from hack_cli.serve.decode import DecodeEngine, NullWriter
    from hack_cli.serve.link import HEADER_LEN, pack_payload
    from hack_cli.serve.prefill import export_payload, prefill_payload, prompt_ids

    ids = prompt_ids(0, L, L, model.config.get_text_config().vocab_size, device)
    engine = DecodeEngine(model, method, device, float("inf"), NullWriter(), time.monotonic())
    times: dict[str, list[float]] = {"prefill": [], "compress": [], "install": []}
    for _ in range(repeats):
        t, (cache, _) = timed(lambda: prefill_payload(model, method, ids), device)
        times["prefill"].append(t)
        t, (payload, manifest) = timed(lambda: pack_payload(export_payload(cache)), device)
        times["compress"].append(t)
        del cache
        t, stores = timed(lambda: engine.install(manifest, payload), device)
        times["install"].append(t)
    row = {"L": L, **{k: statistics.median(v) for k, v in times.items()}}
    row["payload"] = int(payload.numel())
    row["header"] = len(pickle.dumps(manifest)) + HEADER_LEN * 8  # what travels besides the payload
    row["stored"] = int(sum(s.stored_bytes().total for s in stores))
    return row


def _copy(stores: list, install: Callable) -> list:
    """An independent copy of one request's stores (a fresh install where a store cannot be deep-copied)."""
    try:
        return copy.deepcopy(stores)
    except (TypeError, RuntimeError):
        return install()


@torch.no_grad()
def decode_engine(model, method, device: torch.device, C: int, B: int, payload_method=None, engine: str = "eager",
                  headroom: int = 1024):
    """A decode engine (`eager`: DecodeEngine, `graph`: GraphDecodeEngine with B slots of C + `headroom` tokens) with
    B active requests of C tokens of context each: one real prompt of C tokens prefilled (by `payload_method`,
    default `method`), exported and installed as the decode side does, B times."""
    from hack_cli.serve.decode import Active, DecodeEngine, NullWriter
    from hack_cli.serve.graph import GraphDecodeEngine
    from hack_cli.serve.link import pack_payload
    from hack_cli.serve.metrics import RequestRecord
    from hack_cli.serve.prefill import export_payload, prefill_payload, prompt_ids

    ids = prompt_ids(0, C, C, model.config.get_text_config().vocab_size, device)
    cache, first = prefill_payload(model, payload_method or method, ids)
    payload, manifest = pack_payload(export_payload(cache))
    del cache
    record = lambda: RequestRecord(-1, C, headroom, True, 0.0)  # noqa: E731
    if engine == "graph":
        eng = GraphDecodeEngine(model, method, device, float("inf"), NullWriter(), time.monotonic(),
                                capacity=C + headroom, max_slots=B)
        held = [eng.install(manifest, payload, record()) for _ in range(B)]
    else:
        eng = DecodeEngine(model, method, device, float("inf"), NullWriter(), time.monotonic())
        install = lambda: eng.install(manifest, payload)  # noqa: E731
        base = install()
        held = [base] + [_copy(base, install) for _ in range(B - 1)]
    eng.active = [Active(record=record(), stores=stores, token=first, pos=C, left=10 ** 9, tokens=[])
                  for stores in held]
    return eng


@torch.no_grad()
def measure_decode(model, method, device: torch.device, C: int, batches: list[int], steps: int,
                   payload_method=None, engine: str = "eager") -> list[dict]:
    """Decode iteration time of batches of B requests with C tokens of context each (`decode_engine`)."""
    engine = decode_engine(model, method, device, C, max(batches), payload_method, engine,
                           headroom=len(batches) * (steps + 1) + 1)
    requests = engine.active
    rows = []
    for B in sorted(batches):
        engine.active = requests[:B]
        engine.step()  # warm: this batch shape's kernels and allocations
        times = [timed(engine.step, device)[0] for _ in range(steps)]
        rows.append({"B": B, "C": C * B, "C_each": C, "decode": statistics.median(times)})
    engine.active = []
    del requests, engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows
