"""Time (and profile) one decode-engine iteration against Hugging Face's own decode step, on one GPU.

The JCT runs' decode step is the engine's `step`: eager (`DecodeEngine`: the model's linear layers over the batch,
each request's attention over its own method store) or graph (`GraphDecodeEngine`: decode slots, one kernel call
per layer, the iteration replayed as a CUDA graph). This tool installs B requests of `--context` tokens through the real
prefill -> export -> install path (`hack_cli.sim.measure.decode_engine`), then times engine steps, and as the
reference the same model with its stock SDPA attention and a `DynamicCache` of the same batch and context held
fixed (what an unmodified HF server pays per step, with SDPA's plan for that one key length cached).

    python -m hack_cli.serve.step_profile --model llama31_8b --methods fp16,hack --engines eager,graph \
        --batch 1,6 --context 15000

Prints one line per (method, batch) with the median step in ms, and with `--profile` the top operators by
self CUDA and self CPU time (torch.profiler) of three engine steps.
"""
from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from hack_cli.sim.measure import decode_engine, sync, timed


def median_ms(fn, device, repeats: int) -> float:
    fn()  # warm-up
    return 1e3 * statistics.median(timed(fn, device)[0] for _ in range(repeats))


@torch.no_grad()
def stock_step_ms(model, batch: int, context: int, device, repeats: int) -> float:
    """Hugging Face decode step with SDPA and a DynamicCache holding `context` tokens per sequence."""
    from transformers import DynamicCache

    from hack_cli.hf import cache_keyword, prepare_model

    model.set_attn_implementation("sdpa")
    vocab = model.config.get_text_config().vocab_size
    kw = cache_keyword(model)
    cache = None
    for _ in range(batch):  # prefill one sequence at a time (activation memory), then stack the layers
        one = DynamicCache(config=model.config)
        model(input_ids=torch.randint(0, vocab, (1, context), device=device), use_cache=True, logits_to_keep=1,
              **{kw: one})
        if cache is None:
            cache = one
        else:
            for dst, src in zip(cache.layers, one.layers):
                dst.keys, dst.values = torch.cat([dst.keys, src.keys]), torch.cat([dst.values, src.values])
    ids = torch.randint(0, vocab, (batch, 1), device=device)

    def step():
        for layer in cache.layers:  # keep the context fixed: drop the token the last step appended
            layer.keys, layer.values = layer.keys[:, :, :context], layer.values[:, :, :context]
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})

    ms = median_ms(step, device, repeats)
    del cache
    prepare_model(model)
    return ms


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama31_8b")
    p.add_argument("--methods", default="fp16,hack")
    p.add_argument("--engines", default="eager,graph")
    p.add_argument("--batch", default="1,6")
    p.add_argument("--context", type=int, default=15000)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)

    from hack_cli.hf import make_method
    from hack_cli.hf.models import model_config
    from hack_cli.serve.workers import build_model

    device = torch.device(args.device)
    mc = model_config(args.model)
    if device.type == "cuda":
        mc.weights, mc.dtype = "random", "bfloat16"
    model = build_model(mc, device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{card}, {args.model} ({mc.weights} {mc.dtype}), context {args.context}", flush=True)
    for batch in map(int, args.batch.split(",")):
        ms = stock_step_ms(model, batch, args.context, device, args.repeats)
        print(f"stock HF sdpa + DynamicCache  B={batch}: {ms:8.2f} ms", flush=True)
        for name, kind in itertools.product(args.methods.split(","), args.engines.split(",")):
            eng = decode_engine(model, make_method(name), device, args.context, batch, engine=kind,
                                headroom=args.repeats + 8)
            ms = median_ms(eng.step, device, args.repeats)
            print(f"{kind:5s} engine {name:8s}          B={batch}: {ms:8.2f} ms", flush=True)
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        eng.step()
                    sync(device)
                table = prof.key_averages()
                print(table.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
                print(table.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
            del eng
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
