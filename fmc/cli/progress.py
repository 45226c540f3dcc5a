"""Render the compiler's progress events: a rich display on a terminal, lines otherwise."""

from __future__ import annotations

import logging
import time

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
)
from rich.text import Text

from fmc.cli.output import human_bytes, interactive, stderr

log = logging.getLogger("fmc")
# Progress events that count done/total, and their log line off a terminal.
COUNTED = {"calibrate": "calibration: layer %d/%d", "tensor": "weights: %d/%d tensors"}


class _DoneOfTotal(ProgressColumn):
    """done/total: a count, or bytes and their rate while a hub model downloads."""

    def __init__(self):
        super().__init__()
        self._count = MofNCompleteColumn()

    def render(self, task) -> Text:
        if not task.fields.get("bytes"):
            return self._count.render(task)
        total = f"/{human_bytes(task.total)}" if task.total else ""
        rate = f" {human_bytes(task.speed)}/s" if task.speed else ""
        return Text(f"{human_bytes(task.completed)}{total}{rate}", style="progress.download")


class CompileProgress:
    """A context manager whose instance is the `progress` callback of `compile_model`."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.rich = interactive() and not quiet
        self._progress: Progress | None = None
        self._task = None
        self._phase = ""  # the current phase's description, shown again after a download
        self._last_line = 0.0

    def __enter__(self):
        if self.rich:
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                      BarColumn(), _DoneOfTotal(), console=stderr,
                                      transient=True)
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, event: str, **info) -> None:
        if self.quiet:
            return
        if event == "phase":
            if self._progress is not None:
                if self._task is not None:
                    self._progress.remove_task(self._task)
                self._phase = f"{info['name']}: {info['doc']}"
                self._task = self._progress.add_task(self._phase, total=None)
            else:
                log.info("%s: %s", info["name"], info["doc"])
        elif event == "phase-done":
            self._line("[green]✓[/]", f"{info['name']} done in {info['seconds']:.2f} s")
        elif event == "phase-cached":
            self._line("[cyan]↺[/]", f"{info['name']} skipped: restored from the build cache")
        elif event == "download":
            self._download(info["name"], info["done"], info["total"])
        elif event in COUNTED:
            if self._progress is not None and self._task is not None:
                self._progress.update(self._task, total=info["total"], completed=info["done"])
            elif time.monotonic() - self._last_line > 5 or info["done"] == info["total"]:
                self._last_line = time.monotonic()
                log.info(COUNTED[event], info["done"], info["total"])

    def _download(self, name: str, done: int, total: int) -> None:
        finished = 0 < total <= done  # total 0: the hub did not list the sizes
        if self._progress is not None and self._task is not None:
            if finished:  # back to the phase's own (indeterminate) display
                self._progress.remove_task(self._task)
                self._task = self._progress.add_task(self._phase, total=None)
            else:
                self._progress.update(self._task, total=total or None, completed=done,
                                      bytes=True, description=f"downloading {name}")
        elif time.monotonic() - self._last_line > 5 or finished:
            self._last_line = time.monotonic()
            size = f"/{human_bytes(total)}" if total else ""
            log.info("download: %s%s (%s)", human_bytes(done), size, name)

    def _line(self, mark: str, message: str) -> None:
        """A finished step: above the live display on a terminal, a log line otherwise."""
        if self._progress is not None:
            self._progress.console.print(f"{mark} {message}")
        else:
            log.info(message)
