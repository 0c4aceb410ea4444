"""The `hack` command line: help, --cfg, and one-line errors (exit 2) for every kind of bad config."""
import pytest
from typer.testing import CliRunner

from hack_cli import launch
from hack_cli.cli import app

runner = CliRunner()


def hack(*args: str):
    return runner.invoke(app, list(args))


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_help_lists_the_commands():
    result = hack("--help")
    assert result.exit_code == 0
    for name in ("eval", "bench", "calibrate", "report"):
        assert name in result.stdout
    assert "selftest" not in result.stdout  # hidden: it exists for the tests
    for group, names in (("eval", ("ppl", "accuracy")), ("bench", ("jct", "kernels", "profile")),
                         ("calibrate", ("kvquant",))):
        sub = hack(group, "--help")
        assert sub.exit_code == 0 and all(n in sub.stdout for n in names)


@pytest.mark.parametrize("command", sorted(launch.COMMANDS))
def test_every_command_has_help_with_examples(command):
    result = hack(*command.split("_"), "--help")
    assert result.exit_code == 0
    assert "Examples" in result.stdout and "--multirun" in result.stdout


def test_cfg_job_prints_the_composed_config():
    result = hack("eval", "accuracy", "quant.partition=32", "--cfg", "job")
    assert result.exit_code == 0, result.output
    assert "command: eval_accuracy" in result.stdout
    assert "partition: 32" in result.stdout and "model:" in result.stdout


def test_cfg_with_multirun_checks_every_job_and_prints_the_first():
    result = hack("eval", "ppl", "-m", "quant.bits=8,4", "--cfg", "job", "--package", "quant")
    assert result.exit_code == 0, result.output
    assert "bits: 8" in result.stdout
    one_line_error(hack("eval", "ppl", "-m", "quant.bits=8,3", "--cfg", "job"))


@pytest.mark.parametrize("args, expected", [
    (("eval", "accuracy", "quant=hack", "quant.bits=3"), "quant.bits=3 is not allowed: expected one of 2, 4, 8"),
    (("eval", "ppl", "quant.partition=40"), "quant.partition=40"),
    (("eval", "ppl", "quant.partition=0"), "positive multiple of 16"),
    (("bench", "jct", "cluster.bandwidth_gbps=0"), "cluster.bandwidth_gbps=0.0 is not allowed"),
    (("bench", "jct", "cluster.bandwidth_gbps=-10"), "expected a positive number"),
    (("bench", "jct", "trace.rate=0"), "trace.rate=0.0 is not allowed"),
    (("eval", "ppl", "model.path=/no/such/model"), "model.path='/no/such/model' is not allowed: no such file"),
    (("eval", "ppl", "dataset.path=/no/such/file.jsonl"), "no such file or directory"),
    (("eval", "ppl", "quant=nope"), "quant=nope is not allowed: expected one of"),
    (("eval", "ppl", "model=nope"), "smollm2"),  # the allowed options are listed
    (("eval", "ppl", "quant.nope=1"), "quant.nope is not a config key: expected one of name, bits"),
    (("eval", "ppl", "+model.nope=1"), "model.nope"),
    (("eval", "ppl", "quant.bits=two"), "quant.bits='two' is not allowed"),
    (("eval", "ppl", "logging.wandb.mode=loud"), "expected one of offline, online, disabled"),
    (("eval", "ppl", "resume=maybe"), "resume='maybe'"),
    (("eval", "ppl", "quant.bits=2,4"), "add -m"),
    (("eval", "ppl", "-m", "quant.bits=2,3"), "quant.bits=3"),  # the second job of a sweep, before any runs
    (("eval", "ppl", "quant.bits=["), "quant.bits=["),
    (("eval", "ppl", "hydra/launcher=nope"), "hydra/launcher=nope is not allowed: expected one of basic, joblib"),
    (("eval", "ppl", "experiment=nope"), "experiment=nope"),
])
def test_bad_config_fails_in_one_line(args, expected):
    assert expected in one_line_error(hack(*args))


def test_a_command_without_its_run_module_says_so(monkeypatch):
    monkeypatch.setitem(launch.COMMANDS, "report", ("hack_cli.not_written_yet:run", "report"))
    assert hack("report", "--cfg", "job").exit_code == 0  # config and --cfg work before the command exists
    assert one_line_error(hack("report")) == "error: hack report: not implemented yet"


def test_resume_needs_the_run_directory():
    assert "holds no run to continue" in one_line_error(hack("selftest", "resume=true"))
