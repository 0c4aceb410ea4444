"""The lm-eval model: lm-eval's `HFLM` over a transformers model whose KV lives in a KV method's cache.

Generation is greedy. Prompts longer than the window are cut in the middle (LongBench's convention: keep the head,
with the instructions, and the tail, with the question) where lm-eval would cut from the left. Batches are left
padded; the padding mask goes to the cache so no method ever quantizes a pad token.
"""
from __future__ import annotations

from typing import Optional

import torch
from lm_eval.models.huggingface import HFLM

from hack_cli.hf import cache_keyword, make_cache, prepare_model


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
        cache = make_cache(self.model, self.method, generation_kwargs.get("attention_mask"))
        generation_kwargs[cache_keyword(self.model)] = cache
        return super()._model_generate(context, max_length, stop, **generation_kwargs)


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
