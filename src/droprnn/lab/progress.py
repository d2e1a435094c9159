"""What the terminal shows while a lab runs: a bar over all trials, one bar per running trial (epoch,
loss, validation accuracy), a line per finished trial, and at the end the table and the report's path.

rich draws the bars when it is installed (an optional extra); otherwise plain lines are printed, one per
finished trial, which also suits logs and CI.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO


def _line(trial: dict[str, Any], done: int, total: int) -> str:
    label = f"[{done}/{total}] {trial['variant']} seed {trial['seed']}"
    if trial["status"] != "ok":
        last = (trial.get("error") or "").strip().splitlines()[-1:] or ["unknown error"]
        return f"{label}: FAILED: {last[0]}"
    return (f"{label}: test {trial['test_metric']:.3f} (best epoch {trial['best_epoch']}, "
            f"{trial['wall_seconds']:.1f} s)")


class PlainProgress:
    """One line per finished trial."""

    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self.stream, self.done, self.total = stream, 0, 0

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if event == "start":
            self.total, self.done = data["total"], data["finished"]
            if data["finished"]:
                print(f"resuming: {data['finished']} of {data['total']} trials already finished", file=self.stream)
        elif event == "trial":
            self.done += 1
            print(_line(data, self.done, self.total), file=self.stream, flush=True)

    def close(self) -> None:
        pass


class RichProgress:
    """Bars: all trials, and each running trial's epochs with its latest loss and validation accuracy."""

    def __init__(self, console=None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console or Console()
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=self.console)
        self.overall = None
        self.running: dict[tuple[str, int], Any] = {}
        self.done = self.total = 0

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if event == "start":
            self.total, self.done = data["total"], data["finished"]
            self.bars.start()
            self.overall = self.bars.add_task("trials", total=data["total"], completed=data["finished"], status="")
        elif event == "epoch":
            key = (data["variant"], data["seed"])
            if key not in self.running:
                self.running[key] = self.bars.add_task(f"  {data['variant']} seed {data['seed']}",
                                                       total=data["epochs"], status="")
            self.bars.update(self.running[key], completed=data["epoch"],
                             status=f"loss {data['train_loss']:.3f}  val {data['val_metric']:.3f}")
        elif event == "trial":
            self.done += 1
            task = self.running.pop((data["variant"], data["seed"]), None)
            if task is not None:
                self.bars.remove_task(task)
            self.bars.console.print(_line(data, self.done, self.total), highlight=False)
            self.bars.advance(self.overall)
        elif event == "done":
            self.close()

    def close(self) -> None:
        self.bars.stop()


def terminal_progress(plain: bool = False):
    """rich bars on a terminal when rich is installed; plain lines otherwise."""
    if not plain and sys.stdout.isatty():
        try:
            return RichProgress()
        except ImportError:
            pass
    return PlainProgress()
