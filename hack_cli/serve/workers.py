"""Process launch: a prefill worker (rank 0) and a decode worker (rank 1) joined by torch.distributed.

`launch(specs, log_dir)` starts both with torch.multiprocessing (spawn) on this machine: gloo on CPU or with one GPU (wire
tensors on the CPU), NCCL when prefill and decode have GPUs of their own (cluster.prefill_device=cuda:0,
cluster.decode_device=cuda:1). It watches them: if one dies or fails, the other is stopped at once and the run
ends with that worker's one-line error; rows of finished requests stay in per_request.csv.

Two machines (one GPU each): run the same worker entry point under torchrun on both nodes, rank 0 = prefill:

    # on node A (prefill) and node B (decode), same arguments except --node_rank
    torchrun --nnodes 2 --nproc_per_node 1 --node_rank {0|1} --master_addr <node A> --master_port 29511 \
        -m hack_cli.serve.workers <run_dir>/specs.pkl

`specs.pkl` is written by `write_specs` (e.g. from `python -m hack_cli.serve.bench_gpu ... --spec-only`); with
devices `cuda:0` on both nodes set cluster.prefill_device=cuda:0 cluster.decode_device=cuda:0 and
jct.backend=nccl. Clocks of the two nodes are reconciled by a ping-pong at start (`link.clock_sync`), and
per_request.csv is written on the decode node.
"""
from __future__ import annotations

import os
import pickle
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from hack_cli.errors import HackError

NAMES = ("prefill", "decode")


@dataclass
class ServeSpec:
    """Everything a worker needs, as plain picklable objects (no Hydra/OmegaConf at run time)."""

    model: Any  # ModelConfig
    quant: Any  # the method's Config
    cluster: Any  # ClusterConfig
    trace: Any  # TraceConfig
    jct: Any  # JctConfig
    run_dir: str
    seed: int = 0


def devices(spec: ServeSpec):
    """(prefill device, decode device, backend, wire device)."""
    import torch

    n = torch.cuda.device_count()
    auto = {0: ("cpu", "cpu"), 1: ("cuda:0", "cuda:0")}.get(n, ("cuda:0", "cuda:1"))
    pre = auto[0] if spec.cluster.prefill_device == "auto" else spec.cluster.prefill_device
    dec = auto[1] if spec.cluster.decode_device == "auto" else spec.cluster.decode_device
    backend = spec.jct.backend
    if backend == "auto":
        both_gpu = pre.startswith("cuda") and dec.startswith("cuda")
        backend = "nccl" if both_gpu and (pre != dec or "RANK" in os.environ) else "gloo"
    return torch.device(pre), torch.device(dec), backend


def build_model(mc, device):
    """The model in eval mode on `device`, routed through the KV methods. Random-weight architectures are built
    on the device directly (initializing 8B parameters on the host takes minutes)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hack_cli.hf import load_model, prepare_model

    if mc.weights == "random" and device.type == "cuda":
        arch = dict(mc.architecture)
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, mc.dtype))
        model.eval()
    else:
        model, _ = load_model(mc, device)
    return prepare_model(model)


def warm_up(model, method, device, wire, tokens: int = 64, steps: int = 132) -> None:
    """An untimed prefill, export, install and `steps` decode steps: kernels compiled and caches allocated. The
    steps close a block of every partition size up to 128 (HACK quantizes one block between steps: a Triton
    kernel of its own that otherwise compiled inside the first timed run, stalling it ~4.5 s; results/jct §2d)."""
    from hack_cli.serve.decode import Active, DecodeEngine, NullWriter
    from hack_cli.serve.link import pack_payload
    from hack_cli.serve.metrics import RequestRecord
    from hack_cli.serve.prefill import export_payload, prefill_payload, prompt_ids

    method.warm_up()  # processes the method serves with (CacheGen's coder pool) start here, not in a request
    ids = prompt_ids(0, -1, tokens, model.config.get_text_config().vocab_size, device)
    cache, first = prefill_payload(model, method, ids)
    buf, manifest = pack_payload(export_payload(cache))
    engine = DecodeEngine(model, method, device, float("inf"), NullWriter(), time.monotonic())
    stores = engine.install(manifest, buf.to(wire))
    engine.active = [Active(RequestRecord(-1, tokens, steps + 1, True, 0.0), stores, first, tokens, steps, [first])]
    for _ in range(steps):
        engine.step()


def worker(rank: int, specs: list[ServeSpec], master_port: int) -> None:
    """Entry point of one worker process (rank 0 prefill, rank 1 decode): serve each spec's run in turn with
    one model load (all specs share the model, devices and backend)."""
    import torch
    import torch.distributed as dist

    first = specs[0]
    pre_dev, dec_dev, backend = devices(first)
    device = pre_dev if rank == 0 else dec_dev
    wire = device if backend == "nccl" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    else:
        torch.cuda.set_device(device)
    model = build_model(first.model, device)

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(master_port))
    dist.init_process_group(backend, rank=rank, world_size=2,
                            timeout=timedelta(seconds=first.jct.stall_timeout_s))
    try:
        for idx, spec in enumerate(specs):
            serve_one(rank, idx, spec, model, device, wire)
    finally:
        dist.destroy_process_group()


def rendezvous(key: str, rank: int) -> None:
    """Wait until both ranks reached `key`, through the rendezvous store: unlike a send/recv it has no timeout,
    so one worker may finish a long run (or calibrate) while the other waits. A dead peer is the launcher's
    business (it stops the survivor), or, across nodes, the store's (its connection breaks)."""
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    store.set(f"{key}/{rank}", "1")
    while not store.check([f"{key}/{1 - rank}"]):
        time.sleep(0.05)


def serve_one(rank: int, idx: int, spec: ServeSpec, model, device, wire) -> None:
    """One run: warm up the method, agree on the start, then prefill (rank 0) or decode (rank 1) its trace."""
    from hack_cli.methods import build_method
    from hack_cli.serve import link
    from hack_cli.serve.bench import summarize_run
    from hack_cli.serve.decode import serve_decode
    from hack_cli.serve.metrics import RecordWriter
    from hack_cli.serve.prefill import serve_prefill
    from hack_cli.serve.trace import make_trace

    jct, run_dir = spec.jct, Path(spec.run_dir)
    trace = make_trace(spec.trace)
    if jct.max_requests:
        trace = trace[:jct.max_requests]
    peer, chunk = 1 - rank, int(jct.chunk_mb * 2 ** 20)
    quant = spec.quant
    if quant.name == "kvquant" and jct.kvquant_random_calibration and not (
            quant.calibration and Path(quant.calibration).exists()):
        quant = random_kvquant_calibration(rank, idx, spec, model)
    method = build_method(quant)
    warm_up(model, method, device, wire)
    if rank == 1:  # built before the start: the graph engine allocates its slots and captures its graphs
        writer = RecordWriter(run_dir / "per_request.csv")
        engine = decode_engine(spec, trace, model, method, device, writer)
    rendezvous(f"run{idx}/warm", rank)  # the other worker may still be finishing the previous run
    offset = link.clock_sync(rank, peer, wire)
    start = link.agree_start(rank, peer, wire, offset, lead_s=0.2)  # the run's t0 on this rank's clock
    if rank == 0:
        sender = link.LinkSender(peer, wire, spec.cluster.bandwidth_gbps, chunk, heartbeat_s=jct.stall_timeout_s / 4,
                                 stall_after=jct.fault_at if jct.fault == "stall_link" else None)
        sender.to_decode_clock = offset
        serve_prefill(model, method, trace, spec.seed, sender, start, device, wire,
                      die_after=jct.fault_at if jct.fault == "kill_prefill" else None)
        sender.close()
        return
    receiver = link.LinkReceiver(peer, wire, chunk, jct.stall_timeout_s)
    engine.t0 = start
    try:
        serve_decode(engine, receiver, len(trace), spec.trace.warmup, idle_timeout=2 * jct.stall_timeout_s)
    finally:
        writer.close()
        engine.steps_file.close()
    receiver.thread.join(jct.stall_timeout_s)  # the end marker follows the last payload
    summarize_run(spec, engine.name)  # summary.json as each run ends: a later failure or a killed sweep keeps it
    (run_dir / "done").touch()
    print(f"[bench jct] {run_dir.name}: {engine.done} requests served by {engine.now():.1f} s", flush=True)


def decode_engine(spec: ServeSpec, trace, model, method, device, writer):
    """The decode instance's engine for this run (jct.engine; see JctConfig)."""
    from hack_cli.serve.decode import DecodeEngine
    from hack_cli.serve.graph import GraphDecodeEngine, graph_applies

    jct, run_dir = spec.jct, Path(spec.run_dir)
    files = dict(tokens_path=run_dir / "tokens.jsonl" if jct.save_tokens else None, steps_path=run_dir / "steps.csv")
    budget = spec.cluster.decode_kv_budget_gb * 1e9
    use_graph = jct.engine == "graph" or (jct.engine == "auto" and device.type == "cuda"
                                          and graph_applies(model, method))
    if not use_graph:
        return DecodeEngine(model, method, device, budget, writer, 0.0, **files)
    capacity = max(r.prompt_len + r.output_len for r in trace)
    return GraphDecodeEngine(model, method, device, budget, writer, 0.0, capacity, jct.max_slots, **files)


def random_kvquant_calibration(rank: int, idx: int, spec: ServeSpec, model):
    """KVQuant levels fitted on random tokens by the prefill worker (then shared through the run directory):
    only for timing runs of random-weight models, where no real calibration can exist and values do not matter."""
    import dataclasses

    import torch

    from hack_cli.hf.attention import NAME
    from hack_cli.methods.kvquant_calib import fit, save
    from hack_cli.serve.prefill import prompt_ids

    path = Path(spec.run_dir) / "kvquant_random_calibration.safetensors"
    if rank == 0:
        q = spec.quant
        seqs = torch.cat([prompt_ids(spec.seed, -2 - i, 512, model.config.get_text_config().vocab_size, "cpu")
                          for i in range(2)])  # (2, 512)
        model.set_attn_implementation("sdpa")  # calibration reads a plain DynamicCache
        try:
            tensors, meta = fit(model, seqs, q.bits, q.outlier_fraction, 1, iters=20)
        finally:
            model.set_attn_implementation(NAME)
        meta.update(model=spec.model.name, dataset="random tokens (timing only)", seed=spec.seed)
        save(path, tensors, meta)
    rendezvous(f"run{idx}/calibrated", rank)
    return dataclasses.replace(spec.quant, calibration=str(path))


def _run_worker(rank: int, specs: list[ServeSpec], master_port: int, log_dir: str) -> None:
    """Runs `worker`; any failure becomes one line in <log_dir>/error_<name>.txt and exit code 1."""
    try:
        worker(rank, specs, master_port)
    except BaseException as e:  # noqa: BLE001 - everything must reach the launcher as one line
        line = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, HackError):
            line = f"{type(e).__name__}: {line}"
            traceback.print_exc()
        Path(log_dir, f"error_{NAMES[rank]}.txt").write_text(line + "\n")
        sys.stderr.flush()
        os._exit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(specs: list[ServeSpec], log_dir, timeout_s: float | None = None) -> None:
    """Run both workers here, serving `specs` in turn, and wait. Raises HackError naming the worker that failed
    and why (its one line is also in <log_dir>/error_<worker>.txt)."""
    import torch.multiprocessing as mp

    for spec in specs:
        Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        Path(log_dir, f"error_{name}.txt").unlink(missing_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_run_worker, args=(rank, specs, port, str(log_dir)), name=f"hack-{NAMES[rank]}")
             for rank in range(2)]
    for p in procs:
        p.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while any(p.exitcode is None for p in procs):
            for rank, p in enumerate(procs):
                if p.exitcode not in (None, 0):
                    raise HackError(f"{NAMES[rank]} worker failed: {_reason(log_dir, rank, p.exitcode)}")
            if deadline is not None and time.monotonic() > deadline:
                raise HackError(f"bench jct did not finish within {timeout_s:.0f} s (jct.timeout_s)")
            time.sleep(0.1)
        for rank, p in enumerate(procs):
            if p.exitcode != 0:
                raise HackError(f"{NAMES[rank]} worker failed: {_reason(log_dir, rank, p.exitcode)}")
    finally:
        for p in procs:
            if p.exitcode is None:
                p.terminate()
        for p in procs:
            p.join(10)
            if p.exitcode is None:
                p.kill()
                p.join()


def _reason(log_dir, rank: int, code: int) -> str:
    err = Path(log_dir, f"error_{NAMES[rank]}.txt")
    if err.exists():
        return err.read_text().strip()
    return f"died with exit code {code}" if code > 0 else f"killed by signal {-code}"


def write_specs(specs: list[ServeSpec], path) -> None:
    Path(path).write_bytes(pickle.dumps(list(specs)))


if __name__ == "__main__":  # torchrun entry: python -m hack_cli.serve.workers <specs.pkl>
    _specs = pickle.loads(Path(sys.argv[1]).read_bytes())
    _run_worker(int(os.environ["RANK"]), _specs, int(os.environ.get("MASTER_PORT", 29511)),
                str(Path(sys.argv[1]).parent))
