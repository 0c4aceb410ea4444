"""The attention function registered with transformers as `hack_kv`: it attends over a `LayerKV` store."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hack_cli.errors import HackError

NAME = "hack_kv"
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3", "gemma3_text")


def kv_attention(module, query: torch.Tensor, key, value, attention_mask, scaling=None, dropout: float = 0.0,
                 **kwargs):
    """query: (B, Hq, Tq, D); key: the layer's store; value: (fresh K, fresh V, prefill16).
    Returns ((B, Tq, Hq, D), None) as transformers expects."""
    if kwargs.get("softcap") is not None:
        raise HackError("attention logit soft-capping is not supported by the KV methods")
    store, (k_new, v_new, prefill16) = key, value
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if prefill16:  # 16-bit prefill attention over the fresh K/V, exactly as stock SDPA would do it
        mask = attention_mask
        if mask is not None and mask.dtype != torch.bool:
            mask = mask > -1  # additive float mask -> boolean
        out = F.scaled_dot_product_attention(query, k_new.to(query.dtype), v_new.to(query.dtype), attn_mask=mask,
                                             is_causal=mask is None, scale=scaling,
                                             enable_gqa=query.shape[1] != k_new.shape[1])
    else:
        out = store.attend(query, scaling, kwargs.get("sliding_window"))
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, kv_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def check_supported(model) -> None:
    kind = text_config(model).model_type
    if kind not in SUPPORTED:
        raise HackError(f"model architecture {kind!r} is not supported; supported: {', '.join(SUPPORTED)}")
