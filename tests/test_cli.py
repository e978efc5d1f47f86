"""The CLI: every subcommand listed, and bad input costs one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedlesion.cli import build_parser, main

EXPECTED_COMMANDS = {
    "settings", "receive", "study", "inspect", "convert", "evaluate", "synth", "model", "fingerprint", "train", "export",
    "node", "send-sample", "reprocess", "user", "segment", "site",
}


def test_help_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in EXPECTED_COMMANDS:
        assert f"\n    {name} " in out, f"{name} missing from --help"


def test_every_registered_command_has_help() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert EXPECTED_COMMANDS <= set(subparsers.choices)
    for action in subparsers._choices_actions:
        assert action.help, f"{action.dest} has no help text"


def test_bad_argument_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--no-such-flag"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized arguments" in err


def test_unreadable_settings_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "absent.toml"), "settings"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "absent.toml" in err and "Traceback" not in err


def test_bad_override_names_the_key(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FEDLESION_NODE__DICOM_PORT", "-1")
    assert main(["settings"]) == 2
    assert "node.dicom_port" in capsys.readouterr().err


def test_console_script_runs_without_a_traceback(tmp_path: Path) -> None:
    """The installed entry point, as a user runs it: one line on stderr for a missing file."""
    result = subprocess.run(
        [sys.executable, "-m", "fedlesion", "--config", str(tmp_path / "nope.toml"), "settings"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
