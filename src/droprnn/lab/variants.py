"""The dropout placements the lab compares, each as the exact droprnn code that builds its model.

A variant is a small recipe -- layers before the recurrent layer, the recurrent layer's dropout
arguments, layers after it -- rendered into plain source code. The lab builds every model by running
that source, so the code printed in the report is the code that was trained, and a user can copy it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import DroprnnError

LAYERS = {"lstm": "LSTM", "gru": "GRU"}


@dataclass(frozen=True)
class Variant:
    """One placement. Templates may use ``{rate}``; ``zoneout`` depends on the layer (see :func:`rnn_arguments`)."""

    name: str
    title: str
    description: str
    before: tuple[str, ...] = ()   # layers applied to the input sequence, in order
    rnn: str = ""                  # extra arguments of the recurrent layer
    after: tuple[str, ...] = ()    # layers between the recurrent layer and the classifier


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("none", "no dropout", "The baseline: nothing is dropped."),
    Variant("dropout_after", "Dropout after the RNN",
            "model.add(Dropout(rate)) after the recurrent layer: drops entries of its final output only.",
            after=("droprnn.Dropout({rate})",)),
    Variant("timestep_dropout", "Dropout, timestep noise shape",
            "Dropout(rate, noise_shape=(None, None, 1)) on the input: whole timesteps are zeroed.",
            before=("droprnn.Dropout({rate}, noise_shape=(None, None, 1))",)),
    Variant("spatial_input", "SpatialDropout1D on the input",
            "Whole input channels are zeroed for the entire sequence.",
            before=("droprnn.SpatialDropout1D({rate})",)),
    Variant("dropout", "dropout=", "The layer's input dropout, one mask per sequence. Without recurrent_dropout "
            "Keras shares it across the gates, which makes it the very same masks as SpatialDropout1D on the input.",
            rnn="dropout={rate}"),
    Variant("recurrent_dropout", "recurrent_dropout=",
            "Keras's recurrent dropout: h(t-1) is masked where it meets the recurrent kernel, one mask per gate "
            "per sequence; the carried state itself is never dropped.", rnn="recurrent_dropout={rate}"),
    Variant("both", "dropout= and recurrent_dropout=", "Both sites of the layer, as Gal and Ghahramani.",
            rnn="dropout={rate}, recurrent_dropout={rate}"),
    Variant("tied", "recurrent, tied mask", "One recurrent mask shared by all gates (Gal's tied weights form).",
            rnn="recurrent_dropout={rate}, recurrent_dropout_mode='tied'"),
    Variant("update", "recurrent, on the update", "Semeniuta et al.: the candidate update is dropped, never the memory.",
            rnn="recurrent_dropout={rate}, recurrent_dropout_mode='update'"),
    Variant("per_step", "recurrent, fresh mask per step",
            "A new recurrent mask at every step (the naive placement Gal's analysis warns against).",
            rnn="recurrent_dropout={rate}, recurrent_dropout_mode='per_step'"),
    Variant("weights", "DropConnect on the recurrent kernel",
            "AWD-LSTM's weight drop: entries of the recurrent kernel are dropped, one kernel mask per batch.",
            rnn="recurrent_dropout={rate}, recurrent_dropout_mode='weights'"),
    Variant("zoneout", "zoneout", "Krueger et al.: each state unit keeps its previous value with probability rate.",
            rnn="zoneout"),
)}


def check_variants(where: str, names: Any, known: Mapping[str, Variant] = VARIANTS) -> tuple[str, ...]:
    """Validated variant names (a comma-separated string or a sequence) from ``known``, in the order given."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = tuple(names)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        got = f"unknown {', '.join(map(repr, unknown))}" if unknown else "no names"
        raise DroprnnError(f"{where}: argument `--variants` expected names from {', '.join(known)}; got {got}.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DroprnnError(f"{where}: argument `--variants` lists {', '.join(map(repr, repeated))} more than once; "
                           "each variant runs once per seed.")
    return names


def rnn_arguments(variant: Variant, layer: str, rate: float) -> str:
    if variant.rnn != "zoneout":
        return variant.rnn.format(rate=rate)
    return f"zoneout_h={rate}, zoneout_c={rate}" if layer == "lstm" else f"zoneout_h={rate}"


def model_code(variant: Variant, *, layer: str, units: int, rate: float, inputs: tuple[str, ...], classes: int,
               rnn_input: str = "") -> str:
    """The source that builds the variant's model into ``model``.

    ``inputs`` are the layers that turn raw input into vectors (an Embedding for text, nothing for
    series); ``rnn_input`` is a keyword naming the recurrent layer's input size (e.g. ``input_size=12``).
    """
    arguments = ", ".join(a for a in (str(units), rnn_input, rnn_arguments(variant, layer, rate)) if a)
    layers = [*inputs, *(b.format(rate=rate) for b in variant.before), f"droprnn.{LAYERS[layer]}({arguments})",
              *(a.format(rate=rate) for a in variant.after), f"droprnn.Dense({classes}, input_size={units})"]
    return "model = droprnn.Sequential([\n" + "".join(f"    {line},\n" for line in layers) + "])\n"


def build(code: str):
    """Run a variant's code; returns the ``model`` it defines."""
    import droprnn

    namespace: dict[str, Any] = {"droprnn": droprnn}
    exec(compile(code, "<droprnn lab variant>", "exec"), namespace)  # noqa: S102 - our own rendered source
    return namespace["model"]
