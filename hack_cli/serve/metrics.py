"""Per-request timings of disaggregated serving and their summary (`per_request.csv`, `summary.json`).

Shared by the real benchmark (`hack_cli.serve`) and the simulator (`hack_cli.sim`): both fill `RequestRecord`s
with the same timestamps, so their outputs have one schema.

A request's life, as timestamps in seconds since the run started (one clock: the decode worker's):
  arrival -> prefill_start -> prefill_end -> compress_end -> send_start -> recv_end -> admit -> install_end -> finish
and the phases between consecutive timestamps, which therefore add up to jct = finish - arrival:
  queue_prefill  waiting for the prefill instance (FCFS, one request at a time)
  prefill        the model's prefill forward; methods that compress as KV is produced do it inside the forward
  compress       exporting the method's wire payload of every layer into one buffer (entropy coding, packing)
  queue_link     waiting for the link to finish sending earlier requests' payloads (FCFS)
  transfer       the payload crossing the rate-limited link, chunked, until its last byte is received
  queue_decode   waiting for decode admission (FCFS; the request's KV at full length must fit the budget)
  install        installing the payload into the decode-side stores (unpacking, entropy decoding, dequantizing):
                 what of it remains at admission (CacheGen's decoding starts in the background at receive)
  decode         decode iterations until the last output token
The prefill produces output token 1, emitted by the decode instance once the KV is installed, so
first_token = install_end, ttft = first_token - arrival, and the remaining output_len - 1 tokens take one decode
iteration each: tpot = (finish - first_token) / (output_len - 1) (0 for one-token outputs).
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

PHASES = ("queue_prefill", "prefill", "compress", "queue_link", "transfer", "queue_decode", "install", "decode")
# The timestamp that ends each phase; the first phase starts at `arrival`.
PHASE_END = ("prefill_start", "prefill_end", "compress_end", "send_start", "recv_end", "admit", "install_end",
             "finish")


@dataclass
class RequestRecord:
    rid: int
    prompt_len: int
    output_len: int
    warmup: bool  # excluded from the summary statistics
    arrival: float
    prefill_start: float = 0.0
    prefill_end: float = 0.0
    compress_end: float = 0.0
    send_start: float = 0.0
    recv_end: float = 0.0
    admit: float = 0.0
    install_end: float = 0.0
    finish: float = 0.0
    payload_bytes: int = 0  # the method's transfer bytes for this request (sum of its exported tensors)
    bytes_sent: int = 0  # everything that crossed the link for it: payload plus its header and manifest
    kv_reserved_bytes: int = 0  # decode KV budget held from admit to finish (prompt + all output tokens)
    kv_stored_bytes: int = 0  # what the decode-side stores actually held at finish

    def phase(self, name: str) -> float:
        i = PHASES.index(name)
        start = self.arrival if i == 0 else getattr(self, PHASE_END[i - 1])
        return getattr(self, PHASE_END[i]) - start

    @property
    def first_token(self) -> float:
        return self.install_end

    @property
    def jct(self) -> float:
        return self.finish - self.arrival

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float:
        return (self.finish - self.first_token) / (self.output_len - 1) if self.output_len > 1 else 0.0

    def row(self) -> dict:
        """Timestamps, phases and derived metrics: one `per_request.csv` row."""
        out = asdict(self)
        out.update({p: self.phase(p) for p in PHASES})
        out.update(first_token=self.first_token, jct=self.jct, ttft=self.ttft, tpot=self.tpot)
        return out


CSV_COLUMNS = [f.name for f in fields(RequestRecord)] + list(PHASES) + ["first_token", "jct", "ttft", "tpot"]


class RecordWriter:
    """Appends `per_request.csv` rows as requests finish, flushed each time, so a crash keeps finished rows."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", newline="")
        self._csv = csv.DictWriter(self._file, CSV_COLUMNS)
        self._csv.writeheader()
        self._file.flush()

    def write(self, record: RequestRecord) -> None:
        self._csv.writerow(record.row())
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def write_per_request_csv(path, records: list[RequestRecord]) -> None:
    writer = RecordWriter(path)
    for r in sorted(records, key=lambda r: r.rid):
        writer.write(r)
    writer.close()


def read_per_request_csv(path) -> list[RequestRecord]:
    kinds = {f.name: f.type for f in fields(RequestRecord)}
    cast = {"int": int, "float": float, "bool": lambda s: s == "True"}
    with open(path, newline="") as f:
        return [RequestRecord(**{k: cast[kinds[k]](v) for k, v in row.items() if k in kinds})
                for row in csv.DictReader(f)]


def _stats(name: str, values) -> dict[str, float]:
    """Mean and linear-interpolated P50/P95/P99 (numpy's default percentile)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return {}
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {f"{name}_mean": float(v.mean()), f"{name}_p50": float(p50), f"{name}_p95": float(p95),
            f"{name}_p99": float(p99)}


def peak_overlap(intervals) -> tuple[float, int]:
    """intervals: (start, end, weight) -> (peak total weight, peak count) of those open at once."""
    events = sorted([(s, 1, w) for s, e, w in intervals] + [(e, 0, -w) for s, e, w in intervals])
    total = count = peak_total = peak_count = 0
    for _, opens, w in events:  # ends sort before starts at the same instant: a freed slot is reused
        total += w
        count += 1 if opens else -1
        peak_total, peak_count = max(peak_total, total), max(peak_count, count)
    return peak_total, peak_count


def summarize(records: list[RequestRecord], warmup: int = 0, simulated: bool = False) -> dict:
    """Run statistics. JCT/TTFT/TPOT and phases over requests with rid >= warmup; peak decode KV memory and
    concurrency over all requests (they describe the system, warm-up included)."""
    measured = [r for r in records if r.rid >= warmup and not r.warmup]
    out: dict = {"simulated": simulated, "num_requests": len(records), "num_measured": len(measured)}
    for name in ("jct", "ttft", "tpot"):
        out.update(_stats(name, [getattr(r, name) for r in measured]))
    for p in PHASES:
        out[f"{p}_mean"] = float(np.mean([r.phase(p) for r in measured])) if measured else 0.0
    out["bytes_sent"] = int(sum(r.bytes_sent for r in measured))
    out["payload_bytes"] = int(sum(r.payload_bytes for r in measured))
    out["bytes_sent_per_request"] = out["bytes_sent"] / len(measured) if measured else 0.0
    if records:
        kv, conc = peak_overlap([(r.admit, r.finish, r.kv_reserved_bytes) for r in records])
        stored, _ = peak_overlap([(r.admit, r.finish, r.kv_stored_bytes) for r in records])
        out.update(peak_decode_kv_bytes=int(kv), peak_decode_kv_stored_bytes=int(stored), peak_concurrency=conc,
                   duration_s=max(r.finish for r in records) - min(r.arrival for r in records))
    return out


def write_summary(path, summary: dict) -> None:
    Path(path).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
