"""W&B: offline files under the run directory, nothing when disabled, online without a key falls back to
offline, and the W&B run is finished even when the job fails."""
import pytest
from typer.testing import CliRunner

from hack_cli.cli import app
from hack_cli.tracking import Tracker

runner = CliRunner()


def selftest(tmp_path, *overrides):
    return runner.invoke(app, ["selftest", "selftest.steps=2", f"out_dir={tmp_path}", *overrides])


def test_offline_run_is_written_under_the_run_directory(tmp_path):
    result = selftest(tmp_path, "logging.wandb.mode=offline")
    assert result.exit_code == 0, result.output
    [run] = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run.glob("run-*.wandb"))  # the record `wandb sync` uploads


def test_disabled_writes_nothing(tmp_path):
    assert selftest(tmp_path, "logging.wandb.mode=disabled").exit_code == 0
    assert not (tmp_path / "wandb").exists()


def test_online_without_a_key_says_so_and_logs_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no stored login either
    result = selftest(tmp_path / "run", "logging.wandb.mode=online")
    assert result.exit_code == 0, result.output
    notice = [line for line in result.stderr.splitlines() if "W&B online unavailable" in line]
    assert len(notice) == 1 and "wandb sync" in notice[0]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("mode", ["disabled", "offline"])
def test_the_wandb_run_is_finished_when_the_job_fails(tmp_path, monkeypatch, mode):
    finished = []
    finish = Tracker.finish
    monkeypatch.setattr(Tracker, "finish", lambda self, ok: (finished.append(ok), finish(self, ok)))
    result = selftest(tmp_path, f"logging.wandb.mode={mode}", "selftest.numel=100")  # not a multiple of Π
    assert result.exit_code == 2 and "selftest.numel=100" in result.stderr
    assert finished == [False]


def test_online_without_a_server_says_so_and_logs_offline(tmp_path, monkeypatch):
    monkeypatch.setattr("hack_cli.tracking.INIT_TIMEOUT_S", 3)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: connection refused
    result = selftest(tmp_path, "logging.wandb.mode=online")
    assert result.exit_code == 0, result.output
    assert "W&B online unavailable" in result.stderr
    assert list((tmp_path / "wandb").glob("offline-run-*"))
