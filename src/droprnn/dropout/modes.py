"""The named dropout schemes a recurrent cell can use, with what each means (the single list of them)."""

from __future__ import annotations

from ..errors import DroprnnError

RECURRENT_MODES: dict[str, str] = {
    "keras": "one mask per gate on h(t-1) where it enters the recurrent kernel, drawn once per sequence "
    "(Keras 3 >= 3.8; Gal & Ghahramani's untied variant)",
    "tied": "one mask on h(t-1) shared by all gates, drawn once per sequence (Gal & Ghahramani's tied variant)",
    "per_step": "one mask per gate on h(t-1), drawn afresh at every step (the naive scheme)",
    "update": "one mask on the cell update (LSTM's g, GRU's candidate) per sequence; memory is never erased "
    "(Semeniuta et al. 2016)",
    "update_per_step": "as 'update', with a fresh mask at every step",
    "weights": "DropConnect on recurrent_kernel: one mask over the matrix per call, shared by the batch "
    "(Wan et al. 2013; AWD-LSTM's WeightDrop)",
    "weights_per_unit": "DropConnect on whole rows of recurrent_kernel (one unit's outgoing weights), per call, "
    "shared by the batch",
}

INPUT_MODES: dict[str, str] = {
    "keras": "as Keras: one mask per gate when Keras-style recurrent dropout is on, else one shared mask; "
    "drawn once per sequence",
    "shared": "one mask shared by all gates, drawn once per sequence",
    "per_gate": "one mask per gate, drawn once per sequence",
    "per_step": "one mask shared by all gates, drawn afresh at every step (Keras 2's cuDNN-path behaviour)",
}

UPDATE_MODES = ("update", "update_per_step")
WEIGHT_MODES = ("weights", "weights_per_unit")


def check_mode(where: str, argument: str, value: object, modes: dict[str, str]) -> str:
    if not isinstance(value, str) or value not in modes:
        listing = "\n".join(f"  {name!r}: {meaning}" for name, meaning in modes.items())
        raise DroprnnError(f"{where}: argument `{argument}` expected one of the modes below, got {value!r}.\n{listing}")
    return value
