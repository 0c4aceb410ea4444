"""The results store, and real runs of `hack selftest` through Hydra: run dirs, a multirun with sweep.csv
(basic and joblib launchers), and resume after an interrupted and a killed job."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from hack_cli.cli import app
from hack_cli.errors import HackError
from hack_cli.store import RowLog, claim, read_metrics, write_metrics

runner = CliRunner()


# ---------------------------------------------------------------------------------------------- store units
def test_row_log_reads_back_its_rows_and_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    log = RowLog(path)
    for i in range(3):
        log.write({"key": f"s{i}", "score": i / 2})
    log.close()
    with open(path, "a") as f:
        f.write('{"key": "s3", "sco')  # a crash in the middle of a write
    again = RowLog(path)
    assert again.done == {"s0", "s1", "s2"} and again.rows[2]["score"] == 1.0
    again.write({"key": "s3", "score": 1.5})
    again.close()
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["s0", "s1", "s2", "s3"]


def test_row_log_refuses_rows_without_a_new_key(tmp_path):
    log = RowLog(tmp_path / "rows.jsonl")
    log.write({"key": 1})
    with pytest.raises(ValueError, match="already written"):
        log.write({"key": 1})
    with pytest.raises(ValueError, match="needs a `key`"):
        log.write({"value": 2})


def test_claim_never_overwrites_and_resumes_only_the_same_run(tmp_path):
    config = {"quant": {"bits": 2}, "resume": False, "logging": {"progress": True}}
    claim(tmp_path, config, resume=False)
    with pytest.raises(HackError, match="resume=true"):
        claim(tmp_path, config, resume=False)
    claim(tmp_path, {**config, "resume": True, "logging": {"progress": False}}, resume=True)
    with pytest.raises(HackError, match="quant.bits differs"):
        claim(tmp_path, {**config, "quant": {"bits": 4}}, resume=True)
    # a moved or shard-copied run directory resumes: out_dir, the shard and the tokenizer guard may change
    claim(tmp_path, {**config, "out_dir": "/elsewhere", "accuracy": {"shard": [1, 4]},
                     "model": {"tokenizer_check": [1, 2]}}, resume=True)
    with pytest.raises(HackError, match="accuracy.batch_size differs"):
        claim(tmp_path, {**config, "accuracy": {"shard": [1, 4], "batch_size": 8}}, resume=True)


def test_metrics_are_flat(tmp_path):
    write_metrics(tmp_path, {"ppl": 19.4, "method": "hack", "tokens": 4096})
    assert read_metrics(tmp_path)["tokens"] == 4096
    with pytest.raises(TypeError, match="flat"):
        write_metrics(tmp_path, {"per_layer": [1, 2]})


# ---------------------------------------------------------------------------------------------- real runs
def hack(*args):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_single_run_writes_its_run_directory(tmp_path):
    hack("selftest", "selftest.steps=3", f"out_dir={tmp_path}")
    assert (tmp_path / "config.yaml").read_text().startswith("out_dir: " + str(tmp_path))
    assert [r["key"] for r in rows(tmp_path / "steps.jsonl")] == [0, 1, 2]
    metrics = read_metrics(tmp_path)
    assert metrics["steps"] == 3 and metrics["within_bound"] and metrics["sums_ok"]


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_multirun_writes_a_run_per_job_and_sweep_csv(tmp_path, launcher):
    extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    result = hack("selftest", "-m", "quant.bits=2,4", "selftest.steps=2", f"out_dir={tmp_path}", *extra)
    assert "sweep.csv" in result.stdout
    for job in ("0", "1"):
        assert {"config.yaml", "metrics.json", "steps.jsonl"} <= {p.name for p in (tmp_path / job).iterdir()}
    with open(tmp_path / "sweep.csv") as f:
        sweep = list(csv.DictReader(f))
    assert [(r["job"], r["quant.bits"], r["status"]) for r in sweep] == [("0", "2", "done"), ("1", "4", "done")]
    # 4-bit codes take twice the bytes of 2-bit ones (plus the same metadata), and err less.
    assert float(sweep[1]["bytes_vs_fp16"]) > float(sweep[0]["bytes_vs_fp16"])
    assert float(sweep[1]["rmse"]) < float(sweep[0]["rmse"])


def test_an_existing_run_directory_needs_resume(tmp_path):
    hack("selftest", "selftest.steps=1", f"out_dir={tmp_path}")
    result = runner.invoke(app, ["selftest", "selftest.steps=1", f"out_dir={tmp_path}"])
    assert result.exit_code == 2 and "resume=true" in result.stderr


STEPS = 12


def _start(out_dir, *extra):
    """`hack selftest` in its own process, slow enough per step (~0.1 s) to be stopped in the middle. Ctrl-C is
    restored to its default in the child: a test run started in the background (`nohup ... &`) ignores SIGINT, the
    child would inherit that, and Python installs its KeyboardInterrupt handler only where SIGINT is not ignored."""
    cmd = [sys.executable, "-m", "hack_cli", "selftest", f"selftest.steps={STEPS}", "selftest.numel=262144",
           f"out_dir={out_dir}", "logging.progress=false", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_rows(proc, path, count):
    deadline = time.time() + 120
    while not (path.exists() and len(path.read_text().splitlines()) >= count):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)


def test_resume_after_an_interrupted_and_a_killed_job(tmp_path):
    steps = tmp_path / "steps.jsonl"
    proc = _start(tmp_path)
    _wait_for_rows(proc, steps, 3)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and f"out_dir={tmp_path} resume=true" in err
    first = steps.read_text()
    assert not (tmp_path / "metrics.json").exists()

    proc = _start(tmp_path, "resume=true")
    _wait_for_rows(proc, steps, len(first.splitlines()) + 2)
    os.kill(proc.pid, signal.SIGKILL)  # a crash: no handler runs
    proc.communicate(timeout=60)
    assert steps.read_text().startswith(first)  # rows already written are kept as they were

    proc = _start(tmp_path, "resume=true")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    keys = [r["key"] for r in rows(steps)]
    assert keys == list(range(STEPS))  # every step once: nothing redone, nothing lost
    assert read_metrics(tmp_path)["steps"] == STEPS
