"""What keeps a run folder safe: one run at a time (a lock file) and a clean stop on a signal;
:func:`run_scope`, the one scaffold both training engines run inside.

- :class:`RunLock`: ``OUT/.mgll-run.lock`` names the host and process of the run writing the
  folder; a second run into the same folder is refused naming them. A lock left by a process
  that no longer exists (on this host) is taken over with a warning.
- :class:`StopRequests`: SIGINT, SIGTERM (and SIGUSR1 when asked) set a flag instead of killing
  the process; the loop finishes its step, checkpoints and stops with :class:`RunInterrupted`.
  A second signal stops at once (the default action), which cannot damage the checkpoints
  already written: every file is written to a temporary name and renamed.

- :func:`run_scope`: the processes, the device, the lock, the stop flag and the checkpoint to
  resume of one run (:class:`RunScope`); a fresh run into a folder with checkpoints is refused.

Each restores what it changes (the lock file, the signal handlers) when its scope ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

import torch

from mgll.distributed import DistributedInfo, init_distributed
from mgll.errors import UserError
from mgll.training import checkpoint as ckpt

LOCK_FILE = ".mgll-run.lock"


class RunLockedError(UserError, RuntimeError):
    """Another run is writing the output folder: the message names its host and process."""


class StoppedBySignal(UserError, RuntimeError):
    """A command stopped on SIGINT/SIGTERM at a boundary of its work (the message says what
    was kept and how to continue); exits as pretraining's :class:`RunInterrupted` does."""

    label = ""  # a requested stop, not an error

    def __init__(self, signal_name: str, message: str) -> None:
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        """128 + the signal's number, as a shell reports a process ended by that signal."""
        names = {s.name: s.value for s in signal.Signals}
        return 128 + names[self.signal_name] if self.signal_name in names else 1


class RunInterrupted(StoppedBySignal):
    """The run stopped on a signal after checkpointing; the message says how to continue."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None) -> None:
        saved = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint"
        super().__init__(
            signal_name,
            f"stopped by {signal_name} at step {step} ({saved}); continue the run with "
            "--resume latest",
        )
        self.step = step


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Hold ``OUT/.mgll-run.lock`` for the duration of a run (rank 0 only)."""

    def __init__(self, output_dir: Path, enabled: bool = True) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.enabled = enabled
        self._held = False
        self._created: list[Path] = []  # folders this lock made, deepest first

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        folder = self.path.parent
        self._created = [d for d in (folder, *folder.parents) if not d.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                self._take_over_if_stale(me["host"])
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(me, fh)
            self._held = True
            return self
        raise RunLockedError(f"{self.path}: could not take the lock; try again")

    def _take_over_if_stale(self, host: str) -> None:
        try:
            owner = json.loads(self.path.read_text(encoding="utf-8"))
            other_host, other_pid = str(owner["host"]), int(owner["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            owner, other_host, other_pid = None, "?", -1
        if owner is not None and (other_host != host or _alive(other_pid)):
            raise RunLockedError(
                f"{self.path.parent} is in use by another run (process {other_pid} on "
                f"{other_host}); wait for it to end or choose another --output-dir (if that "
                f"process is gone, delete {self.path})"
            )
        warnings.warn(
            f"{self.path}: taking over the lock of process {other_pid} on {other_host}, which "
            "no longer runs",
            stacklevel=3,
        )
        self.path.unlink(missing_ok=True)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False
        if kind is not None:  # a refused or failed run leaves no folder it made and left empty
            for folder in self._created:
                try:
                    folder.rmdir()
                except OSError:  # it holds something (e.g. a stopped run's checkpoint): keep it
                    break
        self._created = []


class StopRequests:
    """Turn stop signals into a flag the training loop reads between steps."""

    def __init__(
        self,
        extra_signals: tuple[int, ...] = (),
        finishing: str = "finishing this step and writing a checkpoint",
    ) -> None:
        self.signals = (signal.SIGINT, signal.SIGTERM, *extra_signals)
        self.finishing = finishing  # what the run does before it stops, as printed
        self.received: str | None = None
        self._saved: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived."""
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name
        # A second signal of any kind stops at once: back to the handlers the process had.
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        print(
            f"\n{self.received}: {self.finishing} (send it again to stop at once)",
            flush=True,
        )

    def __enter__(self) -> StopRequests:
        # Handlers can only be installed from the main thread (e.g. not in a notebook worker).
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._saved.clear()


@dataclass
class RunScope:
    """One run's processes, device, output folder, stop flag and the checkpoint it resumes."""

    output_dir: Path
    info: DistributedInfo
    device: torch.device
    stop: StopRequests
    resume_from: Path | None

    @property
    def checkpoint_dir(self) -> Path:
        """``OUT/checkpoints``."""
        return self.output_dir / ckpt.CHECKPOINT_SUBDIR


@contextlib.contextmanager
def run_scope(
    output_dir: str | Path,
    device: str = "auto",
    resume: str | Path | None = None,
    extra_signals: tuple[int, ...] = (),
) -> Iterator[RunScope]:
    """Join ``torchrun``'s processes (if any), lock ``output_dir`` (a second run into it is
    refused), turn SIGINT/SIGTERM (and ``extra_signals``) into a clean stop, and resolve
    ``resume`` (``latest`` or a checkpoint path) before anything is built or written. A fresh
    run into a folder that already holds checkpoints is refused. Signal handlers and the lock
    are given back on exit."""
    out = Path(output_dir)
    info, dev = init_distributed(device)
    with RunLock(out, enabled=info.is_main), StopRequests(extra_signals) as stop:
        resume_from = ckpt.resolve_checkpoint(resume, out) if resume is not None else None
        if resume_from is None and ckpt.list_checkpoints(out / ckpt.CHECKPOINT_SUBDIR):
            raise ckpt.CheckpointError(
                f"{out} already holds a run with checkpoints; continue it with --resume "
                "latest or choose a new --output-dir"
            )
        yield RunScope(out, info, dev, stop, resume_from)
