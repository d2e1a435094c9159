"""Run a lab: schedule the trials, survive their failures, resume, then write results and the report.

The run directory holds ``run.json`` (the settings), ``trials/<variant>-seed<k>.json`` (one file per
finished trial, written as it finishes), ``masks/<variant>.png``, ``results.json`` and the report. A
re-run with the same directory skips trials already finished ok; a trial that raised, or whose worker
process died or went silent, is recorded as failed with its error while the others go on, and is tried
again next run. A local worker sends a heartbeat every few seconds besides its epochs; one not heard
from for ``trial_timeout`` seconds (stopped, swapped out, hung with the interpreter held) is killed.

Trials are independent, so they run in parallel: local worker processes (``workers``), or tasks on a
Ray cluster (``ray``: an address, or "local" for a Ray instance started here).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..errors import DroprnnError
from . import masks, report
from .config import LabConfig, check_same_trials
from .train import code_for, run_trial, task_for
from .variants import VARIANTS

Progress = Callable[[str, dict[str, Any]], None]  # (event, data): "start", "epoch", "trial", "done"


# ---------------------------------------------------------------------------------------------- one trial
def _trial_job(config: LabConfig, variant: str, code: str, seed: int, sink: Any = None) -> dict[str, Any]:
    """Run one trial, never raising: an exception becomes a failed record with its traceback."""
    epochs: list[dict[str, Any]] = []

    def on_epoch(record: dict[str, Any]) -> None:
        epochs.append({k: v for k, v in record.items() if k not in ("variant", "seed", "epochs")})
        if sink is not None:
            sink.put(("epoch", record))

    try:
        return run_trial(config, variant, code, seed, on_epoch)
    except Exception:  # noqa: BLE001 - recorded, and the other trials go on
        return failed(variant, seed, traceback.format_exc(), epochs)


def failed(variant: str, seed: int, error: str, epochs: Optional[list] = None) -> dict[str, Any]:
    return {"variant": variant, "seed": seed, "status": "failed", "error": error, "epochs": epochs or [],
            "best_epoch": None, "test_loss": None, "test_metric": None, "wall_seconds": None}


# ---------------------------------------------------------------------------------------------- schedulers
class _Sink:
    """Where a trial's epoch updates go: the progress callback (inline), or a pipe to the main process."""

    def __init__(self, send: Callable[[tuple], None]) -> None:
        self.put = send


def _run_inline(config, jobs, on_done, progress):
    sink = _Sink(lambda item: progress(*item)) if progress is not None else None
    for variant, code, seed in jobs:
        on_done(_trial_job(config, variant, code, seed, sink))


HEARTBEAT_SECONDS = 2.0
# A new worker's first sign of life waits for the process to start and import torch, which a loaded machine
# can stretch well past a short --trial-timeout; so until then it gets at least this long.
STARTUP_SECONDS = 60.0


def _worker_main(config: LabConfig, conn) -> None:
    """A worker process: runs the trials the main process sends, one at a time, until it sends None, and
    says it is alive every HEARTBEAT_SECONDS meanwhile (from a thread: a trial's work does not hold it up)."""
    torch.set_num_threads(config.threads)
    lock, stop = threading.Lock(), threading.Event()

    def send(item: tuple) -> None:
        with lock:  # two threads share the pipe
            conn.send(item)

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                send(("alive", None))
            except (OSError, EOFError):
                return

    send(("alive", None))  # at once: starting a process (spawn, importing torch) can take longer than a beat
    threading.Thread(target=beat, daemon=True).start()
    sink = _Sink(send)
    while (job := conn.recv()) is not None:
        variant, code, seed = job
        send(("trial", _trial_job(config, variant, code, seed, sink)))
    stop.set()


class _Worker:
    """One worker process with its pipe and the job it holds. The main process assigns every job itself,
    so when a worker dies it knows exactly which trial went down with it."""

    def __init__(self, context, config: LabConfig) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(config, child), daemon=True)
        self.process.start()
        child.close()
        self.job = None
        self.started = False  # not heard from yet: still starting (see STARTUP_SECONDS)

    def silence_allowed(self, trial_timeout: float) -> float:
        return trial_timeout if self.started else max(trial_timeout, STARTUP_SECONDS)

    def assign(self, queue: list) -> None:
        self.job = queue.pop(0) if queue else None
        self.heard = time.monotonic()
        self.conn.send(self.job)


def _run_processes(config, jobs, on_done, progress):
    import multiprocessing
    from multiprocessing.connection import wait as wait_any

    # spawn, not fork: a forked child inherits torch's thread pools in an unusable state.
    context = multiprocessing.get_context("spawn")
    queue = list(jobs)
    workers = [_Worker(context, config) for _ in range(min(config.workers, len(queue)))]
    for worker in workers:
        worker.assign(queue)

    def replace(worker: _Worker, error: str) -> None:
        """Record the worker's trial as failed and let a fresh worker take the remaining ones."""
        variant, _, seed = worker.job
        on_done(failed(variant, seed, error))
        workers.remove(worker)
        if queue:
            replacement = _Worker(context, config)
            replacement.assign(queue)
            workers.append(replacement)

    try:
        while any(w.job is not None for w in workers):
            busy = [w for w in workers if w.job is not None]
            now = time.monotonic()
            silent_for = max(0.0, min(w.silence_allowed(config.trial_timeout) - (now - w.heard) for w in busy))
            wait_any([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=silent_for)
            for worker in busy:
                try:
                    while worker.job is not None and worker.conn.poll():
                        event, data = worker.conn.recv()
                        worker.heard, worker.started = time.monotonic(), True
                        if event == "trial":
                            on_done(data)
                            worker.assign(queue)
                        elif event != "alive" and progress is not None:
                            progress(event, data)
                except (EOFError, OSError):
                    pass  # the pipe closed: the process is gone, handled below
                if worker.job is not None and not worker.process.is_alive():
                    # A crash in native code, os._exit, the OOM killer.
                    replace(worker, f"the worker process running this trial died (exit code {worker.process.exitcode})")
                elif worker.job is not None and \
                        time.monotonic() - worker.heard > worker.silence_allowed(config.trial_timeout):
                    worker.process.kill()
                    worker.process.join(timeout=5)
                    why = "(--trial-timeout)" if worker.started else "since it was started"
                    replace(worker, f"the worker process running this trial showed no sign of life for "
                                    f"{worker.silence_allowed(config.trial_timeout):g} s {why} and was killed")
    finally:
        for worker in workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()


def _reachable(address: str) -> None:
    """Raise at once when a "host:port" Ray address refuses connections or does not answer (Ray itself keeps
    retrying for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and the like: Ray's to resolve
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as error:
        raise DroprnnError(f"droprnn lab: argument `--ray` {address!r}: nothing answers there ({error}); give the "
                           "address of a running Ray cluster's head, or 'local'.") from None


def _run_ray(config, jobs, on_done, progress):
    try:
        import ray
    except ImportError:
        raise DroprnnError("droprnn lab: --ray needs Ray, which is not installed: pip install 'ray[default]' "
                           "(or pip install droprnn[ray])") from None
    started_here = not ray.is_initialized()
    if started_here:
        if config.ray != "local":
            _reachable(config.ray)
        try:
            if config.ray == "local":
                ray.init(num_cpus=config.workers * config.threads, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=config.ray, log_to_driver=False)
        except Exception as error:  # noqa: BLE001 - unreachable address, no cluster there, a refused connection
            detail = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DroprnnError(f"droprnn lab: argument `--ray` {config.ray!r}: no Ray cluster could be joined "
                               f"({detail}); give the address of a running cluster, or 'local'.") from None
    try:
        remote = ray.remote(num_cpus=config.threads)(_trial_job)
        refs = {remote.remote(config, v, c, s): (v, s) for v, c, s in jobs}
        waiting = list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            for ref in done:
                variant, seed = refs[ref]
                try:
                    on_done(ray.get(ref))
                except Exception as error:  # noqa: BLE001 - a lost worker or node: recorded as failed
                    on_done(failed(variant, seed, f"the Ray task running this trial failed: {error}"))
    finally:
        if started_here:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------- the run
def trial_path(run_dir: Path, variant: str, seed: int) -> Path:
    return run_dir / "trials" / f"{variant}-seed{seed}.json"


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_suffix(path.suffix + ".tmp")
    staged.write_text(json.dumps(data, indent=1))
    os.replace(staged, path)  # a crash mid-write never leaves a half-written trial behind


_TRIAL_KEYS = frozenset(failed("", 0, "").keys())


def _read_trial(path: Path) -> Optional[dict[str, Any]]:
    """A finished trial's record, or None when the file is missing, unreadable or not a trial record (the
    trial then runs again)."""
    try:
        trial = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return trial if isinstance(trial, dict) and _TRIAL_KEYS <= trial.keys() else None


def versions() -> dict[str, str]:
    import droprnn

    return {"droprnn": droprnn.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def run_lab(config: LabConfig, progress: Optional[Progress] = None) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run (or resume) the lab described by ``config``; returns the results and the report's files."""
    run_dir = Path(config.out)
    settings = run_dir / "run.json"
    if settings.exists():
        try:
            stored = json.loads(settings.read_text())
        except (OSError, ValueError) as error:
            raise DroprnnError(f"droprnn lab: --out {run_dir} holds a run.json that cannot be read ({error}); "
                               "pick another --out or remove it.") from None
        check_same_trials(stored, config, str(run_dir))
    task = task_for(config.dataset, config.validation_fraction)  # a missing data package fails here, at once
    _write_json(settings, config.trial_fields())
    codes = {v: code_for(config, task, v) for v in config.variants}

    jobs, finished = [], 0
    for variant in config.variants:
        for seed in config.seed_list:
            stored = _read_trial(trial_path(run_dir, variant, seed))
            if stored is not None and stored.get("status") == "ok":
                finished += 1
            else:
                jobs.append((variant, codes[variant], seed))
    if progress is not None:
        progress("start", {"total": len(config.variants) * len(config.seed_list), "finished": finished,
                           "to_run": len(jobs), "epochs": config.epochs})

    def on_done(trial: dict[str, Any]) -> None:
        _write_json(trial_path(run_dir, trial["variant"], trial["seed"]), trial)
        if progress is not None:
            progress("trial", trial)

    if jobs:
        from ..kernels import cpu

        cpu.load()  # build the fused kernels once, here, before workers race to
        if config.ray:
            _run_ray(config, jobs, on_done, progress)
        elif config.workers == 1 or len(jobs) == 1:
            torch.set_num_threads(config.threads)
            _run_inline(config, jobs, on_done, progress)
        else:
            _run_processes(config, jobs, on_done, progress)

    results = {
        "format": report.RESULTS_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": versions(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
                   f"{config.workers} workers × {config.threads} threads",
        "config": {**config.to_json(), "task": "classification", "metric": "accuracy"},
        "variants": {v: {"title": VARIANTS[v].title, "description": VARIANTS[v].description, "code": codes[v]}
                     for v in config.variants},
        "trials": [_read_trial(trial_path(run_dir, v, s)) or failed(v, s, "the trial's file is missing or unreadable")
                   for v in config.variants for s in config.seed_list],
    }
    _write_json(run_dir / "results.json", results)
    # Pictures only for variants that trained: a variant whose every trial failed has nothing to picture.
    trained = {t["variant"] for t in results["trials"] if t["status"] == "ok"}
    images = draw_masks(config, task, {v: c for v, c in codes.items() if v in trained}, run_dir / "masks")
    files = report.write_report(results, run_dir, images)
    if progress is not None:
        progress("done", {"results": results, "files": files})
    return results, files


def draw_masks(config: LabConfig, task, codes: dict[str, str], folder: Path) -> dict[str, Path]:
    """One mask picture per variant, for the first test sequence (seeded: the same picture every run)."""
    from .variants import build

    sample = task.test.take(torch.arange(1))
    images = {}
    for variant, code in codes.items():
        torch.manual_seed(0)
        panels = masks.mask_panels(build(code), sample.inputs, sample.lengths)
        title = f"{VARIANTS[variant].title} (rate {config.rate}, one test sequence of {int(sample.lengths[0])} steps)"
        images[variant] = masks.draw(panels, folder / f"{variant}.png", title)
    return images
