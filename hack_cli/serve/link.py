"""The prefill->decode link: a method's KV payload sent over torch.distributed, rate-limited on the sender side.

The GPUs' own interconnect (or loopback TCP for gloo) is far faster than the 1-100 Gbps cloud links of the paper,
so the sender paces itself: every message (header, manifest, payload) is cut into chunks of `chunk_bytes`, and
chunk i is released only at the instant its last byte would have arrived over a link of `bandwidth_gbps`
(`Pacer`: a token bucket one chunk deep with absolute deadlines, so sleep jitter never accumulates). Messages
cross FCFS, one at a time, from a sender thread, so a payload's transfer overlaps the next request's prefill.

Wire format of one request: a HEADER (float64[HEADER_LEN], fields `H_*`), the pickled manifest (uint8), then the
payload (uint8), all chunked. A header with kind KIND_END closes the link; KIND_BEAT is a heartbeat sent while
the sender idles, so that a receiver waiting longer than the stall timeout knows the link or its peer is dead.
With NCCL every tensor lives on the GPU and the sender/receiver threads use their own CUDA streams, so
transfers never queue behind (or block) the compute stream.
"""
from __future__ import annotations

import pickle
import queue
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

from hack_cli.errors import HackError

HEADER_LEN = 16
KIND_END, KIND_REQUEST, KIND_BEAT = 0.0, 1.0, 2.0
(H_KIND, H_RID, H_PROMPT, H_OUTPUT, H_ARRIVAL, H_PREFILL_START, H_PREFILL_END, H_COMPRESS_END, H_SEND_START,
 H_MANIFEST_BYTES, H_PAYLOAD_BYTES, H_FIRST_TOKEN) = range(12)


class LinkError(HackError):
    """The link stalled or its peer died."""


class Pacer:
    """Release times for chunks crossing a link of `bandwidth_gbps` (one sender, FCFS): a FIFO server, so chunk i
    is delivered at d_i = max(ready_i, d_(i-1)) + bytes_i / rate, where ready_i is when its data was ready to go
    (a message's chunks are all ready when the message is dequeued). Deadlines are absolute, so neither sleep
    jitter nor the real send's own time accumulates while the real send is faster than the emulated link."""

    def __init__(self, bandwidth_gbps: float):
        self.bytes_per_s = bandwidth_gbps * 1e9 / 8
        self.free_at = 0.0  # when the link finishes the chunks released so far (time.monotonic clock)

    def release(self, nbytes: int, ready_at: Optional[float] = None) -> float:
        """Wait until a chunk of `nbytes`, ready since `ready_at` (default now), has fully crossed; returns then."""
        ready = time.monotonic() if ready_at is None else ready_at
        self.free_at = max(ready, self.free_at) + nbytes / self.bytes_per_s
        while (left := self.free_at - time.monotonic()) > 0:
            time.sleep(left)
        return self.free_at


# ---------------------------------------------------------------------------------------------- payloads
def pack_payload(layers: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, list]:
    """Per-layer dicts of tensors -> one uint8 buffer (on their device) and the manifest to rebuild them.
    The buffer's size is exactly the sum of the tensors' nbytes (no alignment padding)."""
    manifest, parts, offset = [], [], 0
    for layer, state in enumerate(layers):
        for name, t in state.items():
            t = t.contiguous()
            manifest.append((layer, name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, t.nbytes))
            parts.append(t.reshape(-1).view(torch.uint8))
            offset += t.nbytes
    buf = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)
    return buf, manifest


def unpack_payload(buf: torch.Tensor, manifest: list, num_layers: int) -> list[dict[str, torch.Tensor]]:
    """Inverse of `pack_payload`. Each tensor is copied out of the buffer so its storage is aligned."""
    layers: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]
    for layer, name, dtype, shape, offset, nbytes in manifest:
        raw = buf[offset:offset + nbytes].clone()
        layers[layer][name] = raw.view(getattr(torch, dtype)).reshape(shape)
    return layers


# ---------------------------------------------------------------------------------------------- sender
class LinkSender:
    """Sends queued messages to rank `peer` from a thread, paced at `bandwidth_gbps`, FCFS."""

    def __init__(self, peer: int, device: torch.device, bandwidth_gbps: float, chunk_bytes: int,
                 heartbeat_s: float, stall_after: Optional[int] = None):
        self.peer, self.device, self.chunk = peer, device, chunk_bytes
        self.pacer, self.heartbeat_s = Pacer(bandwidth_gbps), heartbeat_s
        self.stall_after = stall_after  # fault injection: go silent forever in the middle of this request
        self.queue: queue.Queue = queue.Queue()
        self.sent = -1  # rid of the last request fully sent
        self.error: Optional[BaseException] = None
        self.to_decode_clock = 0.0  # offset: decode clock = monotonic + offset (see `clock_sync`)
        self.thread = threading.Thread(target=self._loop, name="link-sender", daemon=True)
        self.thread.start()

    def submit(self, header: torch.Tensor, manifest: list, payload: torch.Tensor) -> None:
        """header: float64 (HEADER_LEN,) on CPU; payload: uint8 on `device`, ready (synchronized)."""
        if self.error is not None:
            raise LinkError(f"link sender failed: {self.error}") from self.error
        self.queue.put((header, manifest, payload))

    def close(self) -> None:
        """Send everything queued, then the end marker; raise if the sender failed. A stalled link is detected
        by the receiver (its peer then stops this process)."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise LinkError(f"link sender failed: {self.error}") from self.error

    def _loop(self) -> None:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        try:
            with torch.cuda.stream(stream) if stream is not None else _nothing():
                while True:
                    try:
                        item = self.queue.get(timeout=self.heartbeat_s)
                    except queue.Empty:
                        self._send_header(torch.full((HEADER_LEN,), 0.0, dtype=torch.float64), KIND_BEAT)
                        continue
                    if item is None:
                        self._send_header(torch.zeros(HEADER_LEN, dtype=torch.float64), KIND_END)
                        return
                    self._send_request(*item, ready_at=time.monotonic())
        except BaseException as e:  # surfaced to the prefill worker's main thread by submit/close
            self.error = e

    def _send_header(self, header: torch.Tensor, kind: float, ready_at: Optional[float] = None) -> None:
        header[H_KIND] = kind
        self._send(header.to(self.device), ready_at)

    def _send_request(self, header: torch.Tensor, manifest: list, payload: torch.Tensor, ready_at: float) -> None:
        meta = torch.frombuffer(bytearray(pickle.dumps(manifest)), dtype=torch.uint8)
        header[H_SEND_START] = time.monotonic() + self.to_decode_clock
        header[H_MANIFEST_BYTES], header[H_PAYLOAD_BYTES] = meta.numel(), payload.numel()
        self._send_header(header, KIND_REQUEST, ready_at)
        self._send(meta.to(self.device), ready_at)
        if self.stall_after is not None and int(header[H_RID]) == self.stall_after:
            threading.Event().wait()  # fault injection: the link goes silent between a header and its payload
        for start in range(0, payload.numel(), self.chunk):
            self._send(payload[start:start + self.chunk], ready_at)
        self.sent = int(header[H_RID])

    def _send(self, t: torch.Tensor, ready_at: Optional[float] = None) -> None:
        self.pacer.release(t.nbytes, ready_at)
        dist.send(t, self.peer)
        if t.is_cuda:
            torch.cuda.current_stream(t.device).synchronize()


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------- receiver
class LinkReceiver:
    """Receives messages from rank `peer` in a thread; `queue` yields (header, manifest, payload, recv_end) per
    request (recv_end on the local monotonic clock), then None at the end, or a LinkError."""

    def __init__(self, peer: int, device: torch.device, chunk_bytes: int, stall_timeout_s: float):
        self.peer, self.device, self.chunk = peer, device, chunk_bytes
        self.stall_timeout_s = stall_timeout_s  # the process group's timeout: a recv fails after it
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="link-receiver", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        rid = None
        try:
            with torch.cuda.stream(stream) if stream is not None else _nothing():
                while True:
                    header = self._recv(torch.empty(HEADER_LEN, dtype=torch.float64, device=self.device)).cpu()
                    kind = float(header[H_KIND])
                    if kind == KIND_BEAT:
                        continue
                    if kind == KIND_END:
                        self.queue.put(None)
                        return
                    rid = int(header[H_RID])
                    meta = self._recv(torch.empty(int(header[H_MANIFEST_BYTES]), dtype=torch.uint8,
                                                  device=self.device))
                    manifest = pickle.loads(meta.cpu().numpy().tobytes())
                    payload = torch.empty(int(header[H_PAYLOAD_BYTES]), dtype=torch.uint8, device=self.device)
                    for start in range(0, payload.numel(), self.chunk):
                        self._recv(payload[start:start + self.chunk])
                    self.queue.put((header, manifest, payload, time.monotonic()))
                    rid = None
        except BaseException as e:
            where = f" while receiving request {rid}" if rid is not None else " between requests"
            what = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "Timed out" in what or "timeout" in what.lower():
                what = f"no data for {self.stall_timeout_s:g} s"
                self.queue.put(LinkError(f"the link stalled{where}: {what}"))
            else:
                self.queue.put(LinkError(f"the link broke{where} (prefill worker died?): {what}"))

    def _recv(self, t: torch.Tensor) -> torch.Tensor:
        dist.recv(t, self.peer)
        if t.is_cuda:
            torch.cuda.current_stream(t.device).synchronize()
        return t


# ---------------------------------------------------------------------------------------------- clocks
def clock_sync(rank: int, peer: int, device: torch.device, rounds: int = 8) -> float:
    """Offset to add to this rank's monotonic clock to read the decode rank's (rank 1) clock: 0 on rank 1.
    NTP-style ping-pong, keeping the round with the smallest round trip. Call on both ranks, before threads."""
    t = torch.zeros(1, dtype=torch.float64, device=device)
    best_rtt, offset = float("inf"), 0.0
    for _ in range(rounds):
        if rank == 1:
            dist.recv(t, peer)
            t.fill_(time.monotonic())
            dist.send(t, peer)
            continue
        t0 = time.monotonic()
        dist.send(t, peer)
        dist.recv(t, peer)
        t1 = time.monotonic()
        if t1 - t0 < best_rtt:
            best_rtt, offset = t1 - t0, float(t.item()) - (t0 + t1) / 2
    return offset


def agree_start(rank: int, peer: int, device: torch.device, offset: float, lead_s: float) -> float:
    """The run's start instant, chosen by the decode rank `lead_s` ahead, on this rank's monotonic clock."""
    t = torch.zeros(1, dtype=torch.float64, device=device)
    if rank == 1:
        t.fill_(time.monotonic() + lead_s)
        dist.send(t, peer)
        return float(t.item())
    dist.recv(t, peer)
    return float(t.item()) - offset
