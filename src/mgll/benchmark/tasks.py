"""The benchmark's tasks: the paper's ten downstream rows as data, and task files for the rest.

A task is one dataset level scored by one metric on one split. The registry below records, per
row of the MGLL paper's table (METHOD.md section 6): the layout it reads, the level, the type,
the metric with the authors' exact rule, the official split, the paper's numbers and where to
get the data. Anything else is a task file (YAML, paths relative to the file)::

    name: my-task
    data: my_dataset          # folder or dataset spec, relative to this file
    level: diagnosis          # level name (or index) of the dataset
    metric: auc_macro         # auc_macro | accuracy
    split: {mode: source}     # {train, val, test[, seed]} | {file} | {mode: source}
    paper: null               # or {probe: {MGLL: 99.66}, finetune: {...}} (percent)

The authors' metric rule (HUANGLIZI/MGLL ``engine_finetune.py``, read for this registry): a
two-class task scores ``roc_auc_score(y, p[:, 1])``; more classes one-vs-rest macro; multi-label
the macro over label columns; ``torchmetrics.Accuracy`` for accuracy (micro for one label per
image, macro over labels at threshold 0.5 for multi-label). When a class has no positive test
image, scikit-learn raises and their code reports the AUC as NaN; mgll instead averages over the
classes that have both positives and negatives and names the left-out classes in the results'
notes. For two classes mgll's ``auc_macro`` (the mean of the two one-vs-rest AUCs of softmax
scores) equals their class-1 AUC, since the two columns are complements.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mgll.errors import UserError
from mgll.schema import ConfigError, from_mapping

METRICS = ("auc_macro", "accuracy", "dice")
TYPES = ("binary", "multiclass", "multilabel", "segmentation")
CLASSIFICATION_PROTOCOLS = ("probe", "finetune", "paper-finetune", "zeroshot")
RULES = {
    "binary": "AUC of the class-1 score (authors: roc_auc_score(y, p[:, 1]))",
    "multiclass": "one-vs-rest macro AUC (authors: roc_auc_score(multi_class='ovr'))",
    "multilabel": "macro AUC over label columns (authors: roc_auc_score(average='macro'))",
    "accuracy": "accuracy of the arg-max class (authors: torchmetrics Accuracy, micro)",
    "segmentation": "Dice of the predicted mask (authors' segmentation script)",
}
AUTHORS_CSVS = "the MGLL authors' downstream CSVs (<name>_Train.csv, _Val.csv, _Test.csv)"


class BenchmarkError(UserError, ValueError):
    """A ``mgll benchmark`` option, task or folder that cannot be used (the message names it
    and what to do)."""


class TaskFileError(BenchmarkError):
    """A task name or task file cannot be used (the message names it and what to do)."""


@dataclass(frozen=True)
class BenchmarkTask:
    """One row of the benchmark: which data, which level, scored how, and the paper's numbers.

    ``data`` is a folder or spec file, relative to ``--data-root`` for registry tasks and to the
    task file for task files; ``level`` a level name or index; ``paper`` maps a protocol
    (``probe``, ``finetune``) to ``{method: percent}`` as printed in the paper.
    """

    name: str
    data: str
    level: str | int
    metric: str = "auc_macro"
    split: dict[str, Any] = field(default_factory=lambda: {"mode": "source"})
    source: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    type: str | None = None  # binary | multiclass | multilabel | segmentation; None = from data
    paper: dict[str, dict[str, float]] | None = None
    title: str = ""
    layout: str = ""
    get: str = ""
    rule: str = ""
    note: str = ""
    file: str | None = None  # the task file it came from (None: the registry)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"metric: {self.metric!r} is not one of {list(METRICS)}")
        if self.type is not None and self.type not in TYPES:
            raise ConfigError(f"type: {self.type!r} is not one of {list(TYPES)}")

    def data_path(self, data_root: str | Path | None) -> Path:
        """Where the data should be: relative to the task file, else to ``data_root``."""
        path = Path(self.data).expanduser()
        if path.is_absolute():
            return path
        if self.file is not None:
            return Path(self.file).parent / path
        return Path(data_root or ".") / path

    def paper_value(self, protocol: str, method: str = "MGLL") -> float | None:
        """The paper's number (as a fraction, like mgll's metrics) for ``protocol``."""
        key = "finetune" if protocol == "paper-finetune" else protocol
        value = (self.paper or {}).get(key, {}).get(method)
        return None if value is None else float(value) / 100.0

    def describe(self) -> dict[str, Any]:
        """The task as written into benchmark.json."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, "", {})}


def _paper(lp: Sequence[float | None], ft: Sequence[float | None]) -> dict[str, dict[str, float]]:
    """Paper numbers (percent) of (CLIP, best other baseline, MGLL) for probe and fine-tune."""
    names = ("CLIP", "best other", "MGLL")
    out = {}
    for protocol, values in (("probe", lp), ("finetune", ft)):
        given = {n: float(v) for n, v in zip(names, values, strict=True) if v is not None}
        if given:
            out[protocol] = given
    return out


def _downstream(
    name: str, folder: str, prefix: str, level: int, task_type: str, **kw: Any
) -> BenchmarkTask:
    return BenchmarkTask(
        name=name,
        data=folder,
        source="mgll-downstream",
        options={"name": prefix},
        level=level,
        type=task_type,
        split={"mode": "source"},
        layout=f"{AUTHORS_CSVS}, prefix {prefix!r}, in {folder}/",
        rule=RULES[task_type],
        **kw,
    )


def _idrid(name: str, level: str, **kw: Any) -> BenchmarkTask:
    return BenchmarkTask(
        name=name,
        data="idrid",
        source="idrid",
        level=level,
        type="multiclass",
        split={"mode": "source"},
        layout="the official release's 'B. Disease Grading' layout (mgll's idrid adapter; a "
        "771 x 512 copy ships in ../shared/data/idrid); official split: training set -> train "
        "+ val (10% of its eyes held out, seed 0), testing set -> test, the test photo "
        "IDRiD_064 (a byte copy of training IDRiD_118) dropped",
        get="https://idrid.grand-challenge.org (IEEE DataPort: Indian Diabetic Retinopathy "
        "Image Dataset, CC BY 4.0), part B. Disease Grading",
        rule=RULES["multiclass"],
        **kw,
    )


# The paper's ten rows (METHOD.md section 6; COVIDx and the segmentation Dice from issue 18).
PAPER_TASKS: dict[str, BenchmarkTask] = {
    task.name: task
    for task in (
        BenchmarkTask(
            name="palm",
            title="PALM pathologic myopia",
            data="palm",
            source="palm",
            level="myopia",
            type="binary",
            split={"mode": "source"},
            paper=_paper((93.94, 97.12, 99.66), (99.51, 98.67, 99.72)),
            layout="the shipped copy or the official release (mgll's palm adapter); official "
            "split: Training400 -> train + val (10% held out, seed 0), Validation400 -> test, "
            "the 2 test photos identical to training photos dropped",
            get="https://palm.grand-challenge.org (ISBI 2019); journal release Fang et al., "
            "Scientific Data 2024 (CC BY 4.0); a 224 px copy ships in ../shared/data/palm",
            rule=RULES["binary"],
        ),
        _idrid(
            "idrid-dr",
            "dr_grade",
            title="IDRiD diabetic retinopathy grade",
            paper=_paper((None, None, None), (76.74, 80.72, 82.57)),
            note="the DR grade (0-4, five classes) of IDRiD part B",
        ),
        _idrid(
            "idrid-dme",
            "dme_risk",
            title="IDRiD diabetic macular edema risk",
            paper=_paper((None, None, None), (73.34, 77.95, 86.17)),
            note="the risk of macular edema (0-2, three classes) of IDRiD part B",
        ),
        _downstream(
            "rfmid",
            "RFMiD",
            "RFMiD",
            0,
            "multilabel",
            title="RFMiD retinal diseases (multi-label)",
            paper=_paper((44.66, 63.38, 79.62), (65.10, 86.12, 92.83)),
            get="https://riadd.grand-challenge.org (Retinal Fundus Multi-disease Image Dataset), "
            "then the authors' CSVs",
            note="the 0/1 disease columns form one multi-label level",
        ),
        _downstream(
            "refuge",
            "REFUGE",
            "REFUGE",
            0,
            "binary",
            title="REFUGE glaucoma",
            paper=_paper((65.33, 84.59, 92.42), (86.96, 90.46, 93.90)),
            get="https://refuge.grand-challenge.org, then the authors' CSVs",
        ),
        _downstream(
            "adam",
            "ADAM",
            "ADAM",
            0,
            "binary",
            title="ADAM age-related macular degeneration",
            paper=_paper((52.41, 79.33, 90.02), (86.70, 93.27, 96.30)),
            get="https://amd.grand-challenge.org, then the authors' CSVs",
        ),
        _downstream(
            "rim-one",
            "RIM-ONE",
            "RIM-ONE",
            0,
            "binary",
            title="RIM-ONE DL glaucoma",
            paper=_paper((65.96, 89.79, 94.39), (88.38, 94.93, 97.05)),
            get="https://github.com/miag-ull/rim-one-dl, then the authors' CSVs",
        ),
        _downstream(
            "oia-ddr",
            "OIA-DDR",
            "OIA-DDR",
            0,
            "multiclass",
            title="OIA-DDR diabetic retinopathy grade",
            paper=_paper((None, None, None), (85.29, 85.96, 88.85)),
            get="https://github.com/nkicsl/DDR-dataset, then the authors' CSVs",
        ),
        BenchmarkTask(
            name="covidx",
            title="COVIDx chest X-ray (normal / pneumonia / COVID-19)",
            data="COVIDx",
            source="mgll-downstream",
            options={"name": "COVIDx"},
            level=0,
            type="multiclass",
            metric="accuracy",
            paper={"finetune": {"MGLL": 39.0}},
            layout=f"{AUTHORS_CSVS}, prefix 'COVIDx', in COVIDx/",
            get="https://github.com/lindawangg/COVID-Net (COVIDx), then the authors' CSVs",
            rule=RULES["accuracy"],
            note="the paper's accuracy 39 is quoted from issue 18; its protocol is not stated "
            "in METHOD.md, it is shown beside fine-tuning",
        ),
        BenchmarkTask(
            name="covid-xray-seg",
            title="COVID chest X-ray lung segmentation",
            data="covid-cxr-seg",
            level="mask",
            type="segmentation",
            metric="dice",
            paper={"finetune": {"MGLL": 81.69}},
            layout="masks beside images (mgll segment's adapters)",
            get="../shared/data/covid-cxr-seg (see its README); train with `mgll segment`",
            rule=RULES["segmentation"],
            note="segmentation is `mgll segment`'s protocol; mgll benchmark runs the "
            "classification protocols only",
        ),
    )
}


def load_task_file(path: str | Path) -> BenchmarkTask:
    """The task described by the YAML file ``path`` (TaskFileError naming the file and key)."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TaskFileError(f"{path}: cannot read the task file ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise TaskFileError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, Mapping):
        raise TaskFileError(f"{path}: a task file is a mapping with name, data, level, ...")
    for key in ("name", "data", "level"):
        if raw.get(key) in (None, ""):
            raise TaskFileError(
                f"{path}: the task file has no {key!r}; give name, data (folder or spec, "
                "relative to the file), level and optionally metric, split, paper"
            )
    allowed = {"name", "data", "level", "metric", "split", "paper", "source", "options", "type"}
    data = dict(raw)
    data["data"] = str(data["data"])
    if isinstance(data.get("split"), Mapping) and "file" in data["split"]:
        split_file = Path(str(data["split"]["file"]))
        if not split_file.is_absolute():  # relative to the task file, like data
            data["split"] = {**data["split"], "file": str(path.parent / split_file)}
    data.setdefault("split", {"mode": "source"})
    if data["split"] is None:
        data["split"] = {"mode": "source"}
    try:
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r}; known: {sorted(allowed)}")
        task = from_mapping(BenchmarkTask, data, "")
    except ConfigError as exc:
        raise TaskFileError(f"{path}: {exc}") from None
    return dataclasses.replace(task, file=str(path.resolve()), layout=f"task file {path}")


def resolve_tasks(text: str) -> list[BenchmarkTask]:
    """The tasks named by ``--tasks``: ``paper`` (all ten), registry names and YAML task files,
    comma-separated (TaskFileError naming an unknown one and the known names)."""
    tasks: list[BenchmarkTask] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item == "paper":
            tasks.extend(PAPER_TASKS.values())
        elif item in PAPER_TASKS:
            tasks.append(PAPER_TASKS[item])
        elif item.endswith((".yaml", ".yml")):
            tasks.append(load_task_file(item))
        else:
            raise TaskFileError(
                f"--tasks: unknown task {item!r}; use paper, one of {sorted(PAPER_TASKS)}, "
                "or a task file (.yaml)"
            )
    if not tasks:
        raise TaskFileError("--tasks: no task given; e.g. --tasks palm or --tasks paper")
    names = [t.name for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TaskFileError(f"--tasks: task {twice[0]!r} is named twice")
    return tasks


def missing_reason(task: BenchmarkTask, data_root: str | Path | None) -> str | None:
    """Why ``task`` cannot run here (None when it can): its data is absent, or its protocol is
    not a classification one."""
    path = task.data_path(data_root)
    if not path.exists():
        return f"no data at {path} (expected: {task.layout or 'a dataset folder or spec'})"
    if task.type == "segmentation":
        return f"data present at {path}, but {task.note}"
    return None
