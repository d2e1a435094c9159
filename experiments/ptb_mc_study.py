"""Why does MC dropout not beat the single pass on droprnn's Penn Treebank models? A trained run, measured.

Gal & Ghahramani report MC dropout (averaging the word probabilities of many stochastic passes) 1.1
perplexity better than the single deterministic pass on their medium model. droprnn's runs find it no
better (``gal-small``: 100.4 against 100.1). This script takes a finished run's checkpoint (``droprnn lab
ptb --preset gal-small`` writes ``checkpoint.pt`` in its run directory) and measures on the test stream:

1. the single pass, and MC dropout after 1, 2, 5, 10, 20, 50, ... passes, every site sampled and every word
   kept (as Gal's scripts): how far the average has converged;
2. the same with one kind of site sampled at a time, the others deterministic: the LSTMs' input masks
   (``dropout=``), their recurrent masks (``recurrent_dropout=``), the output mask (the ``Dropout`` layers);
   on request (``--sites``) also the word types dropped from the embedding (``words``), which Gal's scripts
   keep at test time and droprnn's first ``gal-medium`` recipe dropped in its passes;
3. per token, MC against the single pass: the share of tokens MC gives more probability, and the mean
   log-ratio by how confident the single pass was (the tokens it gave p < 0.01, 0.01-0.1, 0.1-0.5, > 0.5),
   with each group's share of the total difference;
4. the single pass made flatter instead: its logits divided by the temperature that is best on the
   validation stream, and the test perplexity there.

    python experiments/ptb_mc_study.py results/ptb-gal-small             # writes mc-study.json there
    python experiments/ptb_mc_study.py results/ptb-gal-small --samples 30 --tokens 20000
    python experiments/ptb_mc_study.py runs/ptb-gal-medium --device cuda
    python experiments/ptb_mc_study.py runs/ptb-gal-medium --sites input+recurrent+output,input
    python experiments/ptb_mc_study.py runs/ptb-gal-medium --sites input+recurrent+output+words

A long experiment, not a test: 100 passes over the test set take minutes per set of sites on a CPU (10 to 12
minutes on the medium model, 2 cores of a Zen 5 EPYC, 2026-12-05). It writes its record after every set of
sites and, run again on the same checkpoint with the same samples and tokens, keeps every set already measured
and measures only the others: a stopped run resumes, and ``--sites`` adds sets to a finished one. Within a set
it keeps the passes so far every 5 minutes (``mc-study.partial.pt`` beside the record), and a rerun continues
from them. Each set's masks come from a seed of its own (``--seed`` and the set's name), so a set measures the
same whether it ran alone, after others, or stopped and resumed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Optional

import torch

from droprnn import datasets
from droprnn.cells import Cell
from droprnn.lab import ptb
from droprnn.layers.dropout import Dropout

CHECKPOINTS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
SITES = ("input", "recurrent", "output")  # the sites Gal's MC dropout samples: the default sets
OPTIONAL_SITES = ("words",)  # word-type dropout in the embedding, sampled only when asked
CONFIDENCE = ((0.0, 0.01), (0.01, 0.1), (0.1, 0.5), (0.5, 1.0))
SAVE_EVERY = 300.0  # seconds between saves of a set's passes so far


def load(run: Path, device: str = "cpu") -> tuple[ptb.Preset, torch.nn.Module]:
    saved = torch.load(run / "checkpoint.pt", map_location=device, weights_only=False)
    preset = ptb.Preset(**saved["preset"])
    model = ptb.build_model(preset, device=device)
    model.load_state_dict(saved["model"])
    return preset, model


@contextlib.contextmanager
def sampled(model: torch.nn.Module, sites: tuple[str, ...]):
    """Within the block only ``sites`` are stochastic in MC mode: the other rates are 0 (deterministic). The
    word types (``words``) are the passes' own switch (``set_passes``'s ``word_dropout``)."""
    saved = []
    for module in model.modules():
        if isinstance(module, Cell):
            for name, site in (("dropout", "input"), ("recurrent_dropout", "recurrent")):
                saved.append((module, name, getattr(module, name)))
                if site not in sites:
                    setattr(module, name, 0.0)
        elif isinstance(module, Dropout):
            saved.append((module, "rate", module.rate))
            if "output" not in sites:
                module.rate = 0.0
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def perplexity_of(probabilities: torch.Tensor) -> float:
    """exp of the mean negative log of per-token probabilities (tokens,)."""
    return math.exp(-torch.log(probabilities).mean().item())


def curve(passes: torch.Tensor) -> dict[int, float]:
    """MC perplexity after the first n passes, for the CHECKPOINTS up to the number of passes."""
    running = passes.cumsum(0)
    return {n: perplexity_of(running[n - 1] / n) for n in CHECKPOINTS if n <= passes.shape[0]}


def per_token(single: torch.Tensor, averaged: torch.Tensor) -> dict:
    log_ratio = torch.log(averaged) - torch.log(single)  # > 0 where MC gives the target more probability
    total = log_ratio.sum().item()
    groups = []
    for low, high in CONFIDENCE:
        chosen = (single >= low) & (single < high) if high < 1.0 else single >= low
        count = int(chosen.sum())
        part = log_ratio[chosen].sum().item() if count else 0.0
        groups.append({"single_p": [low, high], "tokens": count, "share_of_tokens": count / single.numel(),
                       "mean_log_ratio": part / count if count else None,
                       "share_of_difference": part / total if total else None})
    return {"mc_more_probable": (log_ratio > 0).float().mean().item(), "mean_log_ratio": log_ratio.mean().item(),
            "by_confidence": groups}


def _log_probabilities(model: torch.nn.Module, stream, temperatures: tuple[float, ...]) -> torch.Tensor:
    """The deterministic pass's log-probability of each target with its logits divided by each temperature,
    (temperatures, tokens - 1) float64: one pass for all of them."""
    model.eval()
    ptb._reset(model)
    data = ptb.batchify(stream, 1).to(next(model.parameters()).device)
    out = []
    with torch.no_grad():
        for x, y in ptb.segments(data, ptb.EVAL_BPTT):
            logits = model(x)[0]
            target = y[0].unsqueeze(-1)
            out.append(torch.stack([torch.log_softmax(logits / tau, -1).gather(-1, target).squeeze(-1)
                                    for tau in temperatures]).double())
    ptb._reset(model)
    return torch.cat(out, dim=1)


def single_pass(model: torch.nn.Module, stream) -> torch.Tensor:
    """The deterministic pass's probability of each target (tokens - 1,)."""
    return _log_probabilities(model, stream, (1.0,))[0].exp()


def tempered(model: torch.nn.Module, stream, temperatures: tuple[float, ...]) -> dict[float, float]:
    """The single pass's perplexity with its logits divided by each temperature (one pass for all)."""
    log_p = _log_probabilities(model, stream, temperatures)
    return {tau: math.exp(-row.mean().item()) for tau, row in zip(temperatures, log_p)}


def temperature_study(model: torch.nn.Module, tokens: Optional[int] = None) -> dict:
    """Does a flatter single pass do what MC does? The temperature with the best validation perplexity
    (a grid from 0.95 to 1.15 by 0.01), and the test perplexity at it (on each stream's first ``tokens``)."""
    data = datasets.load("ptb")
    grid = tuple(round(0.95 + 0.01 * k, 2) for k in range(21))
    valid = tempered(model, data.valid[:tokens], grid)
    best = min(valid, key=valid.get)
    test = tempered(model, data.test[:tokens], (1.0, best))
    return {"valid": valid, "best": best, "test_at_1": test[1.0], "test_at_best": test[best]}


def site_sets(text: str) -> list[tuple[str, ...]]:
    """``--sites``: comma-separated sets, each of SITES and OPTIONAL_SITES joined by '+' (e.g.
    ``input+recurrent,output``)."""
    known = SITES + OPTIONAL_SITES
    sets = [tuple(part.split("+")) for part in text.split(",") if part]
    for chosen in sets:
        unknown = [site for site in chosen if site not in known]
        if unknown or len(set(chosen)) != len(chosen):
            raise SystemExit(f"--sites: {'+'.join(chosen)!r} is not a set of {', '.join(known)} joined by '+'")
    return sets


def keep_passes(partial: Path, key: dict, passes: torch.Tensor, device: str) -> None:
    """Write a set's passes so far, with the random streams, to ``partial`` (atomically)."""
    staged = partial.with_name(partial.name + ".tmp")
    torch.save({"key": key, "passes": passes.cpu(), "rng": ptb._rng_states(device)}, staged)
    os.replace(staged, partial)


def set_passes(model: torch.nn.Module, test, samples: int, partial: Path, key: dict, device: str,
               word_dropout: bool = False) -> torch.Tensor:
    """The set's MC passes (``sampled`` already applied; ``word_dropout``: the passes drop word types too),
    continuing from ``partial`` where it holds the same ``key`` (an earlier run stopped inside this set),
    keeping the passes there every SAVE_EVERY seconds."""
    progress = None
    if partial.exists():
        saved = torch.load(partial, weights_only=False)
        if saved.get("key") == key:
            progress = {"passes": saved["passes"].to(device)}
            ptb._set_rng_states(saved["rng"], device)
    last = time.perf_counter()

    def keep(state: dict) -> None:
        nonlocal last
        if state["done"] < samples and time.perf_counter() - last >= SAVE_EVERY:
            keep_passes(partial, key, state["passes"], device)
            last = time.perf_counter()

    passes = ptb.mc_probabilities(model, test, samples, word_dropout=word_dropout, progress=progress,
                                  on_progress=keep)
    partial.unlink(missing_ok=True)
    return passes


def previous_record(out: Path, record: dict) -> dict:
    """What ``out`` holds from a study of the same checkpoint, passes and tokens (the same single pass), else
    nothing: the part a resumed study keeps."""
    if not out.exists():
        return {}
    earlier = json.loads(out.read_text())
    same = all(earlier.get(key) == record[key] for key in ("run", "preset", "tokens", "samples"))
    return earlier if same and math.isclose(earlier["single"], record["single"], rel_tol=1e-9) else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run directory of droprnn lab ptb (with checkpoint.pt)")
    parser.add_argument("--samples", type=int, default=100, help="MC passes per measurement")
    parser.add_argument("--tokens", type=int, default=None, help="the first N tokens of each stream (default: all)")
    parser.add_argument("--sites", default=",".join(["+".join(SITES), *SITES]),
                        help="the sets of sites sampled, comma-separated, each joined by '+' (default: "
                             "input, recurrent and output together, then each alone; 'words' adds the "
                             "embedding's word-type dropout)")
    parser.add_argument("--seed", type=int, default=0, help="with each set's name, the seed of its masks")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=None, help="default: <run>/mc-study.json")
    parser.add_argument("--temperature-only", action="store_true",
                        help="only the temperature study, added to an existing mc-study.json")
    args = parser.parse_args()
    sets = site_sets(args.sites)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset, model = load(args.run, args.device)
    out = args.out or args.run / "mc-study.json"
    if args.temperature_only:
        result = json.loads(out.read_text())
        result["temperature"] = temperature_study(model, args.tokens)
        out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["temperature"], indent=1))
        return 0
    test = datasets.load("ptb").test[:args.tokens]
    started = time.perf_counter()
    single = single_pass(model, test)
    result = {"run": str(args.run), "preset": preset.name, "tokens": int(single.numel()), "samples": args.samples,
              "single": perplexity_of(single), "sites": {}}
    print(f"{preset.name}, {single.numel()} test tokens: single pass {result['single']:.2f}", flush=True)
    earlier = previous_record(out, result)
    result["sites"] = dict(earlier.get("sites", {}))  # every set measured before stays in the record
    for sites in sets:
        name = "+".join(sites)
        if name in result["sites"]:
            print(f"MC, sampling {name}: kept from {out}", flush=True)
            continue
        torch.manual_seed(args.seed + zlib.crc32(name.encode()))
        key = {**{k: result[k] for k in ("run", "preset", "tokens", "samples", "single")}, "sites": name,
               "seed": args.seed}
        with sampled(model, sites):
            passes = set_passes(model, test, args.samples, out.with_name(out.stem + ".partial.pt"), key, args.device,
                                word_dropout="words" in sites)
        result["sites"][name] = {"curve": curve(passes), "one_pass": perplexity_of(passes[0]),
                                 "per_token": per_token(single, passes.mean(0))}
        out.write_text(json.dumps(result, indent=1))  # a stopped study resumes after the last set written
        points = ", ".join(f"{n}: {v:.2f}" for n, v in result["sites"][name]["curve"].items())
        print(f"MC, sampling {name}: {points} ({time.perf_counter() - started:.0f} s)", flush=True)
    result["temperature"] = earlier.get("temperature") or temperature_study(model, args.tokens)
    print(f"single pass at temperature {result['temperature']['best']} (best on validation): "
          f"{result['temperature']['test_at_best']:.2f}")
    out.write_text(json.dumps(result, indent=1))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
