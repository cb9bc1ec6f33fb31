"""What the demo and the probe do with each level of a dataset mgll never saw: labels are
probed, a free-text level (many repeated descriptions) is retrieved, a level with more classes
than the test images can score is refused in one line; progress says a time left only from
steps already timed."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from mgll.cli import main
from mgll.demo.progress import Progress
from test_demo_seeds import _my_dataset

SPEC = """
table: labels.csv
image: {column: path, root: images}
patient: patient
levels:
  - name: grade
    label: grade
    prompt: "A fundus photograph with a {label} grade."
  - name: description
    text: description
  - name: eye
    label: eye
"""


def free_text_dataset(folder: Path) -> Path:
    """A spec dataset: 60 noise photos of 30 patients, a 3-class grade (brightness), a
    free-text description of 20 distinct sentences each repeated on 3 photos, and a 2-class
    eye label after it (so the free-text level is not the last one)."""

    def columns(i: int) -> dict[str, str]:
        text = f"drusen near the arcade in pattern {i % 20}"
        return {"description": text, "eye": ("left", "right")[i % 2]}

    return _my_dataset(folder, 60, SPEC, columns)


def test_a_free_text_level_is_refused_as_the_main_level_and_by_the_probe(tmp_path, capsys):
    spec = free_text_dataset(tmp_path / "mine")
    out = tmp_path / "demo"
    base = ["demo", "--data-root", str(tmp_path), "--data", str(spec), "--output-dir", str(out)]
    assert main([*base, "--level", "description", "--quick"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("mgll demo: error: --level 'description': 20 ")
    assert "held-out images per fold" in err and "free text" in err
    assert "give a label level to probe (grade, eye)" in err
    assert not out.exists()  # refused before anything is written

    probe = ["probe", "--encoder", "random:mgll-vit-test-32:0", "--data", str(spec)]
    probe += ["--output-dir", str(tmp_path / "p"), "--no-progress", "--num-workers", "0"]
    assert main([*probe, "--level", "description"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(r"level 'description': only \d of its 20 classes", err)
    assert "mgll retrieve --level description" in err
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_the_demo_probes_the_labels_and_retrieves_the_free_text(tmp_path, capsys):
    spec = free_text_dataset(tmp_path / "mine")
    out = tmp_path / "demo"
    argv = ["demo", "--data-root", str(tmp_path), "--data", str(spec), "--output-dir", str(out)]
    assert main([*argv, "--level", "grade", "--quick"]) == 0
    printed = capsys.readouterr().out
    assert (
        "probed (linear probe, zero-shot): grade, eye; retrieved (image -> text): description "
        "(free text)" in printed
    )
    outputs = {p.name for p in (out / "mgll").iterdir() if not p.name.startswith("fold")}
    outputs.discard("report_data.npz")
    assert outputs == {"probe-grade", "zeroshot-grade", "probe-eye", "zeroshot-eye",
                       "retrieval-description"}  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert {(r["level"], r["protocol"]) for r in summary["table"]} == {
        ("grade", "linear_probe"), ("grade", "zeroshot"), ("eye", "linear_probe"),
        ("eye", "zeroshot"), ("description", "retrieval"),
    }  # fmt: skip
    lines = [line for line in printed.splitlines() if line.startswith("[")]
    steps = [line.split(" | ")[0] for line in lines if line.startswith("[evaluate]")]
    assert steps == [
        f"[evaluate] {e}: {what}"
        for e in ("random", "clip", "mgll")
        for what in (
            "features of each fold model, description retrieval",
            "grade linear probe and zero-shot, per fold",
            "eye linear probe and zero-shot, per fold",
        )
    ]
    # No number before anything was timed; a time left once runs and steps were
    assert lines[0].endswith(
        "time left known once the first pretraining run and the first evaluation step end"
    )
    first_eval = next(i for i, line in enumerate(lines) if line.startswith("[evaluate]"))
    assert lines[first_eval].endswith("time left known once the first evaluation step ends")
    assert all(" left" in line and "about" in line for line in lines[first_eval + 1 :])


def test_time_left_is_the_measured_time_of_each_kind_of_step_left():
    lines: list[str] = []
    kinds = ["retrieval", "grade", "retrieval", "grade"]
    progress = Progress(runs=2, evaluations=kinds, echo=lines.append, start=time.perf_counter())
    assert progress.left_s() is None
    progress.done("run", 10.0)
    assert progress.left_s() is None  # no evaluation step timed yet
    progress.say("pretrain", "fold 2")
    assert lines[-1].endswith("time left known once the first evaluation step ends")
    progress.done("eval", 4.0, "retrieval")
    # 1 run at 10 s; grade never timed: every timed step's mean (4 s); retrieval 4 s
    assert progress.left_s() == pytest.approx(10 + 4 + 4 + 4)
    progress.done("run", 20.0)
    progress.done("eval", 30.0, "grade")
    assert progress.left_s() == pytest.approx(4 + 30)  # one retrieval and one grade left
    progress.done("eval", None, "retrieval")  # read back from a finished folder: not timed
    assert progress.left_s() == pytest.approx(30)
    progress.say("evaluate", "mgll grade")
    assert lines[-1].endswith("about 30s left")
