"""Render the compiler's progress events: a rich display on a terminal, lines otherwise."""

from __future__ import annotations

import logging
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

from fmc.cli.output import interactive, stderr

log = logging.getLogger("fmc")
# Progress events that count done/total, and their log line off a terminal.
COUNTED = {"calibrate": "calibration: layer %d/%d", "tensor": "weights: %d/%d tensors"}


class CompileProgress:
    """A context manager whose instance is the `progress` callback of `compile_model`."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.rich = interactive() and not quiet
        self._progress: Progress | None = None
        self._task = None
        self._last_line = 0.0

    def __enter__(self):
        if self.rich:
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                      BarColumn(), MofNCompleteColumn(), console=stderr,
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
                self._task = self._progress.add_task(f"{info['name']}: {info['doc']}",
                                                     total=None)
            else:
                log.info("%s: %s", info["name"], info["doc"])
        elif event == "phase-done":
            self._line("[green]✓[/]", f"{info['name']} done in {info['seconds']:.2f} s")
        elif event == "phase-cached":
            self._line("[cyan]↺[/]", f"{info['name']} skipped: restored from the build cache")
        elif event in COUNTED:
            if self._progress is not None and self._task is not None:
                self._progress.update(self._task, total=info["total"], completed=info["done"])
            elif time.monotonic() - self._last_line > 5 or info["done"] == info["total"]:
                self._last_line = time.monotonic()
                log.info(COUNTED[event], info["done"], info["total"])

    def _line(self, mark: str, message: str) -> None:
        """A finished step: above the live display on a terminal, a log line otherwise."""
        if self._progress is not None:
            self._progress.console.print(f"{mark} {message}")
        else:
            log.info(message)
