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


# ---- user errors: caught once in main, one line; bugs keep their traceback --------------------

PROBE = ["probe", "--encoder", "random:x", "--data", "d", "--level", "l", "--output-dir", "o"]


def test_a_user_error_from_any_command_is_one_line_and_its_exit_code(monkeypatch, capsys):
    import mgll.eval.encoders
    from mgll.errors import UsageError
    from mgll.eval.task import TaskError

    def refuse(*args, **kwargs):
        raise TaskError("data.csv row 3: class 'x' unknown")

    monkeypatch.setattr(mgll.eval.encoders, "load_encoder", refuse)
    assert main(PROBE) == 1
    assert capsys.readouterr().err == "mgll probe: error: data.csv row 3: class 'x' unknown\n"

    def usage(*args, **kwargs):
        raise UsageError("--output-dir is required here")

    monkeypatch.setattr(mgll.eval.encoders, "load_encoder", usage)
    assert main(PROBE) == 2  # as argparse's usage errors
    assert capsys.readouterr().err == "mgll probe: error: --output-dir is required here\n"


def test_a_bug_in_a_command_keeps_its_traceback(monkeypatch):
    """Evaluation no longer turns every ValueError into a one-liner: a ValueError that is not a
    user error (a bug here) reaches the caller, so its traceback is printed."""
    import mgll.eval.encoders

    def bug(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(mgll.eval.encoders, "load_encoder", bug)
    with pytest.raises(ValueError, match="broadcast"):
        main(PROBE)


def test_every_error_class_of_the_package_is_a_user_error():
    """The classes that name a user's file, row or option derive from UserError, so main
    catches them; none needs a handler of its own."""
    from mgll.data.images import ImageLoadError
    from mgll.data.spec import SpecError
    from mgll.data.tables import TableError
    from mgll.demo.run import DemoError
    from mgll.errors import DataError, ModelFileError, OptionError, UserError
    from mgll.eval.compare import CompareError
    from mgll.eval.encoders import EncoderError
    from mgll.eval.results import ResultsError
    from mgll.eval.task import TaskError
    from mgll.explain import ExplainError
    from mgll.models.authors import AuthorsCheckpointError
    from mgll.models.hf_export import HFExportError
    from mgll.models.weights import PretrainedWeightsError
    from mgll.schema import ConfigError
    from mgll.segmentation.data import SegDataError
    from mgll.segmentation.decoders import DecoderError
    from mgll.training.checkpoint import CheckpointError
    from mgll.training.run_control import RunInterrupted, RunLockedError
    from mgll.training.step import NonFiniteLossError

    classes = [
        ImageLoadError, SpecError, TableError, DemoError, DataError, ModelFileError, CompareError,
        TaskError, EncoderError, ResultsError, ExplainError, HFExportError,
        PretrainedWeightsError, ConfigError, SegDataError, DecoderError, CheckpointError,
        RunInterrupted, RunLockedError, NonFiniteLossError, AuthorsCheckpointError, OptionError,
    ]  # fmt: skip
    assert [c.__name__ for c in classes if not issubclass(c, UserError)] == []
    assert RunInterrupted("SIGTERM", 3, None).exit_code == 128 + 15


def test_demo_with_a_negative_seed_is_a_one_line_error(tmp_path, capsys):
    argv = ["demo", "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "o")]
    assert main([*argv, "--seed", "-1"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("mgll demo: error: --seed -1 --seeds 3: the seed must be >= 0")
        and err.count("\n") == 1
    )


# ---- every command's bad input: one line naming what is wrong, exit 1 ----------------------

RANDOM = "random:mgll-vit-test-32"
EVAL_DATA = ["--level", "x", "--output-dir", "{tmp}/o"]
BAD_INPUT = [
    # (argv, what the one line must say); {tmp} is a fresh folder holding nothing
    (["demo", "--data-root", "{tmp}", "--output-dir", "{tmp}/o"], "csdi-fundus does not exist"),
    (["demo", "--data-root", "{tmp}", "--output-dir", "{tmp}/o", "--seeds", "0"], "--seeds 0"),
    (["ablate", "--data-root", "{tmp}", "--output-dir", "{tmp}/o"], "csdi-fundus does not exist"),
    (["ablate", "--data-root", "{tmp}", "--output-dir", "{tmp}/o", "--seeds", "0"], "--seeds 0"),
    (["benchmark", "--encoder", "{tmp}/none", "--tasks", "palm", "--output-dir", "{tmp}/o"],
     "no such file or folder"),
    (["benchmark", "--encoder", RANDOM, "--tasks", "plam", "--output-dir", "{tmp}/o"],
     "unknown task 'plam'"),
    (["benchmark", "--encoder", RANDOM, "--tasks", "palm", "--label-fraction", "2",
      "--output-dir", "{tmp}/o"], "--label-fraction"),
    (["segment", "--encoder", RANDOM, "--data", "{tmp}/none", "--output-dir", "{tmp}/o"],
     "--data: "),
    (["segment", "--encoder", RANDOM, "--data", "{tmp}/none", "--output-dir", "{tmp}/o",
      "epochz=1"], "unknown config key 'epochz' (did you mean 'epochs'?)"),
    (["segment", "--encoder", RANDOM, "--data", "{tmp}/none", "--output-dir", "{tmp}/o",
      "--epochs", "-1"], "epochs must be >= 1"),
    (["explain", "--model", "{tmp}/none", "--text", "a", "--output-dir", "{tmp}/o", "{tmp}/x.png"],
     "does not exist"),
    (["probe", "--encoder", "{tmp}/none", "--data", "{tmp}/none", *EVAL_DATA],
     "no such file or folder"),
    (["probe", "--encoder", RANDOM, "--data", "{tmp}/none", *EVAL_DATA], "no such dataset folder"),
    (["probe", "--encoder", RANDOM, "--data", "{tmp}/none", "--batch-size", "-3", *EVAL_DATA],
     "--batch-size: -3 must be at least 1"),
    (["finetune", "--encoder", RANDOM, "--data", "{tmp}/none", "lr_decay=1", *EVAL_DATA],
     "unknown config key 'lr_decay' (did you mean 'layer_decay'?)"),
    (["finetune", "--encoder", RANDOM, "--data", "{tmp}/none", "--epochs", "-1", *EVAL_DATA],
     "epochs must be >= 1"),
    (["probe", "--encoder", RANDOM, "--data", "{tmp}/none", "--split-fractions", "0.5,0.5",
      *EVAL_DATA], "--split-fractions 0.5,0.5: applies to a patient split"),
    (["zeroshot", "--model", "{tmp}/none", "--data", "{tmp}/none", *EVAL_DATA],
     "/none does not exist"),
    (["retrieve", "--model", "{tmp}/none", "--data", "{tmp}/none", *EVAL_DATA],
     "/none does not exist"),
    (["retrieve", "--model", RANDOM, "--data", "{tmp}/none", "--bootstrap", "0", *EVAL_DATA],
     "--bootstrap: 0 must be at least 1"),
    (["compare", "{tmp}/a", "{tmp}/b"], "results.json: missing"),
    (["export", "{tmp}/none", "--output", "{tmp}/x.safetensors"], "does not exist"),
    (["data", "check", "{tmp}/none"], "no such file or folder"),
    (["data", "split", "{tmp}/none", "--output", "{tmp}/s.csv"], "no such file or folder"),
    (["data", "shard", "{tmp}/none", "--output-dir", "{tmp}/o"], "no such dataset folder"),
    (["cache", "clear", "nope", "--cache-dir", "{tmp}/c", "--yes"], "nothing cached for nope"),
    (["pretrain", "{tmp}/none.yaml", "--output-dir", "{tmp}/o"], "none.yaml"),
    (["pretrain", "cpu-demo", "--output-dir", "{tmp}/o", "train.epochz=1"], "train.epochz"),
    (["pretrain", "cpu-demo", "--output-dir", "{tmp}/o", "train.epochs=-1"], "train.epochs"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "says"), BAD_INPUT, ids=[" ".join(a[:2]) + f" ({s})" for a, s in BAD_INPUT]
)
def test_every_command_answers_bad_input_with_one_line(argv, says, tmp_path, capsys):
    """A missing file, a bad option value or a bad config key: `mgll <command>: error: ...` on
    one line naming the culprit, exit 1, and nothing written."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"mgll {argv[0]}") and ": error: " in lines[0], err
    assert says in lines[0]
    assert not (tmp_path / "o").exists()
