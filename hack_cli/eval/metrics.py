"""Per-sample scores (in [0, 1]) and the paired comparison against the fp16 baseline.

Scores follow the paper's artifact and LongBench: ROUGE-1 F with stemming (`rouge-score`), edit similarity
1 - normalized Levenshtein (`rapidfuzz`), SQuAD-style token F1, exact match after light normalization. The
difference to fp16 is paired over samples (same documents, both methods): mean of the per-sample differences with a
Student-t 95% confidence interval on those differences.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from functools import lru_cache

from hack_cli.errors import HackError


def normalize_answer(text: str) -> str:
    """SQuAD/LongBench normalization: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1(prediction: str, reference: str) -> float:
    """Token-level F1 of the normalized strings (LongBench's qa_f1_score)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def rouge1(prediction: str, reference: str) -> float:
    """ROUGE-1 F-measure with Porter stemming (the artifact's arXiv metric)."""
    return _rouge_scorer().score(reference, prediction)["rouge1"].fmeasure


def edit_sim(prediction: str, reference: str) -> float:
    """1 - Levenshtein distance / max length (the paper's HumanEval metric; LongBench's code_sim_score)."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.normalized_similarity(prediction, reference)


METRICS = {"exact_match": exact_match, "f1": f1, "rouge1": rouge1, "edit_sim": edit_sim}


def metric(name: str):
    if name not in METRICS:
        raise HackError(f"unknown metric {name!r}: expected one of {', '.join(METRICS)}")
    return METRICS[name]


def best_over_references(name: str, prediction: str, references: list[str]) -> float:
    """The best score against any of the reference answers (LongBench's convention)."""
    fn = metric(name)
    return max(fn(prediction, ref) for ref in references)


def paired_difference(method: list[float], baseline: list[float]) -> dict[str, float]:
    """Mean of `method[i] - baseline[i]` and the half-width of its 95% Student-t confidence interval.

    Paired over the same samples, so the (large) between-sample variance cancels. With n = 1 the interval is
    undefined (nan); with all differences equal it is 0.
    """
    if len(method) != len(baseline) or not method:
        raise ValueError("paired_difference needs two non-empty lists of the same length")
    d = [m - b for m, b in zip(method, baseline)]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return {"diff": mean, "ci95": math.nan, "n": n}
    from scipy.stats import t

    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    return {"diff": mean, "ci95": float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n), "n": n}
