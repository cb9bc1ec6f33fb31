"""The demo report: one self-contained HTML file whose embedded images all decode.

The browser check renders it in headless Chromium (Debian's ``chromium``, which ``.ci/run``
installs) and reads back, from the page itself, how many images failed to load.
"""

from __future__ import annotations

import base64
import io
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from browser import chromium_command, rendered_dom
from mgll.demo.report import EncoderReport, ReportInputs, RetrievalExample, write_report

_DATA_URI = re.compile(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'")


def _inputs() -> ReportInputs:
    rng = np.random.default_rng(0)
    classes = ["Mild", "Moderate", "Severe"]
    n = 30
    truth = rng.integers(0, 3, size=n)
    labels = np.eye(3)[truth]
    encoders = []
    for name, noise in (("random", 3.0), ("clip", 1.0), ("mgll", 0.5)):
        scores = labels + noise * rng.normal(size=labels.shape)
        encoders.append(
            EncoderReport(
                name=name,
                loss_curve=[] if name == "random" else [(s, 5.0 / (s + 1)) for s in range(10)],
                roc_labels=labels,
                roc_scores=scores,
                classes=classes,
                embedding=rng.normal(size=(n, 8)) + truth[:, None],
                embedding_labels=[classes[t] for t in truth],
                retrieval=[
                    RetrievalExample(
                        image=(rng.random((40, 50, 3)) * 255).astype(np.uint8),
                        truth="A fundus photograph with a <severe> cataract.",
                        texts=[("A severe cataract.", 0.8), ("A mild cataract.", 0.3)],
                        correct=[True, False],
                    )
                ],
            )
        )
    table = [
        {
            "encoder": e.name,
            "level": "severity",
            "protocol": "probe",
            "auc_macro": 0.5 + 0.1 * i,
            "auc_macro_ci95": [0.4 + 0.1 * i, 0.6 + 0.1 * i],
            "map": 0.4,
            "accuracy": 0.5,
        }
        for i, e in enumerate(encoders)
    ]
    table += [
        {
            "encoder": e.name,
            "level": "description",
            "label_level": "severity",
            "protocol": "retrieval",
            "i2t_R@5": 0.1 + 0.2 * i,
            "i2t_R@5_ci95": [0.05 + 0.2 * i, 0.15 + 0.2 * i],
            "chance": {"i2t_R@5": 0.134},
            "image_blind": {"i2t_R@5": 0.25},
            "top1_hub": 0.125 * (i + 1),
        }
        for i, e in enumerate(encoders)
    ]
    comparisons = [
        {
            "a": "mgll",
            "b": "random",
            "level": "severity",
            "protocol": "probe",
            "metric": "auc_macro",
            "diff": 0.2,
            "ci95": [0.05, 0.35],
            "p": 0.01,
        }
    ]
    return ReportInputs(
        title="mgll demo",
        dataset="csdi-fundus",
        table=table,
        comparisons=comparisons,
        encoders=encoders,
        notes=["Test split: 10 patients."],
        main_level="severity",
        extra={"seed": 0},
    )


def test_report_is_self_contained_and_every_image_decodes(tmp_path):
    path = write_report(tmp_path / "report.html", _inputs())
    text = path.read_text(encoding="utf-8")
    images = _DATA_URI.findall(text)
    # loss curves, ROC, embedding map, and one retrieval thumbnail per encoder
    assert len(images) == 3 + 3
    for payload in images:
        with Image.open(io.BytesIO(base64.b64decode(payload))) as picture:
            picture.load()
            assert picture.width > 0 and picture.height > 0
    assert not re.search(r"(src|href)=['\"](?!data:)", text)  # nothing refers to another file
    assert "0.700 [0.600, 0.800]" in text  # mgll's AUC with its CI
    # Retrieval rows get their own table (metric x encoder, beside chance), not n/a AUC cells.
    retrieval = text[text.index("Retrieval on held-out patients") :]
    assert "<td>i2t_R@5</td><td>0.134</td><td>0.250</td>" in retrieval
    assert "0.500 [0.450, 0.550]" in retrieval
    assert "<td>top-1 hub</td><td></td><td></td><td>12%</td><td>25%</td><td>38%</td>" in retrieval
    assert text.count("<td>n/a</td>") == 0
    assert "mgll better" in text  # the comparison's CI is above 0
    assert "&lt;severe&gt;" in text  # texts are escaped, not markup
    assert "not for clinical use" in text


def test_headers_colours_loss_and_details_read_as_meant(tmp_path, monkeypatch):
    """ "(95% CI)" only above a metric with intervals; a class has one colour in the ROC curves
    and the embedding map (classes not in alphabetical order, one absent from the test); a
    single logged loss is a sentence, not a one-dot plot; run details in plain words."""
    import dataclasses

    import mgll.demo.report as report

    figures = []
    real_png = report._png

    def spy(fig):
        figures.append(
            [
                {a.get_label(): a.get_color() for a in ax.get_lines() if a.get_label()[0] != "_"}
                | {c.get_label(): c.get_facecolor()[0] for c in ax.collections}
                for ax in fig.axes
            ]
        )
        return real_png(fig)

    monkeypatch.setattr(report, "_png", spy)
    inputs = _inputs()
    classes = ["Severe", "Mild", "Moderate"]  # sorted, Moderate would come second
    labels = np.eye(3)[np.arange(30) % 3]
    labels[:, 0] = 0  # no Severe test image: the ROC draws no Severe curve
    labels[::3, 1] = 1
    encoder = dataclasses.replace(
        inputs.encoders[2],
        loss_curve=[(5, 4.25)],
        classes=classes,
        roc_labels=labels,
        embedding_labels=[classes[k] for k in np.arange(30) % 3],
    )
    extra = {"quick": True, "pretraining seconds": {"clip": 12, "mgll": 13}}
    text = report.render_report(dataclasses.replace(inputs, encoders=[encoder], extra=extra))
    assert "<th>auc_macro (95% CI)</th><th>map</th><th>accuracy</th>" in text
    assert "Training loss</h2>" not in text  # no figure for one logged step
    assert "mgll 4.2500 at step 5" in text
    assert "<td>quick</td><td>yes</td>" in text
    assert "<td>pretraining seconds</td><td>clip 12, mgll 13</td>" in text
    (roc,), (embedding,) = figures
    from matplotlib.colors import to_rgba

    assert "Severe" not in roc and set(roc) >= {"Mild", "Moderate"}
    for name in ("Mild", "Moderate"):
        assert to_rgba(roc[name]) == tuple(embedding[name]), name


def test_report_without_optional_parts_still_renders(tmp_path):
    inputs = ReportInputs(title="t", dataset="d", table=[{"encoder": "random", "auc_macro": None}])
    text = write_report(tmp_path / "r.html", inputs).read_text(encoding="utf-8")
    assert "n/a" in text and "<img" not in text


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    report = write_report(tmp_path / "report.html", _inputs())
    dom = rendered_dom(report, tmp_path)
    assert 'data-images="6"' in dom and 'data-broken="0"' in dom
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            *chromium_command(tmp_path),
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            report.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    with Image.open(shot) as picture:
        pixels = np.asarray(picture.convert("L"))
    assert pixels.std() > 5  # something was drawn, not a blank page
