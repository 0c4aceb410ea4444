"""Realistic K/V for attention tests: outlier key channels and peaked attention (i.i.d. Gaussians say nothing)."""
import torch


def realistic_kv(batch, kv_heads, tokens, head_dim, q_heads, seed=0):
    """Returns q (B, Hq, 1, D), k, v (B, H, T, D). A few key channels carry 8x outliers (as in real models) and
    each query is aligned with a handful of keys, so attention is peaked."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, kv_heads, tokens, head_dim, generator=g)
    k[..., :: head_dim // 4] *= 8  # outlier channels
    v = torch.randn(batch, kv_heads, tokens, head_dim, generator=g)
    group = q_heads // kv_heads
    hot = torch.randint(0, tokens, (batch, kv_heads, 4), generator=g)  # (B, H, 4) keys each query likes
    target = torch.gather(k, 2, hot[..., None].expand(-1, -1, -1, head_dim)).sum(2)  # (B, H, D)
    q = target[:, :, None].expand(-1, -1, group, -1).reshape(batch, q_heads, 1, head_dim)
    q = 0.3 * q + torch.randn(batch, q_heads, 1, head_dim, generator=g)
    return q, k, v


def attention_fp32(q, k, v, scaling):
    """q (Hq, Tq, D), k/v (H, T, D) of one sequence; full (non-causal) attention of the queries over all keys."""
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0).float(), v.repeat_interleave(group, 0).float()
    return torch.softmax(q.float() @ k.transpose(-1, -2) * scaling, -1) @ v
