"""The `mgll` command: version, help, and `python -m mgll` behaving the same."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mgll
from mgll.cli import COMMAND_MODULES, main, parse_args


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"mgll {mgll.__version__}"


def test_no_command_prints_help_and_exits_two(capsys):
    assert main([]) == 2  # like `mgll data` alone: a usage error, with the help
    out = capsys.readouterr().out
    assert out.startswith("usage: mgll")
    for name in COMMAND_MODULES:
        assert name in out


def test_python_dash_m_matches_the_console_script():
    result = subprocess.run(
        [sys.executable, "-m", "mgll", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == f"mgll {mgll.__version__}"


def test_console_script_without_a_command_exits_two():
    result = subprocess.run(
        [sys.executable, "-m", "mgll"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2 and result.stdout.startswith("usage: mgll")


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("command", list(COMMAND_MODULES))
def test_each_command_has_its_own_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: mgll {command}")


def test_version_does_not_import_torch():
    code = (
        "import sys\nfrom mgll.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().endswith("False")


def test_overrides_may_stand_anywhere_and_keep_their_order():
    argv = ["pretrain", "cpu-demo", "train.lr=1", "--output-dir", "o", "train.lr=2"]
    args = parse_args([*argv, "--seed", "3", "log.every_steps=5"])
    assert args.config == "cpu-demo" and args.output_dir == "o" and args.seed == 3
    assert args.overrides == ["train.lr=1", "train.lr=2", "log.every_steps=5"]


@pytest.mark.parametrize(
    "argv",
    [
        ["pretrain", "cpu-demo", "--output-dir", "o", "--no-such-flag"],
        ["pretrain", "cpu-demo", "--output-dir", "o", "not-an-override"],
        ["export", "run", "--output", "x", "a=1"],  # export takes no overrides
    ],
)
def test_stray_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
