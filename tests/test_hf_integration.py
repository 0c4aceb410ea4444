"""Hugging Face integration: every supported architecture runs forward and generate with KV methods."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hack_cli.errors import HackError
from hack_cli.hf import cache_keyword, generate, load_model, make_cache, make_method, prepare_model

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024)
ARCHS = {
    "llama": dict(head_dim=16),
    "mistral": dict(head_dim=16, sliding_window=None),
    "qwen2": dict(),
    "qwen3": dict(head_dim=16),
    "phi3": dict(pad_token_id=0),
    "gemma3_text": dict(head_dim=16, sliding_window=32, query_pre_attn_scalar=16),
}


def tiny(model_type):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **SMALL, **ARCHS[model_type])
    return AutoModelForCausalLM.from_config(config).eval()


@torch.no_grad()
def logits_with(model, method, ids, steps=6):
    """Prefill ids[:, :-steps], then decode the last `steps` tokens one at a time: (B, steps + 1, vocab)."""
    cache = make_cache(model, method)
    kw = {cache_keyword(model): cache, "use_cache": True}
    out = [model(input_ids=ids[:, :-steps], **kw).logits[:, -1]]
    for t in range(ids.shape[1] - steps, ids.shape[1]):
        out.append(model(input_ids=ids[:, t:t + 1], **kw).logits[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_architectures_run_with_fp16_and_hack(model_type):
    model = tiny(model_type)
    ids = torch.randint(0, 256, (2, 120))
    with torch.no_grad():
        stock = model(input_ids=ids).logits[:, -7:]  # (B, 7, vocab) full causal forward, stock attention
    prepare_model(model)
    fp16 = logits_with(model, make_method("fp16"), ids)
    hack8 = logits_with(model, make_method("hack", bits=8, partition=32), ids)
    torch.testing.assert_close(fp16, stock, atol=2e-3, rtol=2e-3)  # 16-bit KV storage only
    assert ((hack8 - stock).norm() / stock.norm()) < 0.02
    out = generate(model, make_method("hack", bits=2, partition=32), ids[:, :40], max_new_tokens=5)
    assert out.shape == (2, 45)


def test_unsupported_architecture_is_a_clear_error():
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(HackError, match="'gpt2' is not supported"):
        prepare_model(model)


def test_a_tokenizer_converted_differently_stops_loading():
    from hack_cli.hf.models import model_config

    right = model_config("smollm2")
    assert load_model(right)[1] is not None  # the packaged tokenizer gives conf/model/smollm2.yaml's ids
    right.tokenizer_check = right.tokenizer_check[:-1] + [right.tokenizer_check[-1] + 1]
    with pytest.raises(HackError, match="tokenizer .* gives .* not model.tokenizer_check"):
        load_model(right)


def test_weight_fingerprint_tells_one_changed_weight():
    from hack_cli.hf.models import weight_fingerprint

    model = load_model("tiny")[0]
    before = weight_fingerprint(model)
    assert weight_fingerprint(model) == before
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    assert weight_fingerprint(model)["sum"] != before["sum"]


@pytest.fixture(scope="module")
def smollm2():
    model, tok = load_model("smollm2")
    tok.padding_side = "left"
    return prepare_model(model), tok


PROMPT = ("Paul Graham wrote many essays about startups. In one of them he argues that the best way to get "
          "startup ideas is not to try to think of startup ideas, but to look for problems, preferably problems "
          "you have yourself. The very best startup ideas tend to have three things in common: they are something "
          "the founders themselves want, that they themselves can build, and that few others realize are worth "
          "doing. Microsoft, Apple, Yahoo, Google, and Facebook all began this way. Question: according to the "
          "essay, what three things do the best startup ideas have in common? Answer:")


def test_fp16_reproduces_stock_generation_and_8_bit_hack_matches(smollm2):
    model, tok = smollm2
    ids = tok([PROMPT, "The capital of France is"], return_tensors="pt", padding=True)
    assert ids.input_ids.shape[1] > 4 + 64  # past the sinks and a full Π=64 block: quantization is exercised
    model.set_attn_implementation("sdpa")
    stock = model.generate(**ids, max_new_tokens=16, do_sample=False)
    prepare_model(model)
    fp16 = generate(model, make_method("fp16"), ids.input_ids, ids.attention_mask, max_new_tokens=16)
    hack8 = generate(model, make_method("hack", bits=8), ids.input_ids, ids.attention_mask, max_new_tokens=16)
    assert torch.equal(fp16, stock)
    assert torch.equal(hack8, fp16)
