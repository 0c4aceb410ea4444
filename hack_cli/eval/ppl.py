"""`hack eval ppl`: perplexity with the KV going through a method exactly as in serving.

Each window of `context_len + score_len` tokens is prefilled for `context_len` tokens into the method's cache
(the part a prefill instance would compress and send), then the next `score_len` tokens are scored by decoding
them one at a time (teacher-forced) through the decode-path attention over the compressed cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hack_cli.config import ConfigError, check_positive


@dataclass
class PplConfig:
    context_len: int = 2048  # tokens prefilled into the compressed cache
    score_len: int = 128  # tokens scored through decode steps
    windows: int = 8  # windows spread evenly over the text
    batch_size: int = 4
    device: str = "auto"  # auto (cuda if present) | cpu | cuda[:N]

    def __post_init__(self):
        for key in ("context_len", "score_len", "windows", "batch_size"):
            check_positive(f"ppl.{key}", getattr(self, key))
        if self.score_len < 2:
            raise ConfigError("ppl.score_len", self.score_len, "expected at least 2")


def pick_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                        ("cpu" if name == "auto" else name))


def windows(tokens: torch.Tensor, cfg: PplConfig) -> list[tuple[int, torch.Tensor]]:
    """(window id, (L,) token ids) for `cfg.windows` windows of L = context + score tokens, evenly spaced."""
    length = cfg.context_len + cfg.score_len
    if tokens.numel() < length:
        raise ConfigError("ppl.context_len", cfg.context_len, f"text has only {tokens.numel()} tokens")
    span = tokens.numel() - length
    starts = [span * w // max(cfg.windows - 1, 1) for w in range(cfg.windows)]
    return [(w, tokens[s:s + length]) for w, s in enumerate(starts)]


@torch.no_grad()
def score_batch(model, method, batch: torch.Tensor, context_len: int):
    """batch: (B, L) -> (nll per window (B,), cache stores after prefill's byte counts, final stores)."""
    from hack_cli.hf import cache_keyword, make_cache

    cache = make_cache(model, method)
    kw = {cache_keyword(model): cache, "use_cache": True}
    logits = model(input_ids=batch[:, :context_len], **kw).logits[:, -1]  # (B, vocab)
    sent = sum((s.transfer_bytes() for s in cache.stores), type(cache.stores[0].transfer_bytes())())
    nll = torch.zeros(batch.shape[0], dtype=torch.float64)
    for i in range(context_len, batch.shape[1]):
        target = batch[:, i]  # (B,)
        nll -= torch.log_softmax(logits.double(), -1).gather(-1, target[:, None])[:, 0].cpu()
        if i + 1 < batch.shape[1]:
            logits = model(input_ids=target[:, None], **kw).logits[:, -1]
    stored = sum((s.stored_bytes() for s in cache.stores), type(sent)())
    return nll, sent, stored


def run(job) -> dict:
    from hack_cli.eval.text import read_text
    from hack_cli.hf import load_model, prepare_model, text_config
    from hack_cli.methods import build_method
    from hack_cli.methods.base import fp16_bytes

    cfg: PplConfig = job.typed["ppl"]
    device = pick_device(cfg.device)
    model, tok = load_model(job.typed["model"], device)
    if tok is None:
        raise ConfigError("model.weights", "random", "perplexity needs a pretrained model with a tokenizer")
    prepare_model(model)
    method = build_method(job.typed["quant"])
    tokens = torch.tensor(tok(read_text(job.typed["dataset"].path)).input_ids)  # (N,)
    tc = text_config(model)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    rows = job.rows("windows")
    todo = [(w, ids) for w, ids in windows(tokens, cfg) if w not in rows.done]
    batches = [todo[i:i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
    for batch in job.progress(batches, total=len(batches), desc=f"ppl {method.name}"):
        ids = torch.stack([x for _, x in batch]).to(device)  # (B, L)
        nll, sent, stored = score_batch(model, method, ids, cfg.context_len)
        layers = tc.num_hidden_layers
        dense_sent = layers * fp16_bytes(len(batch) * cfg.context_len, tc.num_key_value_heads, head_dim)
        dense_stored = layers * fp16_bytes(ids.numel(), tc.num_key_value_heads, head_dim)
        for j, (w, _) in enumerate(batch):  # byte counts are per batch; each window gets its share
            rows.write({"key": w, "nll": float(nll[j]), "tokens": cfg.score_len,
                        **{f"sent_{k}": v / len(batch) for k, v in sent.as_dict().items()},
                        "sent_fp16_equiv": dense_sent / len(batch), "stored_total": stored.total / len(batch),
                        "stored_fp16_equiv": dense_stored / len(batch)})
    return summarize(rows.rows)


def summarize(rows: list[dict]) -> dict:
    total = lambda k: sum(r[k] for r in rows)
    tokens, sent = total("tokens"), total("sent_total")
    out = {"ppl": math.exp(total("nll") / tokens), "tokens": tokens, "windows": len(rows),
           "kv_bytes": sent / len(rows), "kv_bytes_ratio": sent / total("sent_fp16_equiv"),
           "kv_bytes_final_ratio": total("stored_total") / total("stored_fp16_equiv")}
    for part in ("codes", "meta", "sums", "fp16", "index"):
        out[f"kv_{part}_ratio"] = total(f"sent_{part}") / total("sent_fp16_equiv")
    return out
