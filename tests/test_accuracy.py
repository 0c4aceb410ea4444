"""`hack eval accuracy`: task loaders on hub-schema fixtures, metrics against hand-computed values, middle
truncation, the paired table, and tiny end-to-end runs (random weights: the pipeline is real, the scores are not)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from hack_cli.config import DatasetConfig
from hack_cli.errors import HackError
from hack_cli.eval import metrics, table
from hack_cli.eval.lm import byte_tokenizer, middle_truncate
from hack_cli.eval.tasks import build

FIXTURES = Path(__file__).parent / "fixtures" / "accuracy"


def docs_of(task) -> list[dict]:
    return list(task.test_docs())


def score(task, doc, prediction) -> float:
    return task.process_results(doc, [prediction])["score"]


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_match_hand_computed_values():
    assert metrics.exact_match("The Paris.", "paris") == 1.0
    assert metrics.exact_match("Paris, France", "paris") == 0.0
    # pred tokens {cat, sat}, ref {cat, sat, down}: P = 1, R = 2/3 -> F1 = 0.8
    assert metrics.f1("the cat sat", "cat sat down") == pytest.approx(0.8)
    assert metrics.f1("dog", "cat") == 0.0
    # kitten -> sitting: 3 edits over 7 characters
    assert metrics.edit_sim("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    # stemming makes cats/cat and running/runs match; "fast" is extra: P = 2/3, R = 1 -> F = 0.8
    assert metrics.rouge1("cats running fast", "cat runs") == pytest.approx(0.8)
    assert metrics.best_over_references("exact_match", "100 C", ["100 degrees", "100 C"]) == 1.0


def test_paired_difference_is_a_t_interval_on_the_differences():
    d = metrics.paired_difference([1, 1, 0, 1], [1, 0, 0, 0])  # differences 0, 1, 0, 1
    sd = math.sqrt(1 / 3)
    assert d["diff"] == pytest.approx(0.5) and d["n"] == 4
    assert d["ci95"] == pytest.approx(3.182446 * sd / 2, rel=1e-5)  # t(0.975, 3) = 3.182446
    assert metrics.paired_difference([0.5, 0.5], [0.5, 0.5])["ci95"] == 0.0
    with pytest.raises(HackError):
        metrics.metric("bleu")


def test_table_pairs_methods_with_the_baseline_by_document():
    rows = [{"model": "m", "task": "t", "method": meth, "doc_id": i, "key": f"{meth}/t/{i}", "score": s}
            for meth, scores in (("fp16", [1, 1, 1, 0]), ("hack", [1, 0, 1, 0]), ("kivi", [1, 1]))
            for i, s in enumerate(scores)]
    by = {e["method"]: e for e in table.summarize(rows)}
    assert by["fp16"]["score"] == 75 and by["fp16"]["diff"] is None
    assert by["hack"]["diff"] == pytest.approx(-25) and by["hack"]["n_paired"] == 4
    assert by["kivi"]["diff"] == 0 and by["kivi"]["n_paired"] == 2  # paired only over the docs it has
    text = table.to_markdown(table.summarize(rows))
    assert "| m | t | 75.0 (n=4) | 50.0 (-25.0 ± " in text and ", n=2) |" in text


# ---------------------------------------------------------------------------------------------- truncation
def test_middle_truncation_keeps_head_and_tail():
    assert middle_truncate(list(range(10)), 5) == [0, 1, 2, 8, 9]
    assert middle_truncate(list(range(10)), 4) == [0, 1, 8, 9]
    assert middle_truncate([1, 2], 5) == [1, 2]


def test_lm_cuts_long_prompts_in_the_middle_and_pads_left():
    from hack_cli.eval.lm import KVMethodLM
    from hack_cli.hf import load_model, make_method

    model, _ = load_model("tiny")
    lm = KVMethodLM(model, byte_tokenizer(), make_method("fp16"), max_length=64)
    ids, mask = lm.tok_batch_encode(["HEAD" + "x" * 100 + "TAIL", "short"], left_truncate_len=20)
    assert ids.shape == (2, 20) and mask[0].all() and mask[1].sum() == 5 and not mask[1, :15].any()
    text = lm.tokenizer.decode(ids[0])
    assert text.startswith("HEAD") and text.endswith("TAIL")


def test_shared_prefill_gives_the_same_answers_as_each_method_prefilling_alone():
    from lm_eval.api.instance import Instance

    from hack_cli.eval.lm import KVMethodLM
    from hack_cli.hf import load_model, make_method

    model, _ = load_model("tiny")
    lm = KVMethodLM(model, byte_tokenizer(), make_method("fp16"), max_length=256, batch_size=2)
    prompts = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello world."]  # left padding in the batch
    reqs = [Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 6}), i) for i, p in enumerate(prompts)]
    for method in (make_method("fp16"), make_method("hack", partition=32)):
        lm.method = method
        answers = {}
        for share in (False, True):
            lm.share_prefill = share
            answers[share] = lm.generate_until(reqs, disable_tqdm=True)
        assert answers[True] == answers[False] and all(answers[True])


# ---------------------------------------------------------------------------------------------- loaders
def test_paper_tasks_load_hub_schema_fixtures_and_score():
    """In a child process: scoring these tasks configures global logging onto pytest's per-test captured stream,
    which breaks every later test that runs the CLI in-process (I/O on a closed file)."""
    code = "import test_accuracy as t; t.check_paper_tasks()"
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, check=True, timeout=300)


def check_paper_tasks():
    imdb, = build(DatasetConfig(name="imdb", path=str(FIXTURES / "imdb.jsonl")), None, None, 0)
    doc = docs_of(imdb)[0]
    assert imdb.doc_to_text(doc).endswith("Answer with one word.")
    assert score(imdb, doc, " Action, clearly") == 1.0 and score(imdb, doc, "Drama") == 0.0

    arxiv, = build(DatasetConfig(name="arxiv", path=str(FIXTURES / "arxiv.jsonl"), options={"max_chars": 50}),
                   None, None, 0)
    doc = docs_of(arxiv)[0]
    assert len(arxiv.doc_to_text(doc)) < 120  # the article is cut to max_chars
    assert score(arxiv, doc, doc["abstract"]) == pytest.approx(1.0)

    gsm, = build(DatasetConfig(name="gsm8k", path=str(FIXTURES / "gsm8k.jsonl")), None, None, 0)
    doc = docs_of(gsm)[1]
    assert score(gsm, doc, "2 books are 24, plus 3.\nAnswer: 27") == 1.0
    assert score(gsm, doc, "Answer: 26") == 0.0

    he, = build(DatasetConfig(name="humaneval", path=str(FIXTURES / "humaneval.jsonl")), None, None, 0)
    doc = docs_of(he)[0]
    assert doc["gen_prefix"].endswith(doc["prompt"])  # the answer starts with the function's own code
    assert score(he, doc, "    return a + b\n") == 1.0 and score(he, doc, "    pass\n") < 0.5


def test_humaneval_defaults_to_the_packaged_problems():
    he, = build(DatasetConfig(name="humaneval"), None, None, 0)
    assert len(docs_of(he)) == 164


def test_cocktail_builds_numbered_passages_from_a_beir_folder():
    task, = build(DatasetConfig(name="cocktail", path=str(FIXTURES / "cocktail"), options={"passages": 4}),
                  None, None, 0)
    docs = docs_of(task)
    assert [d["query_id"] for d in docs] == ["q1", "q2"]
    doc = docs[0]
    assert doc["passages"].count("[doc") == 4 and f"[{doc['answer']}] Paris" in doc["passages"]
    assert score(task, doc, f"{doc['answer']}.") == 1.0 and score(task, doc, "none") == 0.0


def test_hub_tasks_offline_say_how_to_run_locally():
    with pytest.raises(HackError, match="dataset.path"):
        build(DatasetConfig(name="imdb"), None, None, 0)


def test_jsonl_task_reads_question_or_input_and_scores_the_best_answer():
    task, = build(DatasetConfig(name="jsonl", path=str(FIXTURES / "qa.jsonl"), metric="exact_match"), None, None, 0)
    docs = docs_of(task)
    assert len(docs) == 3 and docs[1]["question"].startswith("At what temperature")
    assert score(task, docs[1], " 100 C\nbecause...") == 1.0
    assert score(task, docs[0], "London") == 0.0


@pytest.mark.parametrize("line, message", [
    ('{"context": "a", "question": "b", "answers": ["c"\n', r"bad\.jsonl:3: not valid JSON"),
    ('{"context": "a", "answers": ["c"]}\n', r":3: needs string fields `context` and `question`"),
    ('{"context": "a", "question": "b", "answers": "c"}\n', r":3: `answers` must be a non-empty list"),
])
def test_jsonl_malformed_line_fails_with_its_line_number(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = (FIXTURES / "bad.jsonl").read_text().splitlines(keepends=True)[:2]
    path.write_text("".join(good) + line)
    with pytest.raises(HackError, match=message):
        build(DatasetConfig(name="jsonl", path=str(path), metric="f1"), None, None, 0)


def test_ruler_tasks_generate_offline_with_the_needle_inside_and_repeat_with_the_seed():
    tok = byte_tokenizer()
    options = {"tasks": ["niah_single_2", "niah_multikey_2"], "lengths": [512], "samples": 2, "max_gen_toks": 16}
    tasks = build(DatasetConfig(name="ruler", options=options), tok, None, 0)
    assert [t.config.task for t in tasks] == ["niah_single_2_512", "niah_multikey_2_512"]
    for task in tasks:
        for doc in docs_of(task):
            assert all(answer in doc["input"] for answer in doc["outputs"])
            assert len(tok(doc["input"]).input_ids) + 16 <= 512
            assert score(task, doc, " " + " ".join(doc["outputs"])) == 1.0
    again = build(DatasetConfig(name="ruler", options=options), tok, None, 0)
    assert docs_of(again[0]) == docs_of(tasks[0])


def test_ruler_documents_without_a_reference_answer_are_left_out(monkeypatch):
    from hack_cli.eval.tasks import ruler

    made = [{"input": "a", "outputs": ["x"], "gen_prefix": ""}, {"input": "b", "outputs": [], "gen_prefix": ""}]
    monkeypatch.setattr(ruler, "generate", lambda *args: list(made))
    options = {"tasks": ["cwe"], "lengths": [1024], "samples": 2}
    (task,) = build(DatasetConfig(name="ruler", options=options), byte_tokenizer(), None, 0)
    assert [d["input"] for d in docs_of(task)] == ["a"]  # scoring "b" would divide by zero


# ---------------------------------------------------------------------------------------------- end to end
def hack(*args):
    """The CLI in a child process: lm-eval's logging setup inside pytest's per-test capture otherwise breaks
    every later in-process CLI run (I/O on a closed file)."""
    result = subprocess.run([sys.executable, "-m", "hack_cli", *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


TINY = ["model=tiny", "dataset=jsonl", f"dataset.path={FIXTURES / 'qa.jsonl'}", "dataset.metric=f1",
        "dataset.options.max_gen_toks=4", "accuracy.batch_size=2"]


def test_tiny_run_writes_rows_table_and_resumes_without_redoing(tmp_path):
    out = tmp_path / "run"
    hack("eval", "accuracy", *TINY, f"out_dir={out}")
    written = rows(out / "samples.jsonl")
    assert sorted(r["key"] for r in written) == sorted(f"{m}/qa/{i}" for m in ("fp16", "hack-channel-b2-p64")
                                                       for i in range(3))
    assert {"task", "doc_id", "quant", "prediction", "reference", "score"} <= set(written[0])
    metrics_json = json.loads((out / "metrics.json").read_text())
    assert metrics_json["qa/fp16/n"] == 3 and "qa/hack-channel-b2-p64/ci95" in metrics_json
    assert "hack-channel-b2-p64" in (out / "accuracy_table.md").read_text()

    # a run killed after 4 rows: resume writes only the 2 missing answers (a redone row would be a duplicate key,
    # which the row log refuses) and keeps the first 4 as they were
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in written[:4]))
    hack("eval", "accuracy", *TINY, f"out_dir={out}", "resume=true")
    again = rows(out / "samples.jsonl")
    assert len(again) == 6
    assert again[:4] == written[:4] and sorted(r["key"] for r in again) == sorted(r["key"] for r in written)


def test_shards_split_the_batches_and_resume_a_copy_of_the_run(tmp_path):
    # 3 documents in batches of 2: shard [1, 2] answers the second batch only (1 document, both methods); shard
    # [0, 2] resuming the same directory (shard may change on resume) adds the first: together, the whole run
    out = tmp_path / "run"
    hack("eval", "accuracy", *TINY, f"out_dir={out}", "accuracy.shard=[1,2]")
    second = rows(out / "samples.jsonl")
    assert len(second) == 2 and len({r["doc_id"] for r in second}) == 1
    hack("eval", "accuracy", *TINY, f"out_dir={out}", "accuracy.shard=[0,2]", "resume=true")
    assert sorted(r["key"] for r in rows(out / "samples.jsonl")) == sorted(
        f"{m}/qa/{i}" for m in ("fp16", "hack-channel-b2-p64") for i in range(3))
    from hack_cli.eval.accuracy import AccuracyConfig

    with pytest.raises(HackError, match=r"accuracy.shard: \[2, 2\] is not allowed"):
        AccuracyConfig(shard=[2, 2])


def test_merge_joins_shard_copies_each_key_once(tmp_path):
    from hack_cli.eval.merge import merge

    def write(d, keys):
        d.mkdir()
        (d / "samples.jsonl").write_text("".join(json.dumps({"key": k, "score": 1.0}) + "\n" for k in keys))

    write(tmp_path / "run", ["a", "b"])  # the run before it was split
    write(tmp_path / "s0", ["a", "b", "c"])  # shard copies: the old rows plus each one's new ones
    write(tmp_path / "s1", ["a", "b", "d", "e"])
    with open(tmp_path / "s1" / "samples.jsonl", "a") as f:
        f.write('{"key": "f", "sco')  # killed in the middle of a row
    assert merge(tmp_path / "run", [tmp_path / "s0", tmp_path / "s1"]) == 3
    assert [r["key"] for r in rows(tmp_path / "run" / "samples.jsonl")] == ["a", "b", "c", "d", "e"]
    assert merge(tmp_path / "run", [tmp_path / "s1"]) == 0  # merging again adds nothing


@pytest.mark.parametrize("tool, args, message", [
    ("table", ["--help"], "usage: python -m hack_cli.eval.table"),
    ("table", ["{tmp}/nowhere"], "nowhere is not a directory"),
    ("table", ["{tmp}"], "error: no samples.jsonl rows in"),
    ("merge", ["{tmp}/run", "{tmp}"], "error: no samples.jsonl in"),
])
def test_table_and_merge_refuse_bad_input_in_one_line(tmp_path, tool, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    result = subprocess.run([sys.executable, "-m", f"hack_cli.eval.{tool}", *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_tiny_sweep_builds_the_sweep_table(tmp_path):
    out = tmp_path / "sweep"
    hack("eval", "accuracy", "-m", *TINY, "quant=fp16,hack", "accuracy.baseline=null", f"out_dir={out}")
    text = (out / "accuracy_table.md").read_text()
    assert "| tiny | qa | " in text and "(n=3)" in text and ", n=3) |" in text
    summary = {e["method"]: e for e in table.summarize(table.load_samples([out]))}
    assert summary["hack-channel-b2-p64"]["n_paired"] == 3


def test_methods_list_adds_configs_and_rejects_unknown_ones(tmp_path):
    out = tmp_path / "run"
    hack("eval", "accuracy", *TINY, "quant=fp16", "accuracy.limit=1", f"out_dir={out}",
         "accuracy.methods=[{quant: hack, partition: 32},{quant: hack_v1},{quant: hack, layout: token}]")
    assert {r["method"] for r in rows(out / "samples.jsonl")} == {  # hack_v1 also changes rounding, sinks, prefill
        "fp16", "hack-channel-b2-p32", "hack-token-b2-p64-sr-s0-qp", "hack-token-b2-p64"}
    bad = subprocess.run([sys.executable, "-m", "hack_cli", "eval", "accuracy", *TINY, f"out_dir={tmp_path / 'bad'}",
                          "accuracy.methods=[{quant: nope}]"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no quant config 'nope'" in bad.stderr


def test_default_command_composes_to_smollm2_fp16_and_hack_on_the_small_suite():
    result = hack("eval", "accuracy", "--cfg", "job")
    assert "name: smollm2" in result.stdout and "baseline: fp16" in result.stdout
    assert "name: suite" in result.stdout and "niah_single_2" in result.stdout and "humaneval" in result.stdout


@pytest.mark.slow
def test_default_command_runs_for_real(tmp_path):
    out = tmp_path / "default"
    hack("eval", "accuracy", f"out_dir={out}")
    summary = {(e["task"], e["method"]): e for e in table.summarize(rows(out / "samples.jsonl"))}
    assert summary[("niah_single_2_2048", "fp16")]["score"] >= 50  # SmolLM2 finds a needle at 2K
    assert summary[("humaneval", "hack-channel-b2-p64")]["n_paired"] == 8
