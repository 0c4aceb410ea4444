"""Discrete-event simulation of disaggregated serving: the same trace, system and outputs as `hack bench jct`.

The system (mirrors `hack_cli.serve`):
  * prefill instance: FCFS, one request at a time; prefill, then exporting the payload (compress);
  * link: FCFS, one payload at a time, pipelined with the next prefill;
  * decode instance: admission FCFS (head of line first) once the payload has arrived and the request's KV at
    full length (the payload's bytes per token for the prompt and all output tokens) fits `cluster.decode_kv_budget_gb`;
    installing a payload runs on the decode instance between iterations; iteration-level batching: every step,
    all installed requests emit one token; a request that has emitted all its tokens leaves and frees its budget.
Costs come from a profile scaled to the cluster (`roofline.Costs`). Deterministic: no randomness, no clock.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

from hack_cli.errors import HackError
from hack_cli.serve.metrics import RequestRecord, summarize, write_per_request_csv, write_summary
from hack_cli.serve.trace import Request


@dataclass
class Active:
    record: RequestRecord
    context: int  # tokens in its KV
    left: int  # output tokens still to emit


def simulate(requests: list[Request], costs, budget_bytes: float, warmup: int) -> list[RequestRecord]:
    """Replay `requests` through the system; returns one finished record per request."""
    records = [RequestRecord(r.rid, r.prompt_len, r.output_len, r.rid < warmup, r.arrival_s) for r in requests]
    prefill_free = link_free = 0.0
    for rec in records:  # prefill and link never wait on the decode side: the payload waits in its buffer
        rec.prefill_start = max(rec.arrival, prefill_free)
        rec.prefill_end = rec.prefill_start + costs.prefill(rec.prompt_len)
        rec.compress_end = rec.prefill_end + costs.compress(rec.prompt_len)
        prefill_free = rec.compress_end
        rec.payload_bytes = costs.payload_bytes(rec.prompt_len)
        rec.bytes_sent = costs.wire_bytes(rec.prompt_len)
        rec.send_start = max(rec.compress_end, link_free)
        rec.recv_end = rec.send_start + costs.transfer_time(rec.prompt_len)
        link_free = rec.recv_end
        rec.kv_reserved_bytes = costs.reserved_bytes(rec.prompt_len, rec.output_len)
        rec.kv_stored_bytes = costs.stored_bytes(rec.prompt_len + rec.output_len - 1)  # the last token is not kept
        if rec.kv_reserved_bytes > budget_bytes:
            raise HackError(f"request {rec.rid} needs {rec.kv_reserved_bytes / 1e9:.2f} GB of decode KV, more than "
                            f"cluster.decode_kv_budget_gb={budget_bytes / 1e9:g}")
    _decode(deque(sorted(records, key=lambda r: r.recv_end)), costs, budget_bytes)
    return records


def _decode(waiting: deque, costs, budget_bytes: float) -> None:
    """The decode instance's loop: admit and install at iteration boundaries, then one step for the batch."""
    now, used, active = 0.0, 0.0, []
    while waiting or active:
        if not active and waiting:
            now = max(now, waiting[0].recv_end)  # idle until the next payload arrives
        while waiting and waiting[0].recv_end <= now and used + waiting[0].kv_reserved_bytes <= budget_bytes:
            rec = waiting.popleft()
            used += rec.kv_reserved_bytes
            rec.admit = now
            now += costs.install(rec.prompt_len)
            rec.install_end = now  # the prefill's token is emitted once installed
            if rec.output_len > 1:
                active.append(Active(rec, rec.prompt_len, rec.output_len - 1))
            else:
                rec.finish = now
                used -= rec.kv_reserved_bytes
        if not active:
            continue
        now += costs.decode_step([a.context for a in active])
        for a in active:
            a.context += 1
            a.left -= 1
            if a.left == 0:
                a.record.finish = now
                used -= a.record.kv_reserved_bytes
        active = [a for a in active if a.left]


def run_sim(job) -> dict:
    """`hack bench jct jct.mode=sim`: the job's trace through the simulated cluster; per_request.csv and
    summary.json in the run directory, as the real runs write them, marked simulated."""
    from dataclasses import asdict

    from hack_cli.serve.trace import make_trace
    from hack_cli.sim.profile import find_profile, method_entry
    from hack_cli.sim.roofline import Costs

    t = job.typed
    model, cluster, trace_cfg, jct = t["model"], t["cluster"], t["trace"], t.get("jct")
    local = cluster.prefill_gpu == "local" and cluster.decode_gpu == "local"
    profile = find_profile(model.name, jct.profile, local=local)
    label, entry = method_entry(profile, asdict(t["quant"]))
    costs = Costs(profile, entry, model.architecture, model.dtype, cluster.prefill_gpu, cluster.decode_gpu,
                  cluster.bandwidth_gbps, cluster.decode_kv_budget_gb)
    trace = make_trace(trace_cfg)
    if getattr(jct, "max_requests", 0):
        trace = trace[:jct.max_requests]
    records = simulate(trace, costs, cluster.decode_kv_budget_gb * 1e9, trace_cfg.warmup)
    summary = summarize(records, trace_cfg.warmup, simulated=True)
    summary.update(method=t["quant"].name, method_label=label, model=model.name, trace=trace_cfg.name,
                   rate=trace_cfg.rate, bandwidth_gbps=cluster.bandwidth_gbps,
                   decode_kv_budget_gb=cluster.decode_kv_budget_gb, profile_card=profile["card"],
                   profile_model=profile["model"]["name"], prefill_gpu=cluster.prefill_gpu,
                   decode_gpu=cluster.decode_gpu, tp_prefill=costs.tp_prefill, tp_decode=costs.tp_decode)
    write_per_request_csv(Path(job.run_dir) / "per_request.csv", records)
    write_summary(Path(job.run_dir) / "summary.json", summary)
    return summary
