"""`hack bench jct` without Hydra: plain arguments, several runs served by one pair of workers (one model load).

For machines without hydra-core (GPU boxes); it needs only omegaconf to read the same `conf/` YAML files.

    python -m hack_cli.serve.bench_gpu --model llama31_8b --weights random --dtype bfloat16 --cluster gpu2 \
        --trace long --run fp16:0.3:10:6 --run hack:0.3:10:6 --out runs/jct_gpu

Each `--run METHOD[,FIELD=VALUE...]:RATE:BANDWIDTH_GBPS:NUM_REQUESTS[:WARMUP]` is one run of the trace preset at
that rate and link speed (the first NUM_REQUESTS requests of the seeded trace, WARMUP of them excluded, `--warmup`
by default), the method's
`conf/quant` fields overridden as given (`hack,operand=fp16:0.3:10:24`). Results go to
<out>/<method>[-FIELD-VALUE...]_r<rate>_bw<bandwidth>_n<N>/{per_request.csv,summary.json} and <out>/sweep.csv.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
from pathlib import Path

from hack_cli.errors import HackError


def conf(group: str, name: str, **override):
    """conf/<group>/<name>.yaml with overrides; a quant method without a YAML gets its schema's defaults."""
    import hack_conf
    from omegaconf import OmegaConf

    path = Path(hack_conf.__file__).parent / group / f"{name}.yaml"
    if path.exists():
        base = OmegaConf.load(path)
    elif group == "quant":
        base = OmegaConf.create({"name": name})
    else:
        raise HackError(f"no config {group}/{name}.yaml")
    return OmegaConf.merge(base, OmegaConf.create(override))


def build_specs(args) -> list:
    from hack_cli.config import ClusterConfig, ModelConfig, TraceConfig, to_typed
    from hack_cli.methods import quant_schema
    from hack_cli.serve.bench import JctConfig
    from hack_cli.serve.workers import ServeSpec

    import yaml
    from omegaconf import OmegaConf

    model_over = {k: v for k, v in (("weights", args.weights), ("dtype", args.dtype)) if v}
    model_node = conf("model", args.model, **model_over)
    model = to_typed("model", ModelConfig, model_node)
    jct = JctConfig(stall_timeout_s=args.stall_timeout_s, kvquant_random_calibration=args.weights == "random",
                    chunk_mb=args.chunk_mb)
    specs = []
    for item in args.run:
        try:
            method, rate, bw, n, *rest = item.split(":")
            rate, bw, n = float(rate), float(bw), int(n)
            (warmup,) = [int(w) for w in rest] or [args.warmup]
            method, *fields = method.split(",")
            override = {k: yaml.safe_load(v) for k, v in (f.split("=") for f in fields)}
        except ValueError:
            raise HackError(f"--run {item!r}: expected "
                            "METHOD[,FIELD=VALUE...]:RATE:BANDWIDTH_GBPS:NUM_REQUESTS[:WARMUP]") from None
        root = OmegaConf.create({"model": model_node, "quant": conf("quant", method, **override)})
        OmegaConf.resolve(root)  # e.g. kvquant's calibration path names ${model.name}
        qnode = root.quant
        quant = to_typed("quant", quant_schema(qnode.get("name")), qnode)
        cluster = to_typed("cluster", ClusterConfig, conf("cluster", args.cluster, bandwidth_gbps=bw,
                                                          **({"decode_kv_budget_gb": args.budget_gb}
                                                             if args.budget_gb else {})))
        trace = to_typed("trace", TraceConfig, conf("trace", args.trace, rate=rate, num_requests=n,
                                                    warmup=min(warmup, n - 1)))
        name = "-".join([method, *(f"{k}-{v}" for k, v in override.items())])
        run_dir = Path(args.out) / f"{name}_r{rate:g}_bw{bw:g}_n{n}"
        specs.append(ServeSpec(model=model, quant=quant, cluster=cluster, trace=trace, jct=jct,
                               run_dir=str(run_dir), seed=args.seed))
    return specs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--weights", choices=("pretrained", "random"))
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--cluster", default="local")
    p.add_argument("--budget-gb", type=float, help="cluster.decode_kv_budget_gb")
    p.add_argument("--trace", default="small")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--run", action="append", required=True,
                   help="METHOD[,FIELD=VALUE...]:RATE:BANDWIDTH_GBPS:NUM_REQUESTS[:WARMUP]")
    p.add_argument("--stall-timeout-s", type=float, default=120.0)
    p.add_argument("--chunk-mb", type=float, default=32.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_jct_gpu")
    args = p.parse_args(argv)
    from hack_cli.serve.bench import read_summary, serve_many

    specs = build_specs(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    try:
        serve_many(specs, args.out)
    except HackError as e:
        print(f"error: {e}", file=sys.stderr)
    rows = [read_summary(s) for s in specs if (Path(s.run_dir) / "done").exists()]
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(Path(args.out) / "sweep.csv", "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(rows)
        for r in rows:
            print(f"{r['method']:9s} rate={r['rate']:<5g} bw={r['bandwidth_gbps']:<5g} jct_mean={r['jct_mean']:.3f} "
                  f"p99={r['jct_p99']:.3f} ttft={r['ttft_mean']:.3f} tpot={r['tpot_mean'] * 1e3:.1f}ms "
                  f"transfer={r['transfer_mean']:.3f} decode={r['decode_mean']:.3f} "
                  f"queue_link={r['queue_link_mean']:.3f} queue_decode={r['queue_decode_mean']:.3f} "
                  f"MB/req={r['bytes_sent_per_request'] / 1e6:.1f} conc={r['peak_concurrency']} "
                  f"step={r.get('step_mean_s', 0) * 1e3:.1f}ms@{r.get('step_batch_mean', 0):.1f}", flush=True)


if __name__ == "__main__":
    main()
