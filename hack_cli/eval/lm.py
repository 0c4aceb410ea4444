"""The lm-eval model: lm-eval's `HFLM` over a transformers model whose KV lives in a KV method's cache.

Generation is greedy. Prompts longer than the window are cut in the middle (LongBench's convention: keep the head,
with the instructions, and the tail, with the question) where lm-eval would cut from the left. Batches are left
padded; the padding mask goes to the cache so no method ever quantizes a pad token.

Methods whose prefill attention is 16-bit (all but HACK v1's quantized prefill) see exactly the same prefill: the
same K/V and the same first token. So the prefill of a batch runs once (its K/V kept in 16 bits) and each such method
starts from it: its cache is filled with that K/V, compressed as the method does, and decoding goes on from the first
token. When several methods answer the same batch, this saves all but one of their prefills.
"""
from __future__ import annotations

from typing import Optional

import torch
from lm_eval.models.huggingface import HFLM

from hack_cli.hf import cache_keyword, make_cache, make_method, prepare_model


def middle_truncate(ids: list[int], max_len: int) -> list[int]:
    """Keep the first ceil(max_len/2) and the last floor(max_len/2) tokens of a sequence longer than max_len."""
    if len(ids) <= max_len:
        return ids
    head = (max_len + 1) // 2
    return ids[:head] + ids[len(ids) - (max_len - head):]


class KVMethodLM(HFLM):
    """`HFLM` whose generation runs with `method` holding (and attending over) the KV cache."""

    def __init__(self, model, tokenizer, method, max_length: int, batch_size: int = 1):
        prepare_model(model)
        super().__init__(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size,
                         backend="causal")
        self.method = method
        self.share_prefill = True  # False: every method runs its own prefill (the plain path, for checking)
        self._prefilled = None  # (input ids, mask, first tokens, 16-bit cache) of the last batch prefilled

    def tok_batch_encode(self, strings: list[str], padding_side: str = "left",
                         left_truncate_len: Optional[int] = None, truncation: bool = False):
        """(B, T) input ids and attention mask, left padded; over-long prompts cut in the middle."""
        encoded = [self.tok_encode(s) for s in strings]
        if left_truncate_len:
            encoded = [middle_truncate(ids, left_truncate_len) for ids in encoded]
        T = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(encoded), T), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(encoded), T, dtype=torch.long)  # (B, T)
        for b, ids in enumerate(encoded):
            input_ids[b, T - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[b, T - len(ids):] = 1
        return input_ids, mask

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        generation_kwargs.update(do_sample=False, temperature=0.0)  # greedy, whatever the task asked for
        mask = generation_kwargs.get("attention_mask")
        if self.method.quantized_prefill or mask is None or not self.share_prefill:
            generation_kwargs[cache_keyword(self.model)] = make_cache(self.model, self.method, mask)
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        first, cache = self._from_shared_prefill(context, mask)  # (B, 1), the method's cache over the prompt
        generation_kwargs.update({"attention_mask": torch.cat([mask, torch.ones_like(first)], 1),
                                  cache_keyword(self.model): cache})
        out = super()._model_generate(torch.cat([context, first], 1), max_length, stop, **generation_kwargs)
        eos = self.tokenizer.eos_token_id
        out[(first[:, 0] == eos), context.shape[1] + 1:] = eos  # answered "end" at once: nothing after it
        return out

    @torch.no_grad()
    def _from_shared_prefill(self, context: torch.Tensor, mask: torch.Tensor):
        """First greedy token (B, 1) and a cache of `self.method` holding the prompt's K/V, compressed by it."""
        p = self._prefilled
        if p is None or p[0].shape != context.shape or not (p[0].eq(context).all() and p[1].eq(mask).all()):
            record = make_cache(self.model, make_method("fp16"), mask)
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T) as generate numbers left-padded tokens
            logits = self.model(input_ids=context, attention_mask=mask, position_ids=positions, logits_to_keep=1,
                                **{cache_keyword(self.model): record}).logits  # (B, 1, V): not (B, T, V)
            first = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            self._prefilled = p = (context, mask, first, record)
        _, _, first, record = p
        cache = make_cache(self.model, self.method, mask)
        T, valid = context.shape[1], mask.bool().cpu()
        for layer, done in zip(cache.layers, record.layers):
            kv = {}
            for x in "kv":
                held = done.store.kv[x]  # (B, H, capacity, D): sequence b's real tokens first
                full = held.new_zeros(held.shape[0], held.shape[1], T, held.shape[3])  # (B, H, T, D), left padded
                for b in range(full.shape[0]):
                    n = int(done.store.lengths[b])
                    full[b, :, T - n:] = held[b, :, :n]
                kv[x] = full.to(self.model.dtype)
            layer.lazy_initialization(kv["k"], kv["v"])
            layer.store.append(kv["k"], kv["v"], valid)
            layer.seen = T
        return first, cache


def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + <s>, </s>, <pad>) for random-weight test models, which ship none."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
