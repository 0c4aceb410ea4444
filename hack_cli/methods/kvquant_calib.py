"""KVQuant calibration: outlier thresholds and non-uniform levels fitted on a model's real K/V activations.

`fit` runs the model over calibration sequences, takes every layer's K (inverted to pre-RoPE with the model's own
rotary tables, and as is for the post-RoPE ablation) and V, drops the sink tokens, and fits
  * per channel: key thresholds lo/hi at the fraction/2 and 1 - fraction/2 quantiles, then 2^b k-means levels on
    the normalized inliers;
  * per layer: 2^b k-means levels on the values normalized per (token, head) exactly as the store normalizes them.
The 1-D k-means is Lloyd's algorithm batched over all channels of a layer in torch (thousands of independent
1-D problems at once, each step a binary search on sorted samples; scikit-learn would fit them one by one),
initialized at the quantiles; tests check it against scikit-learn's KMeans.
"""
from __future__ import annotations

from pathlib import Path

import torch

from hack_cli.errors import HackError
from hack_cli.methods.kvquant import invert_rope, key_outliers, rope_cos_sin, value_outliers, value_range


def kmeans_1d(x: torch.Tensor, mask: torch.Tensor, k: int, iters: int = 100, tol: float = 1e-6,
              restarts: int = 6) -> torch.Tensor:
    """Independent 1-D k-means problems. x, mask: (M, N) samples and which count -> (M, k) sorted centers.

    In 1-D each cluster is a run of the sorted samples, so after one sort a Lloyd step is a binary search for the
    midpoints plus prefix sums: O(M·k·log N). Lloyd finds a local optimum, so it starts from several spreads of the
    samples (fixed and seeded random quantiles, evenly over the range) and keeps each problem's lowest inertia.
    """
    xs = torch.where(mask, x.double(), torch.inf).sort(1).values  # (M, N): the samples first, ascending
    n = mask.sum(1, keepdim=True)  # (M, 1)
    finite = torch.where(xs.isinf(), 0.0, xs)
    zero = torch.zeros_like(xs[:, :1])
    csum = torch.cat([zero, finite.cumsum(1)], 1)  # (M, N+1) prefix sums of x and x²
    csq = torch.cat([zero, (finite ** 2).cumsum(1)], 1)
    i = torch.arange(k, dtype=torch.float64, device=x.device)
    lo, hi = xs[:, :1], xs.gather(1, (n - 1).clamp_min(0))
    spreads = [(i + 0.5) / k, (i + 1) / (k + 1)]
    gen = torch.Generator().manual_seed(0)
    spreads += [torch.rand(k, generator=gen, dtype=torch.float64).sort().values for _ in range(restarts)]
    inits = [xs.gather(1, ((n - 1).clamp_min(0) * p.to(x.device)).long()) for p in spreads]
    inits.append(lo + (hi - lo) * (i + 0.5) / k)
    best, best_cost = None, None
    for centers in inits:
        centers = torch.where(n > 0, centers, 0.0).sort(1).values
        for _ in range(iters + 1):
            mids = (centers[:, 1:] + centers[:, :-1]) / 2  # (M, k-1): x > mid belongs to the upper center
            cut = torch.minimum(torch.searchsorted(xs, mids.contiguous(), right=True), n)  # (M, k-1)
            edges = torch.cat([torch.zeros_like(n), cut, n], 1)  # (M, k+1)
            seg = lambda c: c.gather(1, edges[:, 1:]) - c.gather(1, edges[:, :-1])  # (M, k) per cluster
            count, total = (edges[:, 1:] - edges[:, :-1]).double(), seg(csum)
            new = torch.where(count > 0, total / count.clamp_min(1), centers).sort(1).values
            moved = (new - centers).abs().max()
            if moved <= tol:
                break
            centers = new
        cost = (seg(csq) - total ** 2 / count.clamp_min(1)).sum(1)  # (M,) inertia at the last assignment
        better = cost < best_cost if best is not None else torch.ones_like(cost, dtype=torch.bool)
        best = torch.where(better[:, None], centers, best) if best is not None else centers
        best_cost = torch.where(better, cost, best_cost) if best_cost is not None else cost
    return best.float()


def row_quantiles(x: torch.Tensor, q: list[float]) -> torch.Tensor:
    """x (M, N) -> (len(q), M) quantiles with linear interpolation (torch.quantile caps inputs at 2^24)."""
    xs = x.sort(1).values
    pos = torch.tensor(q, dtype=torch.float64) * (x.shape[1] - 1)
    lo, frac = pos.floor().long(), (pos - pos.floor()).float()
    hi = (lo + 1).clamp_max(x.shape[1] - 1)
    return (xs[:, lo] * (1 - frac) + xs[:, hi] * frac).T


def rope_tables(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's rotary inverse frequencies and attention scaling per layer: (L, R/2), (L,)."""
    from hack_cli.hf import text_config

    tc = text_config(model)
    rotary = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
    if rotary is None:
        raise HackError(f"kvquant: {type(model).__name__} has no rotary embedding module to invert")
    L = tc.num_hidden_layers
    if hasattr(rotary, "inv_freq"):
        inv = [rotary.inv_freq] * L
        scale = [float(rotary.attention_scaling)] * L
    else:  # one rotary table per layer type (e.g. Gemma-3 sliding vs full attention)
        types = tc.layer_types
        inv = [getattr(rotary, f"{t}_inv_freq") for t in types]
        scale = [float(getattr(rotary, f"{t}_attention_scaling")) for t in types]
    return torch.stack([i.float().cpu() for i in inv]), torch.tensor(scale)


def _pre_rope_hooks(model, captured: dict):
    """Forward hooks capturing each layer's key *before* RoPE (after k_norm where the model has one)."""
    hooks = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        mod = getattr(attn, "k_norm", None) or getattr(attn, "k_proj", None)
        if mod is None:
            return hooks
        head_dim, kv_heads = attn.head_dim, attn.config.num_key_value_heads

        def hook(_m, _inp, out, i=i, head_dim=head_dim, kv_heads=kv_heads):
            # k_proj gives (B, T, H·D); k_norm sees (B, T, H, D) (Qwen3) or, after the transpose, (B, H, T, D)
            # (Gemma-3). Calibration windows are longer than any model has KV heads, so T != H tells them apart.
            heads_first = out.dim() == 4 and out.shape[1] == kv_heads and out.shape[2] != kv_heads
            k = out if heads_first else out.reshape(*out.shape[:2], kv_heads, head_dim).transpose(1, 2)
            captured[i] = k.detach().float()  # (B, H, T, D)
        hooks.append(mod.register_forward_hook(hook))
    return hooks


@torch.no_grad()
def collect(model, sequences: torch.Tensor, sinks: int, batch: int = 4):
    """Run the model over (S, T) token ids. Returns per layer (K post-RoPE, K pre-RoPE, V), each (H, S·(T-sinks),
    D) in fp32 from their 16-bit values, and the worst relative error of the RoPE inversion against the
    model's own pre-RoPE keys (None where the attention exposes no k_proj/k_norm to check against)."""
    inv_freq, scaling = rope_tables(model)
    S, T = sequences.shape
    post, pre, val, worst = [], [], [], None
    for s0 in range(0, S, batch):
        ids = sequences[s0:s0 + batch].to(model.device)
        captured: dict = {}
        hooks = _pre_rope_hooks(model, captured)
        try:
            cache = model(input_ids=ids, use_cache=True).past_key_values
        finally:
            for h in hooks:
                h.remove()
        for i, layer in enumerate(cache.layers):
            k, v = layer.keys.half().float(), layer.values.half().float()  # (b, H, T_i, D)
            t_i = k.shape[2]  # sliding-window layers keep only their window
            pos = torch.arange(T - t_i, T)
            cos, sin = rope_cos_sin(inv_freq[i], float(scaling[i]), pos)
            kp = invert_rope(k, cos.to(k.device), sin.to(k.device))
            if i in captured:
                ref = captured[i][:, :, T - t_i:]
                err = float((kp - ref).abs().amax() / ref.abs().amax().clamp_min(1e-6))
                worst = err if worst is None else max(worst, err)
            cut = max(0, sinks - (T - t_i))
            flat = lambda x: x[:, :, cut:].transpose(0, 1).flatten(1, 2).cpu()  # (H, b·T', D)
            for acc, x in ((post, k), (pre, kp), (val, v)):
                if len(acc) <= i:
                    acc.append([])
                acc[i].append(flat(x))
    cat = lambda acc: [torch.cat(parts, 1) for parts in acc]
    return cat(post), cat(pre), cat(val), worst


def fit_keys(k: torch.Tensor, fraction: float, levels: int, iters: int):
    """k (H, N, D) -> lo, hi (H, D) and levels (H, D, L) of one layer."""
    H, N, D = k.shape
    x = k.permute(0, 2, 1).reshape(H * D, N)  # (H·D, N): one problem per channel
    lo, hi = row_quantiles(x, [fraction / 2, 1 - fraction / 2])  # (H·D,) each
    lo, hi = lo.reshape(H, D), hi.reshape(H, D)
    inl = ~key_outliers(k, lo, hi)  # (H, N, D)
    zero, half = (hi + lo) / 2, ((hi - lo) / 2).clamp_min(1e-8)
    norm = ((k - zero[:, None]) / half[:, None]).permute(0, 2, 1).reshape(H * D, N)
    centers = kmeans_1d(norm, inl.permute(0, 2, 1).reshape(H * D, N), levels, iters)
    return lo, hi, centers.reshape(H, D, levels)


def fit_values(v: torch.Tensor, fraction: float, levels: int, iters: int) -> torch.Tensor:
    """v (H, N, D) -> (L,) levels of one layer for values normalized per (token, head) as the store does."""
    H, N, D = v.shape
    out = value_outliers(v, round(fraction * H * D))
    zero, half = value_range(v, out)
    norm = (v - zero.float()[..., None]) / half.float()[..., None]
    return kmeans_1d(norm.reshape(1, -1), ~out.reshape(1, -1), levels, iters)[0]


def fit(model, sequences: torch.Tensor, bits: int, fraction: float, sinks: int, iters: int = 100):
    """(tensors, metadata) of a calibration file for `model` from (S, T) calibration token ids."""
    from hack_cli.hf import text_config

    post, pre, val, worst = collect(model, sequences, sinks)
    if worst is not None and worst > 1e-2:
        raise HackError(f"kvquant: inverting RoPE does not recover this model's pre-RoPE keys (relative error "
                        f"{worst:.3g}); run with quant.pre_rope=false")
    L = 2 ** bits
    tensors = {}
    for which, keys in (("pre", pre), ("post", post)):
        fits = [fit_keys(k, fraction, L, iters) for k in keys]
        for j, name in enumerate(("lo", "hi", "levels")):
            tensors[f"key_{name}_{which}"] = torch.stack([f[j] for f in fits]).contiguous()
    tensors["value_levels"] = torch.stack([fit_values(v, fraction, L, iters) for v in val]).contiguous()
    tensors["rope_inv_freq"], tensors["rope_scaling"] = rope_tables(model)
    tc = text_config(model)
    H, D = val[0].shape[0], val[0].shape[2]
    meta = {"bits": bits, "outlier_fraction": fraction, "num_layers": tc.num_hidden_layers, "kv_heads": H,
            "head_dim": D, "sequences": sequences.shape[0], "seq_len": sequences.shape[1], "sink_tokens": sinks,
            "tokens": val[0].shape[1], "rope_check_rel_err": "unchecked" if worst is None else f"{worst:.3g}"}
    return tensors, meta


def save(path: Path, tensors: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={k: str(v) for k, v in meta.items()})
