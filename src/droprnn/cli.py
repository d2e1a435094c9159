"""The ``droprnn`` command (also ``python -m droprnn``).

    droprnn lab     train every dropout placement side by side on real data and write a report (the main job)
    droprnn lab ptb --preset NAME   Penn Treebank language modelling: Zaremba's and Gal's published models
    droprnn masks   only the mask pictures of each placement, for a given layer configuration
    droprnn demo    the masks as text in the terminal (the default with no command)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn, Optional, Sequence

from .errors import DroprnnError, check_positive_int


def _shows_default(default) -> bool:
    return not (default is None or default is False or default == "" or default == argparse.SUPPRESS)


class _WithDefaults(argparse.HelpFormatter):
    """Every option's help ends with its default, also where the option has no help text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").strip()
        if not _shows_default(action.default) or not action.option_strings or "default" in text:
            return text
        return f"{text} (default: %(default)s)".strip()


class _Parser(argparse.ArgumentParser):
    """Bad options end in one line naming the option, and exit status 2; ``--help`` shows each default."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _WithDefaults)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        # argparse prints no help line, hence no default, for an option without help text
        if "help" not in kwargs and _shows_default(kwargs.get("default")):
            kwargs["help"] = "(default: %(default)s)"
        return super().add_argument(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a rate in [0, 1), got {text}")
    return value


def _add_demo(commands) -> argparse.ArgumentParser:
    demo = commands.add_parser("demo", help="show where each dropout placement drops, as text")
    demo.add_argument("--steps", type=int, default=12, help="timesteps of the example sequence")
    demo.add_argument("--features", type=int, default=10, help="input features and GRU units")
    demo.add_argument("--rate", type=_rate, default=0.5, help="dropout rate of every placement")
    demo.add_argument("--seed", type=int, default=0)
    return demo


def _add_lab(commands) -> None:
    from .lab.config import CLASSIFICATION_DATASETS, LabConfig
    from .lab.variants import VARIANTS

    d = LabConfig.__dataclass_fields__
    lab = commands.add_parser("lab", help="train each dropout placement on real data; write a report",
                              description="Train the same recurrent classifier with each dropout placement, "
                                          "several seeds each, and write results.json and a report.")
    lab.add_argument("--dataset", default=d["dataset"].default, help=f"one of {', '.join(CLASSIFICATION_DATASETS)}")
    lab.add_argument("--layer", default=d["layer"].default, help="lstm or gru")
    lab.add_argument("--units", type=int, default=d["units"].default)
    lab.add_argument("--epochs", type=int, default=d["epochs"].default)
    lab.add_argument("--rate", type=float, default=d["rate"].default, help="the rate of every placement")
    lab.add_argument("--variants", default=",".join(VARIANTS),
                     help=f"comma list from: {', '.join(VARIANTS)} (default: all of them)")
    lab.add_argument("--seeds", type=int, default=d["seeds"].default, help="seeds per variant (0, 1, ...)")
    lab.add_argument("--batch-size", type=int, default=d["batch_size"].default)
    lab.add_argument("--learning-rate", type=float, default=d["learning_rate"].default)
    lab.add_argument("--out", default="", help="run directory (default runs/lab-<dataset>); re-running resumes")
    lab.add_argument("--workers", type=int, default=d["workers"].default, help="trials run at once")
    lab.add_argument("--threads", type=int, default=d["threads"].default, help="torch threads per trial")
    lab.add_argument("--trial-timeout", type=float, default=d["trial_timeout"].default, metavar="SECONDS",
                     help="a local worker not heard from for this long is killed and its trial recorded as failed")
    lab.add_argument("--ray", default=None, metavar="ADDRESS",
                     help="run the trials on a Ray cluster ('local' starts one here)")
    lab.add_argument("--plain", action="store_true", help="plain progress lines instead of bars")
    tasks = lab.add_subparsers(dest="lab_task", parser_class=_Parser, metavar="{ptb}")
    ptb = tasks.add_parser("ptb", help="word-level language modelling on Penn Treebank: Zaremba and Gal",
                           description="Train a published Penn Treebank configuration and compare its test "
                                       "perplexity with the paper's.")
    from .lab.ptb import PLACEMENTS, PRESETS

    ptb.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)}")
    ptb.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    ptb.add_argument("--seed", type=int, default=0)
    ptb.add_argument("--variants", default=None,
                     help="compare dropout placements on the preset's model and schedule instead (its own dropout "
                          f"off), a comma list from: {', '.join(PLACEMENTS)}")
    ptb.add_argument("--rate", type=float, default=0.25, help="the placements' drop probability (with --variants)")
    ptb.add_argument("--seeds", type=int, default=1, help="seeds per placement (with --variants): 0, 1, ...")
    ptb.add_argument("--out", default="", help="run directory (default runs/ptb-<preset>, or "
                                                 "runs/ptb-<preset>-placements with --variants)")
    ptb.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA the layers run the GPU kernels when Triton is installed)")


def _add_masks(commands) -> None:
    from .lab.variants import VARIANTS

    masks = commands.add_parser("masks", help="draw each placement's mask picture (PNG), no training",
                                description="Draw, for each dropout placement, which entries one call drops: the "
                                            "input, the state fed to the recurrent kernel and the output, step by "
                                            "step (one PNG per placement; nothing is trained).")
    masks.add_argument("--layer", default="lstm", help="lstm or gru")
    masks.add_argument("--units", type=int, default=16)
    masks.add_argument("--features", type=int, default=12)
    masks.add_argument("--steps", type=int, default=24)
    masks.add_argument("--rate", type=float, default=0.3)
    masks.add_argument("--variants", default=",".join(VARIANTS),
                       help=f"comma list from: {', '.join(VARIANTS)} (default: all of them)")
    masks.add_argument("--out", default="masks", help="folder for the PNG files")
    masks.add_argument("--seed", type=int, default=0)


def _run_lab(args) -> None:
    from .lab.config import LabConfig
    from .lab.progress import terminal_progress
    from .lab.report import summarize, terminal_table
    from .lab.runner import run_lab

    config = LabConfig(dataset=args.dataset, layer=args.layer, units=args.units, epochs=args.epochs, rate=args.rate,
                       variants=args.variants, seeds=args.seeds, batch_size=args.batch_size,
                       learning_rate=args.learning_rate, out=args.out, workers=args.workers, threads=args.threads,
                       trial_timeout=args.trial_timeout, ray=args.ray)
    progress = terminal_progress(plain=args.plain)
    try:
        results, files = run_lab(config, progress)
    finally:
        progress.close()
    print()
    print(terminal_table(summarize(results), results["config"]["metric"]))
    print(f"\nreport: {files['html']}  (also {files['markdown']}; data in {files['markdown'].parent / 'results.json'})")


def _run_ptb_placements(args) -> None:
    from .lab import ptb
    from .lab.report import summarize, terminal_table

    def show(variant: str, record: dict) -> None:
        print(f"{variant} epoch {record['epoch']}: train perplexity {record['train_metric']:.1f}, valid perplexity "
              f"{record['val_metric']:.1f}, {record['seconds']:.0f} s", flush=True)

    seeds = check_positive_int("droprnn lab ptb", "--seeds", args.seeds)
    results, files = ptb.run_placements(args.variants, args.rate, base=args.preset, out=args.out or None,
                                        seeds=tuple(range(seeds)), epochs=args.epochs,
                                        progress=show, device=args.device)
    print()
    print(terminal_table(summarize(results), "perplexity"))
    print(f"\nreport: {files['html']}")


def _run_ptb(args) -> None:
    from .lab import ptb
    from .lab.report import against_published

    if args.variants is not None:
        _run_ptb_placements(args)
        return

    def show(record: dict) -> None:
        print(f"epoch {record['epoch']}: train perplexity {record['train_metric']:.1f}, valid perplexity "
              f"{record['val_metric']:.1f}, learning rate {record['learning_rate']:.4g}, {record['seconds']:.0f} s",
              flush=True)

    out = args.out or f"runs/ptb-{args.preset}"
    if (Path(out) / "checkpoint.pt").exists():
        checkpoint = Path(out) / "checkpoint.pt"
        print(f"resuming from {checkpoint}: {ptb.checkpoint_summary(checkpoint)}", flush=True)
    results, files = ptb.run(args.preset, out=out, seed=args.seed, epochs=args.epochs, progress=show,
                             device=args.device)
    trial = results["trials"][0]
    print("\n".join(against_published(trial, "perplexity")) or f"test perplexity: {trial['test_metric']:.1f}")
    print(f"{trial['wall_seconds'] / 60:.1f} minutes\nreport: {files['html']}")


def _run_masks(args) -> None:
    from .errors import check_out_dir, check_rate
    from .lab.masks import draw_variants
    from .lab.variants import LAYERS, check_variants

    where = "droprnn masks"
    if args.layer not in LAYERS:
        raise DroprnnError(f"{where}: argument `--layer` expected one of {', '.join(LAYERS)}, got {args.layer!r}.")
    for name in ("units", "features", "steps"):
        check_positive_int(where, f"--{name}", getattr(args, name))
    check_out_dir(where, args.out)
    images = draw_variants(layer=args.layer, units=args.units, features=args.features, steps=args.steps,
                           rate=check_rate(where, "--rate", args.rate, allow_one=False),
                           variants=check_variants(where, args.variants), out=args.out, seed=args.seed)
    for name, path in images.items():
        print(f"{name:18s} {path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _Parser(prog="droprnn", description="Recurrent dropout done right, in PyTorch.")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)
    demo = _add_demo(commands)
    _add_lab(commands)
    _add_masks(commands)
    args = parser.parse_args(argv)
    try:
        if args.command == "lab" and args.lab_task == "ptb":
            _run_ptb(args)
        elif args.command == "lab":
            _run_lab(args)
        elif args.command == "masks":
            _run_masks(args)
        else:
            from . import demo as demo_module

            if args.command is None:
                args = demo.parse_args([])
            for name in ("steps", "features"):
                check_positive_int("droprnn demo", f"--{name}", getattr(args, name))
            demo_module.run(steps=args.steps, features=args.features, units=args.features, rate=args.rate,
                            seed=args.seed)
    except DroprnnError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
