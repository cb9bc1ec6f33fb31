"""``mgll benchmark``: every encoder over every task and protocol, seeds pooled, one table.

Order of events: read the tasks (the registry's, task files) and list those whose data is not
under ``--data-root`` as missing; check every encoder loads; plan one unit per (task, encoder,
protocol, label fraction, seed); run each unit into its own ``mgll.eval`` folder
``O/<task>/<encoder>/<protocol>/[fraction-<f>/]seed-<s>`` (a finished folder is kept, so a rerun
resumes); then pool the seeds (:mod:`mgll.benchmark.summary`) into ``benchmark.json``,
``table.md``, ``table.csv`` and ``report.html``.

Seeds: ``--seeds`` (default 3) runs at full labels, ``--draws`` (default 10) label-fraction
draws below 1, seeds ``--seed``, ``--seed + 1``, ... A seed changes the label-fraction draw,
the fine-tuning initialisation and order, and the encoder itself when its spec holds
``{seed}`` (``--encoder mgll=runs/palm-mgll-s{seed}``: one pretraining seed per seed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mgll.benchmark.tasks import BenchmarkError

SETTINGS_FILE = "benchmark-settings.json"
DEFAULT_SEEDS = 3
DEFAULT_DRAWS = 10


def parse_encoders(values: Sequence[str]) -> dict[str, str]:
    """``--encoder [NAME=]SPEC`` values as {name: spec}; the name defaults to the spec's last
    path part or prefix (``random``, ``open_clip``)."""
    encoders: dict[str, str] = {}
    for value in values:
        name, sep, spec = value.partition("=")
        if not sep or "/" in name or ":" in name:
            spec = value
            name = Path(value.split(":")[0] if ":" in value else value).name or value
            name = name.replace("{seed}", "").strip("-_") or name
        if not name or not spec:
            raise BenchmarkError(f"--encoder: {value!r} is not [NAME=]SPEC")
        if name in encoders:
            raise BenchmarkError(
                f"--encoder: two encoders are called {name!r}; name them (--encoder NAME=SPEC)"
            )
        encoders[name] = spec
    if not encoders:
        raise BenchmarkError("--encoder: give at least one encoder")
    return encoders


def encoder_for_seed(spec: str, seed: int) -> str:
    """The spec of one seed: ``{seed}`` replaced by the seed."""
    return spec.replace("{seed}", str(seed))


def parse_protocols(text: str) -> list[str]:
    """``--protocol probe,finetune[,zeroshot|paper-finetune]`` (one-line error when unknown)."""
    from mgll.benchmark.tasks import CLASSIFICATION_PROTOCOLS

    protocols = [p.strip() for p in text.split(",") if p.strip()]
    for p in protocols:
        if p not in CLASSIFICATION_PROTOCOLS:
            raise BenchmarkError(
                f"--protocol: unknown protocol {p!r}; use {', '.join(CLASSIFICATION_PROTOCOLS)}"
            )
    if not protocols:
        raise BenchmarkError("--protocol: give at least one protocol, e.g. probe,finetune")
    return protocols


def parse_fractions(text: str) -> list[float]:
    """``--label-fraction 0.01,0.1,1``: each in (0, 1]."""
    try:
        fractions = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchmarkError(f"--label-fraction: {text!r} is not F[,F...]") from None
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad or not fractions:
        raise BenchmarkError(f"--label-fraction: {bad or text} not in (0, 1]")
    return fractions


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """One line per unit: what runs, elapsed, and time left from the measured mean per protocol
    (before a protocol's first unit ends, the mean of all units measured, else unknown)."""

    def __init__(self, plan: Sequence[dict[str, Any]], echo: Callable[[str], None]) -> None:
        self.left = {p: sum(1 for u in plan if u["protocol"] == p) for p in _protocols(plan)}
        self.times: dict[str, list[float]] = {}
        self.total, self.done = len(plan), 0
        self.start = time.perf_counter()
        self.echo = echo

    def left_s(self) -> float | None:
        every = [t for ts in self.times.values() for t in ts]
        if not every:
            return None
        overall = sum(every) / len(every)
        return sum(
            n * (sum(self.times[p]) / len(self.times[p]) if self.times.get(p) else overall)
            for p, n in self.left.items()
        )

    def say(self, unit: dict[str, Any]) -> None:
        left = self.left_s()
        estimate = "time left unknown yet" if left is None else f"about {_duration(left)} left"
        self.echo(
            f"[{self.done + 1}/{self.total}] {unit['task']} {unit['encoder']} {unit['protocol']}"
            f" labels {unit['label_fraction']:g} seed {unit['seed']} | elapsed "
            f"{_duration(time.perf_counter() - self.start)}, {estimate}"
        )

    def finished(self, unit: dict[str, Any], seconds: float | None) -> None:
        self.done += 1
        self.left[unit["protocol"]] -= 1
        if seconds is not None:
            self.times.setdefault(unit["protocol"], []).append(seconds)


def _protocols(plan: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(u["protocol"] for u in plan))


def unit_folder(unit: dict[str, Any]) -> str:
    """The unit's folder relative to the output folder."""
    parts = [unit["task"], unit["encoder"], unit["protocol"]]
    if unit["label_fraction"] < 1:
        parts.append(f"fraction-{unit['label_fraction']:g}")
    parts.append(f"seed-{unit['seed']}")
    return "/".join(parts)


def same_every_seed(protocol: str, fraction: float, spec: str) -> bool:
    """Whether a unit repeats the same work every seed: zero-shot, or a linear probe at full
    labels (no draw; the fit is deterministic), of an encoder that does not change with the seed
    (no ``{seed}`` in its spec)."""
    at_full = protocol == "zeroshot" or (protocol == "probe" and fraction >= 1)
    return at_full and "{seed}" not in spec


def runs_once_notes(encoders: dict[str, str], protocols: Sequence[str], seeds: int) -> list[str]:
    """What ``--seeds N`` (N > 1) does not repeat, one line per encoder and protocol."""
    if seeds < 2:
        return []
    return [
        f"{protocol} of {name} at full labels runs once, not {seeds} times: {name} does not "
        "change with the seed ({seed} not in its spec), so each seed would give the same "
        "result (n = 1)"
        for name, spec in encoders.items()
        for protocol in protocols
        if same_every_seed(protocol, 1.0, spec)
    ]


def plan_units(
    tasks: Sequence[Any],
    encoders: dict[str, str],
    protocols: Sequence[str],
    fractions: Sequence[float],
    *,
    seeds: int,
    draws: int,
    first_seed: int,
) -> list[dict[str, Any]]:
    """Every unit to run: zero-shot at full labels only (it trains nothing); a unit that gives
    the same result every seed (:func:`same_every_seed`) once, marked ``fixed``; the others
    per seed (full labels) or label-fraction draw."""
    plan = []
    for task in tasks:
        for protocol in protocols:
            for name in encoders:
                for fraction in [1.0] if protocol == "zeroshot" else fractions:
                    fixed = same_every_seed(protocol, fraction, encoders[name])
                    count = 1 if fixed else seeds if fraction >= 1 else draws
                    for seed in range(first_seed, first_seed + count):
                        unit = {
                            "task": task.name,
                            "encoder": name,
                            "protocol": protocol,
                            "label_fraction": float(fraction),
                            "seed": seed,
                            "fixed": fixed,
                        }
                        unit["folder"] = unit_folder(unit)
                        plan.append(unit)
    return plan


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """A rerun into ``out`` must use the same encoders (a finished folder is reused as is)."""
    from mgll.benchmark.summary import write_text

    path = out / SETTINGS_FILE
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        for name, spec in settings["encoders"].items():
            if before.get("encoders", {}).get(name, spec) != spec:
                raise BenchmarkError(
                    f"--output-dir {out}: encoder {name!r} was {before['encoders'][name]!r} "
                    f"there, now {spec!r}; use another --output-dir or the same encoder"
                )
        settings = {
            **before,
            **settings,
            "encoders": {**before["encoders"], **settings["encoders"]},
        }
    out.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(settings, indent=2) + "\n")


def run_benchmark(
    encoder_args: Sequence[str],
    tasks_text: str,
    protocols_text: str,
    output_dir: str | Path,
    *,
    data_root: str | Path | None = None,
    seeds: int = DEFAULT_SEEDS,
    draws: int = DEFAULT_DRAWS,
    label_fractions: str = "1",
    first_seed: int = 0,
    epochs: int | None = None,
    n_resamples: int = 1000,
    cache_dir: str | Path | bool | None = None,
    device: str = "cpu",
    progress: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); returns benchmark.json's dict."""
    from mgll.benchmark import protocols as eval_calls
    from mgll.benchmark.summary import INTERVAL, build_comparisons, build_rows
    from mgll.benchmark.tasks import resolve_tasks

    if seeds < 1 or draws < 1:
        raise BenchmarkError("--seeds and --draws must be at least 1")
    encoders = parse_encoders(encoder_args)
    protocols = parse_protocols(protocols_text)
    fractions = parse_fractions(label_fractions)
    tasks = resolve_tasks(tasks_text)
    out = Path(output_dir)
    kinds = {  # an unknown encoder fails now, not after hours
        name: eval_calls.load_encoder(encoder_for_seed(spec, first_seed)).kind
        for name, spec in encoders.items()
    }
    ready, data, missing = _load_tasks(tasks, data_root, echo)
    if not ready:  # nothing to measure: a failure, before the folder is touched
        names = ", ".join(t.name for t in tasks)
        raise BenchmarkError(
            f"no task has its data under --data-root {data_root} ({names}; the lines above say "
            "where each one is looked for): give the folder holding them"
        )
    check_settings(out, {"encoders": encoders, "tasks": [t.name for t in tasks]})
    plan = plan_units(
        ready, encoders, protocols, fractions, seeds=seeds, draws=draws, first_seed=first_seed
    )
    protocol_options = {
        "epochs": epochs,
        "n_resamples": n_resamples,
        "cache_dir": cache_dir,
        "device": device,
        "progress": progress,
    }
    notes = runs_once_notes(encoders, protocols, seeds)
    for line in notes:
        echo(f"note: {line}")
    runs = {name: (spec, kinds[name]) for name, spec in encoders.items()}
    predictions = _run_plan(plan, runs, data, out, protocol_options, echo)
    by_name = {t.name: t for t in ready}
    rows, aligned = build_rows(plan, predictions, by_name, n_resamples=n_resamples)
    comparisons = build_comparisons(rows, aligned, list(encoders), by_name, n_resamples=n_resamples)
    summary = {
        "encoders": encoders,
        "protocols": protocols,
        "label_fractions": fractions,
        "seeds": {"full_labels": seeds, "label_fraction_draws": draws, "first": first_seed},
        "interval": INTERVAL,
        "settings": {  # written with default=str: paths as text
            **{"data_root": data_root, "first_seed": first_seed, "epochs": epochs},
            **{"bootstrap": n_resamples, "device": device, "cache_dir": cache_dir},
        },
        "notes": notes,
        "tasks": {t.name: t.describe() for t in tasks},
        "rows": rows,
        "comparisons": comparisons,
        "missing": missing,
        "units": plan,
    }
    if "paper-finetune" in protocols:
        summary["paper_finetune"] = {"recipe": eval_calls.PAPER_FINETUNE}
    _write_outputs(out, summary, echo)
    return summary


def _run_plan(
    plan: Sequence[dict[str, Any]],
    encoders: dict[str, tuple[str, str]],
    data: dict[str, Any],
    out: Path,
    options: dict[str, Any],
    echo: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """Run (or read back) every unit of ``plan``, marking each done or skipped with the
    reason; returns the predictions of the done ones by folder. ``encoders``: name -> (spec,
    kind)."""
    from mgll.training.run_control import StoppedBySignal, StopRequests

    progress_line = Progress(plan, echo)
    predictions: dict[str, dict[str, Any]] = {}
    with StopRequests(finishing="finishing this unit, then stopping") as stop:
        for done, unit in enumerate(plan):
            if stop.requested:  # SIGINT or SIGTERM: stop at a unit boundary, as pretraining
                raise StoppedBySignal(
                    stop.received,
                    f"stopped by {stop.received} after {done} of {len(plan)} units (each "
                    f"finished one is kept in {out}); run the same command again to continue",
                )
            _run_one(unit, encoders, data, out, options, progress_line, predictions, echo)
    return predictions


def _run_one(
    unit: dict[str, Any],
    encoders: dict[str, tuple[str, str]],
    data: dict[str, Any],
    out: Path,
    options: dict[str, Any],
    progress_line: Progress,
    predictions: dict[str, dict[str, Any]],
    echo: Callable[[str], None],
) -> None:
    """Run (or read back) one unit, marking it done or skipped; a done one's predictions go
    into ``predictions``."""
    spec, kind = encoders[unit["encoder"]]
    finished, seconds, reason = _run_unit(
        unit,
        encoder_for_seed(spec, unit["seed"]),
        kind,
        data[unit["task"]],
        out,
        progress_line,
        options,
    )
    progress_line.finished(unit, seconds)
    if finished is None:
        unit.update(status="skipped", reason=reason)
        echo(f"skipped: {unit['folder']}: {reason}")
        return
    results, pred = finished
    unit.update(status="done", seconds=None if seconds is None else round(seconds, 3))
    predictions[unit["folder"]] = {**pred, "task_type": results["task"]["type"]}


def _load_tasks(
    tasks: Sequence[Any], data_root: str | Path | None, echo: Callable[[str], None]
) -> tuple[list[Any], dict[str, Any], list[dict[str, Any]]]:
    """The tasks whose data is under ``data_root`` with their data, and the missing ones (each
    with the reason and where to get it: the table lists them rather than failing)."""
    from mgll.benchmark import protocols as eval_calls
    from mgll.benchmark.tasks import missing_reason

    missing, ready, data = [], [], {}
    for task in tasks:
        reason = missing_reason(task, data_root)
        if reason is not None:
            missing.append(
                {
                    "task": task.name,
                    "reason": reason,
                    "get": task.get or task.layout,
                    "metric": task.metric,
                    "paper": task.paper or {},
                }
            )
            echo(f"missing: {task.name}: {reason}")
            continue
        try:
            data[task.name] = eval_calls.load_task_data(task, data_root)
        except ValueError as error:
            raise BenchmarkError(f"task {task.name}: {error}") from None
        ready.append(task)
    return ready, data, missing


def _run_unit(
    unit: dict[str, Any],
    spec: str,
    kind: str,
    task_data: Any,
    out: Path,
    progress_line: Progress,
    options: dict[str, Any],
) -> tuple[Any, float | None, str | None]:
    """One unit: its finished folder as is, else run it; (read_unit's result or None,
    seconds it ran or None, why it was skipped or None)."""
    from mgll.benchmark import protocols as eval_calls

    folder = out / unit["folder"]
    finished = eval_calls.read_unit(folder)
    if finished is not None:
        return finished, None, None
    if unit["protocol"] == "zeroshot" and kind != "run":
        return None, None, "zero-shot needs an image-text model (a pretraining run folder)"
    if eval_calls.train_classes(task_data, unit["label_fraction"], unit["seed"]) < 2:
        return None, None, "the label-fraction draw holds a single class"
    progress_line.say(unit)
    started = time.perf_counter()
    eval_calls.run_protocol(
        unit["protocol"],
        spec,
        task_data,
        folder,
        fraction=unit["label_fraction"],
        seed=unit["seed"],
        **options,
    )
    seconds = time.perf_counter() - started
    return eval_calls.read_unit(folder), seconds, None


def _write_outputs(out: Path, summary: dict[str, Any], echo: Callable[[str], None]) -> None:
    """benchmark.json, table.md, table.csv and report.html; the table is echoed."""
    from mgll.benchmark.report import write_report
    from mgll.benchmark.summary import format_csv, format_table, write_text

    encoders = list(summary["encoders"])
    write_text(out / "benchmark.json", json.dumps(summary, indent=2, default=str) + "\n")
    table = format_table(summary["rows"], encoders, summary["missing"], summary["notes"])
    write_text(out / "table.md", table)
    write_text(out / "table.csv", format_csv(summary["rows"], encoders))
    write_report(out / "report.html", summary)
    echo(table)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``benchmark`` sub-command."""
    parser = subparsers.add_parser(
        "benchmark",
        help="encoders over the paper's tasks (or task files): one table, seeds pooled",
        description="Run every encoder over every task and protocol, several seeds, and write "
        "benchmark.json, table.md/.csv and report.html beside one mgll.eval folder per run "
        "(docs/benchmark.md).",
    )
    parser.add_argument(
        "--encoder",
        action="append",
        required=True,
        metavar="[NAME=]SPEC",
        help="an encoder as mgll probe takes it (repeatable; the first is compared with the "
        "others); {seed} in SPEC is replaced by the seed, e.g. mgll=runs/palm-s{seed}",
    )
    parser.add_argument(
        "--tasks",
        required=True,
        help="comma-separated: paper (all ten rows), registry names (palm, idrid-dr, ...), "
        "task files (.yaml)",
    )
    parser.add_argument(
        "--protocol",
        default="probe,finetune",
        help="comma-separated: probe, finetune, paper-finetune, zeroshot (default probe,finetune)",
    )
    parser.add_argument(
        "--seeds", type=int, default=DEFAULT_SEEDS, help="seeds at full labels (default 3)"
    )
    parser.add_argument(
        "--draws",
        type=int,
        default=DEFAULT_DRAWS,
        help="seeded draws per label fraction below 1 (default 10)",
    )
    parser.add_argument(
        "--label-fraction", default="1", metavar="F[,F...]", help="e.g. 0.01,0.1,1 (default 1)"
    )
    parser.add_argument("--data-root", help="folder the tasks' data folders are under")
    parser.add_argument("--output-dir", required=True, help="the benchmark's folder")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument(
        "--epochs", type=int, help="fine-tuning epochs (default: the protocol's recipe, 50)"
    )
    parser.add_argument(
        "--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (1000)"
    )
    parser.add_argument("--cache-dir", help="feature cache folder (default: the user cache)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``mgll benchmark``."""
    from mgll.benchmark.protocols import resolve_device
    from mgll.eval.cli import run_offline

    def body() -> int:
        run_benchmark(
            args.encoder,
            args.tasks,
            args.protocol,
            args.output_dir,
            data_root=args.data_root,
            seeds=args.seeds,
            draws=args.draws,
            label_fractions=args.label_fraction,
            first_seed=args.seed,
            epochs=args.epochs,
            n_resamples=args.bootstrap,
            cache_dir=args.cache_dir,
            device=resolve_device(args.device),
            progress=not args.no_progress and sys.stderr.isatty(),
        )
        return 0

    return run_offline(body, args.output_dir)
