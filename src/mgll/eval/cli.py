"""The command layer of :mod:`mgll.eval`: ``probe``, ``finetune``, ``zeroshot``, ``retrieve`` and
``compare``, and the arguments they share.

Each ``register_<command>`` adds its parser (``mgll.cli.COMMAND_MODULES`` names it); each
``run_<command>`` loads its protocol module when the command runs, so ``mgll COMMAND --help``
loads no torch, and runs its body through :func:`run_offline` (the model hubs offline). User
errors reach ``mgll.cli.main``, which prints ``mgll <cmd>: error: ...`` and exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mgll.cli import add_resume_argument
from mgll.eval.options import DEFAULT_OPTIONS, EvalOptions
from mgll.metrics import DEFAULT_RESAMPLES

DEFAULT_SPLIT_FRACTIONS = "0.8,0.1,0.1"


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """--data/--data-root/--source/--options/--level/--classes/--ordinal and the split."""
    from mgll.data.cli import add_options_argument

    parser.add_argument(
        "--data",
        required=True,
        help="dataset folder or spec file (.yaml/.json), relative to --data-root first",
    )
    parser.add_argument("--data-root", help="folder that relative --data paths are under")
    parser.add_argument(
        "--source", metavar="NAME", help="the folder's format, as data.source (default: detected)"
    )
    add_options_argument(parser)
    parser.add_argument("--level", required=True, help="granularity level that is the task")
    parser.add_argument(
        "--classes",
        help="classes to keep, comma-separated; A+B=NAME merges A and B (default: all)",
    )
    parser.add_argument(
        "--ordinal",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="classes are ordered grades: report quadratic-weighted kappa (default: when the "
        "class names are increasing numbers)",
    )
    parser.add_argument(
        "--split",
        metavar="MODE",
        help="'source' (the split the data ships), 'patient' (seeded patient-level split, "
        "--split-fractions), or a split CSV from `mgll data split`; default: the pretraining "
        "run's split when --encoder/--model is a run on this data, else the source's split "
        "when it has one, else 'patient'",
    )
    parser.add_argument(
        "--split-fractions",
        metavar="TRAIN,VAL,TEST",
        help=f"fractions of a '--split patient' split (default {DEFAULT_SPLIT_FRACTIONS})",
    )
    parser.add_argument("--split-seed", type=int, help="seed of a 'patient' split (default 0)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` (a pretraining run folder or checkpoint: image and text towers)."""
    parser.add_argument(
        "--model",
        required=True,
        help="pretraining run folder or checkpoints/step_*.safetensors (image and text towers)",
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--output-dir and the flags of :class:`~mgll.eval.options.EvalOptions`, its defaults."""
    d = DEFAULT_OPTIONS
    parser.add_argument("--output-dir", required=True, help="folder for results.json and plots")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of draws and bootstrap")
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=d.n_resamples,
        metavar="N",
        help=f"bootstrap resamples ({d.n_resamples})",
    )
    parser.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"images per batch ({d.batch_size})"
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=d.num_workers,
        help=f"data-loader workers (default here: {d.num_workers}; 0 on 2 cores, where "
        "workers would compete with the forward pass)",
    )
    parser.add_argument(
        "--device", default=d.device, help=f"cpu, cuda, cuda:1 or auto (default {d.device})"
    )
    parser.add_argument(
        "--precision",
        default=d.precision,
        choices=["fp32", "bf16", "fp16"],
        help=f"autocast ({d.precision})",
    )
    parser.add_argument(
        "--cache-dir",
        default=d.cache_dir,
        help="feature cache folder (default: <user cache>/features, $MGLL_CACHE_DIR/features)",
    )
    parser.add_argument(
        "--no-progress", dest="quiet", action="store_true", default=d.quiet, help="no progress bars"
    )


def eval_options(args: argparse.Namespace) -> EvalOptions:
    """The :class:`~mgll.eval.options.EvalOptions` of :func:`add_run_arguments`'s flags."""
    flags = {"n_resamples": "bootstrap"}  # option name -> argparse name, where they differ
    values = {
        f.name: getattr(args, flags.get(f.name, f.name))
        for f in dataclasses.fields(EvalOptions)
        if hasattr(args, flags.get(f.name, f.name))
    }
    return EvalOptions(**values)


def split_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``data.split`` mapping the split arguments describe (None = the default)."""
    from mgll.eval.task import TaskError

    if args.split_fractions is not None and args.split != "patient":
        raise TaskError(  # never ignored silently
            f"--split-fractions {args.split_fractions}: applies to a patient split; add "
            "--split patient"
        )
    if args.split is None:
        return None
    if args.split == "source":
        return {"mode": "source"}
    if args.split == "patient":
        fractions = args.split_fractions or DEFAULT_SPLIT_FRACTIONS
        try:
            train, val, test = (float(v) for v in fractions.split(","))
        except ValueError:
            raise TaskError(
                f"--split-fractions: {args.split_fractions!r} is not TRAIN,VAL,TEST"
            ) from None
        return {"train": train, "val": val, "test": test, "seed": args.split_seed or 0}
    if not Path(args.split).is_file():
        raise TaskError(f"--split: {args.split!r} is not 'source', 'patient' or a split CSV")
    return {"file": str(Path(args.split).absolute())}


def load_task(args: argparse.Namespace, encoder_config: dict[str, Any] | None = None):
    """The :class:`~mgll.eval.task.EvalData` the task arguments describe."""
    from mgll.data.cli import parse_options
    from mgll.eval.task import load_eval_data

    return load_eval_data(
        args.data,
        args.level,
        data_root=args.data_root,
        data_format=args.source,
        options=parse_options(args.options),
        classes=args.classes,
        ordinal=args.ordinal,
        split=split_settings(args),
        split_seed=args.split_seed,
        encoder_config=encoder_config,
    )


def run_offline(body: Callable[[], int], output_dir: str | Path | None = None) -> int:
    """Run ``body`` with the model hubs offline: an evaluation reads local models only, never
    a download. With ``output_dir``, hold that folder's run lock meanwhile (pretraining's
    :class:`~mgll.training.run_control.RunLock`): a second command into the same folder is
    refused in one line naming the holder. Errors pass through untouched (``mgll.cli.main``
    prints user errors on one line; any other exception is a bug and keeps its traceback)."""
    from mgll.process import offline_hubs
    from mgll.training.run_control import RunLock

    with offline_hubs(), RunLock(Path(output_dir or "."), enabled=output_dir is not None):
        return body()


def register_probe(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``probe`` sub-command."""
    parser = subparsers.add_parser(
        "probe",
        help="linear probe of a frozen image encoder",
        description="Linear probe: cached frozen features, logistic regression with C chosen "
        "on validation, test metrics with patient-bootstrap 95% CIs (docs/evaluation.md).",
    )
    parser.add_argument(
        "--encoder",
        required=True,
        help="run folder/checkpoint, exported encoder, open_clip:ARCH:TAG, hf-hub:ORG/REPO or "
        "random:ARCH[:SEED], timm:NAME[@SIZE] (ImageNet weights)",
    )
    add_task_arguments(parser)
    add_run_arguments(parser)
    parser.add_argument(
        "--label-fraction",
        default="1.0",
        metavar="F[,F...]",
        help="fractions of the training patients to fit on, e.g. 0.01,0.1,1.0 (default 1.0)",
    )
    parser.set_defaults(func=run_probe)


def run_probe(args: argparse.Namespace) -> int:
    """``mgll probe``."""

    def body() -> int:
        from mgll.eval.encoders import load_encoder
        from mgll.eval.options import resolve_device
        from mgll.eval.probe import linear_probe
        from mgll.eval.results import format_metrics
        from mgll.eval.task import TaskError

        try:
            fractions = [float(f) for f in args.label_fraction.split(",") if f.strip()]
        except ValueError:
            raise TaskError(f"--label-fraction: {args.label_fraction!r} is not numbers") from None
        options = eval_options(args)
        encoder = load_encoder(args.encoder, resolve_device(options.device))
        data = load_task(args, encoder.run_config)
        results = linear_probe(encoder, data, args.output_dir, options, label_fractions=fractions)
        for fraction, result in results.get("fractions", {"1": results}).items():
            if "fractions" in results:
                print(f"label fraction {fraction}:")
            print(format_metrics(result))
        print(f"wrote {args.output_dir}")
        return 0

    return run_offline(body, args.output_dir)


def register_finetune(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``finetune`` sub-command."""
    parser = subparsers.add_parser(
        "finetune",
        help="full fine-tuning of an encoder with a linear head",
        description="Full fine-tuning: 50 epochs, lr 1.25e-4, weight decay 1e-3, "
        "flips/rotation/jitter, best validation epoch, test once. Settings: --config FILE.yaml "
        "and key=value overrides (keys of FineTuneConfig, e.g. betas=[0.9,0.95] grad_clip=10 "
        "head=projected augmentation.rotation=30; docs/evaluation.md), then the flags below. "
        "Ctrl-C (or SIGTERM) stops after the current step with a checkpoint; continue with "
        "--resume. Runs under torchrun for several GPUs.",
    )
    parser.add_argument(
        "--encoder",
        required=True,
        help="run folder/checkpoint, exported encoder, open_clip:ARCH:TAG, hf-hub:ORG/REPO or "
        "random:ARCH[:SEED], timm:NAME[@SIZE] (ImageNet weights)",
    )
    add_task_arguments(parser)
    add_run_arguments(parser)
    parser.set_defaults(batch_size=None)
    parser.add_argument("--config", metavar="FILE.yaml", help="fine-tuning settings (YAML)")
    parser.add_argument("--epochs", type=int, help="epochs (50)")
    parser.add_argument("--lr", type=float, help="peak lr (1.25e-4)")
    parser.add_argument("--weight-decay", type=float, help="AdamW (1e-3)")
    parser.add_argument("--layer-decay", type=float, help="layer-wise lr decay, e.g. 0.75 (off)")
    parser.add_argument(
        "--no-augmentation", action="store_true", help="train without flips/rotation/jitter/crop"
    )
    add_resume_argument(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings overrides")
    parser.set_defaults(func=run_finetune)


def _flag_overrides(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The settings the command's flags give (they win over --config and key=value)."""
    from mgll.eval.finetune import Augmentation
    from mgll.schema import to_dict

    flags = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "layer_decay": args.layer_decay,
    }
    pairs = [(key, value) for key, value in flags.items() if value is not None]
    if args.no_augmentation:
        pairs.append(("augmentation", to_dict(Augmentation.off())))
    return pairs


def run_finetune(args: argparse.Namespace) -> int:
    """``mgll finetune``."""
    from mgll.eval.encoders import load_encoder
    from mgll.eval.finetune import fine_tune, load_finetune_config
    from mgll.eval.results import format_metrics
    from mgll.schema import parse_overrides

    def body() -> int:
        pairs = parse_overrides(args.overrides) + _flag_overrides(args)
        cfg = load_finetune_config(args.config, pairs)
        scoring = argparse.Namespace(**{**vars(args), "batch_size": cfg.batch_size})
        options = eval_options(scoring)
        encoder = load_encoder(args.encoder)
        data = load_task(args, encoder.run_config)
        results = fine_tune(encoder, data, args.output_dir, options, cfg, resume=args.resume)
        if results is not None:
            print(format_metrics(results))
            print(f"wrote {args.output_dir}")
        return 0

    return run_offline(body)


def register_zeroshot(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``zeroshot`` sub-command."""
    parser = subparsers.add_parser(
        "zeroshot",
        help="zero-shot classification with class prompts",
        description="Zero-shot classification of a level with prompt ensembles (softmax over "
        "classes; a positive/negative prompt pair per label for multi-label levels).",
    )
    add_model_arguments(parser)
    add_task_arguments(parser)
    add_run_arguments(parser)
    parser.add_argument(
        "--template",
        action="append",
        metavar="TEXT",
        help="prompt template with {} for the class name (repeatable: an ensemble)",
    )
    parser.add_argument("--prompts", metavar="FILE", help="JSON {class: [prompt, ...]}")
    parser.set_defaults(func=run_zeroshot)


def run_zeroshot(args: argparse.Namespace) -> int:
    """``mgll zeroshot``."""

    def body() -> int:
        from mgll.eval.encoders import load_run_model
        from mgll.eval.results import format_metrics
        from mgll.eval.zeroshot import load_prompts_file, zero_shot

        options = eval_options(args)
        model, config = load_run_model(args.model, options.device)
        data = load_task(args, config)
        results = zero_shot(
            model,
            data,
            args.output_dir,
            options,
            name=str(args.model),
            run_config=config,
            templates=args.template,
            prompts=load_prompts_file(args.prompts) if args.prompts else None,
        )
        print(format_metrics(results))
        print(f"wrote {args.output_dir}")
        return 0

    return run_offline(body, args.output_dir)


def register_retrieve(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``retrieve`` sub-command."""
    parser = subparsers.add_parser(
        "retrieve",
        help="image-text retrieval (R@K, label-aware P@K)",
        description="Image->text and text->image retrieval on the test split with the texts "
        "of one level: R@K and label-aware P@K with bootstrap 95% CIs.",
    )
    add_model_arguments(parser)
    add_task_arguments(parser)
    add_run_arguments(parser)
    parser.add_argument(
        "--text-level",
        metavar="LEVEL",
        help="level whose texts are the gallery (default: --level); label-aware P@K is judged "
        "by the labels of --level, e.g. --text-level notes --level organism",
    )
    parser.add_argument(
        "--k", default="1,5,10", metavar="K[,K...]", help="cut-offs K (default 1,5,10)"
    )
    parser.set_defaults(func=run_retrieve)


def run_retrieve(args: argparse.Namespace) -> int:
    """``mgll retrieve``."""

    def body() -> int:
        from mgll.eval.encoders import load_run_model
        from mgll.eval.retrieve import format_retrieval, retrieval
        from mgll.eval.task import TaskError

        try:
            ks = [int(k) for k in args.k.split(",") if k.strip()]
        except ValueError:
            raise TaskError(f"--k: {args.k!r} is not a list of integers") from None
        if not ks or min(ks) < 1:
            raise TaskError(f"--k: {args.k!r}: cut-offs must be positive integers")
        options = eval_options(args)
        model, config = load_run_model(args.model, options.device)
        data = load_task(args, config)
        results = retrieval(
            model,
            data,
            args.output_dir,
            options,
            name=str(args.model),
            text_level=args.text_level,
            run_config=config,
            ks=ks,
        )
        print(format_retrieval(results))
        print(f"wrote {args.output_dir}")
        return 0

    return run_offline(body, args.output_dir)


def register_compare(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``compare`` sub-command."""
    parser = subparsers.add_parser(
        "compare",
        help="paired comparison of evaluation outputs on the same test set",
        description="Difference of every metric between output folders of probe/finetune/"
        "zeroshot (or of retrieve) on the same test images, with a paired patient-bootstrap "
        "95% CI and p-value.",
    )
    parser.add_argument("folders", nargs="+", metavar="OUT", help="output folders; A first")
    parser.add_argument("--output-dir", help="also write comparison.json and comparison.md here")
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=DEFAULT_RESAMPLES,
        metavar="N",
        help=f"resamples (default {DEFAULT_RESAMPLES})",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    """``mgll compare``."""

    def body() -> int:
        from mgll.eval.compare import compare_folders, format_comparison

        result = compare_folders(
            args.folders,
            output_dir=args.output_dir,
            n_resamples=args.bootstrap,
            seed=args.seed,
            progress=not args.no_progress,
        )
        print(format_comparison(result))
        return 0

    return run_offline(body, args.output_dir)
