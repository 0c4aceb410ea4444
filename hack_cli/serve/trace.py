"""Request traces for serving runs: arrival times and prompt/output lengths, seeded.

Shared by the real serving benchmark (`hack_cli.serve`) and the simulator (`hack_cli.sim`), so both replay the
very same requests for one `TraceConfig`.

  * arrival=poisson: exponential inter-arrival gaps with mean 1/rate.
  * arrival=gamma: gamma gaps with mean 1/rate and coefficient of variation `cv` (shape 1/cv², scale cv²/rate);
    cv=1 is Poisson, cv>1 burstier.
  * arrival=file: a JSONL file of {"arrival_s", "prompt_len", "output_len"} rows replayed as is (its first
    `num_requests` rows; arrivals must not decrease).
The first request arrives at t=0; request i arrives after the sum of the first i gaps. Prompt and output lengths
are drawn uniformly from the inclusive ranges [lo, hi]. One `numpy` generator seeded with `trace.seed` draws the
gaps, then the prompt lengths, then the output lengths, so a seed fixes the whole trace.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hack_cli.errors import HackError


@dataclass(frozen=True)
class Request:
    rid: int  # position in the trace, 0-based
    arrival_s: float  # seconds after the start of the run
    prompt_len: int  # tokens
    output_len: int  # tokens generated, the first one by the prefill


def make_trace(trace_cfg) -> list[Request]:
    """The requests of a `TraceConfig`, sorted by arrival."""
    if trace_cfg.arrival == "file":
        return read_trace(trace_cfg.path, trace_cfg.num_requests)
    n, rng = trace_cfg.num_requests, np.random.default_rng(trace_cfg.seed)
    if trace_cfg.arrival == "poisson":
        gaps = rng.exponential(1.0 / trace_cfg.rate, size=n - 1)
    elif trace_cfg.arrival == "gamma":
        shape = 1.0 / trace_cfg.cv ** 2
        gaps = rng.gamma(shape, 1.0 / (trace_cfg.rate * shape), size=n - 1)
    else:
        raise HackError(f"trace.arrival={trace_cfg.arrival!r} is not one of poisson, gamma, file")
    arrivals = np.concatenate([[0.0], np.cumsum(gaps)])
    (plo, phi), (olo, ohi) = trace_cfg.prompt_len, trace_cfg.output_len
    prompts = rng.integers(plo, phi, size=n, endpoint=True)
    outputs = rng.integers(olo, ohi, size=n, endpoint=True)
    return [Request(i, float(arrivals[i]), int(prompts[i]), int(outputs[i])) for i in range(n)]


def read_trace(path, limit: int | None = None) -> list[Request]:
    """Replay a JSONL trace file (one request per line)."""
    requests = []
    for line_no, line in enumerate(Path(path).expanduser().read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            req = Request(len(requests), float(row["arrival_s"]), int(row["prompt_len"]), int(row["output_len"]))
        except (ValueError, KeyError, TypeError) as e:
            raise HackError(f"trace {path} line {line_no}: expected JSON with arrival_s, prompt_len, output_len "
                            f"({type(e).__name__}: {e})") from None
        if req.prompt_len < 1 or req.output_len < 1 or req.arrival_s < 0:
            raise HackError(f"trace {path} line {line_no}: lengths must be >= 1 and arrival_s >= 0")
        if requests and req.arrival_s < requests[-1].arrival_s:
            raise HackError(f"trace {path} line {line_no}: arrival_s decreases ({req.arrival_s} after "
                            f"{requests[-1].arrival_s})")
        requests.append(req)
        if limit is not None and len(requests) == limit:
            break
    if not requests:
        raise HackError(f"trace {path} holds no requests")
    return requests


def write_trace(path, requests: list[Request]) -> None:
    """Write requests as a JSONL trace that `read_trace` (trace.arrival=file) replays."""
    with open(path, "w") as f:
        for r in requests:
            row = asdict(r)
            row.pop("rid")
            f.write(json.dumps(row) + "\n")
