"""Inputs for `hack bench kernels`: realistic K/V, and each method's stored form of them built with the kernels.

Torch + Triton only (the GPU machine has no Hydra/OmegaConf), so hack_cli is not imported here.
"""
from __future__ import annotations

import math
from dataclasses import fields, replace

import torch

from hack_kernels.decode import HackKV
from hack_kernels.quantize import quantize_blocks

# Attention shapes (query heads, KV heads, head dim) of the models in conf/model/.
SHAPES = {"llama31_8b": (32, 8, 128), "qwen3_8b": (32, 8, 128), "mistral_7b": (32, 8, 128),
          "llama31_70b": (64, 8, 128), "smollm2": (9, 3, 64)}  # smollm2: the captured real K/V (errors section)


def realistic_kv(batch: int, q_heads: int, kv_heads: int, tokens: int, head_dim: int, seed: int = 0,
                 device="cuda", dtype=torch.bfloat16, hot_mass: float = 0.5):
    """q (B, Hq, D), k, v (B, H, N, D) in `dtype`. Keys carry per-channel offsets and 8x outlier channels (as real
    keys do); each query leans towards 8 keys of its KV head, just enough that those 8 hold about `hot_mass` of the
    attention at any context. Neither flat (i.i.d. Gaussians make every 2-bit method look equally bad) nor one-hot
    (the output would be one value vector, and the error that vector's 2-bit rounding)."""
    g = torch.Generator(device=device).manual_seed(seed)
    B, H, N, D, R = batch, kv_heads, tokens, head_dim, q_heads // kv_heads
    k = torch.randn(B, H, N, D, generator=g, device=device, dtype=dtype)
    k[..., :: D // 4] *= 8  # outlier channels
    k += torch.randn(1, H, 1, D, generator=g, device=device, dtype=dtype) * 2  # per-channel offsets
    v = torch.randn(B, H, N, D, generator=g, device=device, dtype=dtype)
    hot = torch.randint(0, N, (B, H, 8), generator=g, device=device)  # (B, H, 8) keys each query likes
    sample = k[:, :, :: max(1, N // 1024)].float()  # (B, H, ~1024, D)
    mean = sample.mean(2, keepdim=True)  # (B, H, 1, D)
    kh = torch.gather(k, 2, hot[..., None].expand(-1, -1, -1, D)).float() - mean  # (B, H, 8, D)
    t = kh.sum(2) / kh.sum(2).norm(dim=-1, keepdim=True)  # (B, H, D) unit direction of the hot keys
    noise = torch.randn(B, H, R, D, generator=g, device=device)
    s_noise = (noise @ (sample - mean).transpose(-1, -2)) / math.sqrt(D)  # (B, H, R, ~1024) noise logits
    gap_unit = (kh @ t[..., None]).mean(2) / math.sqrt(D)  # (B, H, 1): hot keys' logit per unit of t
    want = math.log(N / 8 * hot_mass / (1 - hot_mass)) + s_noise.var(-1) / 2  # (B, H, R) hot-key logit gap
    q = noise + (want / gap_unit)[..., None] * t[:, :, None, :]  # (B, H, R, D)
    return q.reshape(B, q_heads, D).to(dtype), k, v


def attention_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Decode attention in fp32 over unquantized K/V: q (B, Hq, D), k/v (B, H, N, D) -> (B, Hq, D)."""
    B, Hq, D = q.shape
    H = k.shape[1]
    out = []
    for b in range(B):  # one sequence at a time bounds the fp32 copies
        qb = q[b].float().reshape(H, Hq // H, D)  # (H, R, D)
        p = torch.softmax(qb @ k[b].float().transpose(-1, -2) * scaling, -1)  # (H, R, N)
        out.append((p @ v[b].float()).reshape(Hq, D))
    return torch.stack(out)


def hack_store(k: torch.Tensor, v: torch.Tensor, layout: str, bits: int, partition: int, sinks: int = 4) -> HackKV:
    """Quantize (B, H, N, D) K/V into HACK's layout with the quantize kernel: `sinks` 16-bit tokens, whole blocks of
    Π tokens, the rest in the 16-bit open block (every sequence of the batch has N tokens)."""
    B, H, N, D = k.shape
    P, c = partition, min(partition, D)
    nc = (N - sinks) // P
    fill = N - sinks - nc * P
    body = lambda x: x[:, :, sinks:sinks + nc * P].reshape(B * H * nc, P, D)  # (B·H·nc, Π, D) whole blocks
    kq = quantize_blocks(body(k), bits, c, per_channel=layout == "channel", token_sums=True)
    vq = quantize_blocks(body(v), bits, c, per_channel=layout == "token", token_sums=False, along_tokens=True)
    shape = lambda t: t.view(B, H, nc, *t.shape[1:])
    open_block = lambda x: torch.nn.functional.pad(x[:, :, sinks + nc * P:], (0, 0, 0, P - fill)).contiguous()
    i32 = lambda n: torch.full((B,), n, dtype=torch.int32, device=k.device)
    return HackKV(layout, bits, shape(kq["codes"]), shape(kq["mn"]), shape(kq["scale"]), shape(kq["sums"]),
                  shape(vq["codes"]), shape(vq["mn"]), shape(vq["scale"]), shape(vq["sums"]),
                  k[:, :, :sinks].contiguous(), v[:, :, :sinks].contiguous(), open_block(k), open_block(v),
                  i32(nc), i32(fill), i32(sinks))


def kivi_store(k: torch.Tensor, v: torch.Tensor, bits: int = 2, group: int = 32, residual: int = 128):
    """KIVI's layout (hack_cli/methods/kivi.py) of (B, H, N, D) K/V: keys per channel over groups of `group` tokens,
    values per token over groups of `group` channels, the newest tokens (residual .. residual + group - 1) 16-bit.
    Returns (tensors dict, res_k, res_v, n_q, n_res)."""
    B, H, N, D = k.shape
    nq = max(0, (N - residual) // group) * group
    body = lambda x: x[:, :, :nq].reshape(B * H * nq // group, group, D)
    kq = quantize_blocks(body(k), bits, group, per_channel=True, token_sums=True)
    vq = quantize_blocks(body(v), bits, min(group, D), per_channel=False, token_sums=False)
    t = {"k_codes": kq["codes"].view(B, H, nq, -1), "k_mn": kq["mn"].view(B, H, nq // group, D),
         "k_scale": kq["scale"].view(B, H, nq // group, D), "v_codes": vq["codes"].view(B, H, nq, -1),
         "v_mn": vq["mn"].view(B, H, nq, -1), "v_scale": vq["scale"].view(B, H, nq, -1)}
    res = lambda x: torch.nn.functional.pad(x[:, :, nq:], (0, 0, 0, residual + group - 1 - (N - nq))).contiguous()
    i32 = lambda n: torch.full((B,), n, dtype=torch.int32, device=k.device)
    return t, res(k), res(v), i32(nq), i32(N - nq)


def hack_bytes(kv: HackKV) -> int:
    """Bytes the decode kernel must read: every tensor's used part (closed blocks, filled sinks and open block)."""
    nc, fill, sf = int(kv.n_closed[0]), int(kv.fill[0]), int(kv.sink_fill[0])
    B, H = kv.k_codes.shape[:2]
    used = sum(getattr(kv, f.name)[:, :, :nc].nbytes for f in fields(kv)
               if f.name.startswith(("k_", "v_")))  # tensors are exactly nc blocks long here
    tail = kv.open_k.element_size() * B * H * kv.open_k.shape[-1] * 2 * (fill + sf)
    return used + tail


def kivi_bytes(t: dict, res_k: torch.Tensor, n_res: int) -> int:
    B, H, _, D = res_k.shape
    return sum(x.nbytes for x in t.values()) + 2 * B * H * n_res * D * res_k.element_size()


def clone_store(x):
    """A deep copy of a HackKV or a tuple/dict of tensors (for rotating inputs past the L2 cache)."""
    if isinstance(x, HackKV):
        return replace(x, **{f.name: getattr(x, f.name).clone() for f in fields(x) if torch.is_tensor(getattr(x, f.name))})
    if isinstance(x, dict):
        return {k: clone_store(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(clone_store(v) for v in x)
    return x.clone() if torch.is_tensor(x) else x
