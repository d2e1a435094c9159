"""Keras 3 models to droprnn: ``from_keras(model)`` builds the equivalent layers with the same weights.

Keras is an optional extra (``pip install droprnn[keras]``) and is never imported here: the function only
reads the objects it is given (``get_config()``, ``get_weights()``), whatever Keras backend made them.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

from torch import nn

from .. import activations
from ..cells import Cell, GRUCell, LSTMCell, SimpleRNNCell
from ..layers.dropout import AlphaDropout, Dropout, GaussianDropout, GaussianNoise, SpatialDropout1D
from ..errors import DroprnnError
from ..layers.core import Dense, Embedding, Masking, Sequential
from ..layers.recurrent import GRU, LSTM, RNN, SimpleRNN
from ..layers.wrappers import Bidirectional, TimeDistributed


# Settings that act only while training, which droprnn's layers do not take: converting drops them, and says so.
_TRAINING_ONLY = ("kernel_regularizer", "recurrent_regularizer", "bias_regularizer", "activity_regularizer",
                  "embeddings_regularizer", "kernel_constraint", "recurrent_constraint", "bias_constraint",
                  "embeddings_constraint")


def _config(layer: Any) -> dict:
    """The layer's Keras config; a layer whose config Keras cannot write (a lambda activation, say) is named,
    and the training-only settings the conversion drops are warned about."""
    try:
        config = layer.get_config()
    except Exception as error:  # noqa: BLE001 - Keras raises whatever its serializer meets
        raise DroprnnError(
            f"from_keras: layer '{getattr(layer, 'name', '?')}' ({type(layer).__name__}) has a configuration Keras "
            f"cannot write ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); a lambda or "
            "local function as activation does that: use a named activation, or build that droprnn layer by hand."
        ) from None
    dropped = [f"{key}={_short(config[key])}" for key in _TRAINING_ONLY if config.get(key) is not None]
    if dropped:
        warnings.warn(
            f"from_keras: layer '{layer.name}' ({type(layer).__name__}) has {', '.join(dropped)}, which droprnn's "
            "layers do not take: the converted layer computes the same outputs, but training it applies none of "
            "them (add a penalty to the loss, or apply a constraint after each optimizer step).", stacklevel=5)
    return config


def _short(setting: Any) -> str:
    """A serialized Keras regularizer or constraint as its class and arguments, e.g. L2({'l2': 0.01})."""
    if isinstance(setting, dict) and "class_name" in setting:
        return f"{setting['class_name']}({setting.get('config', {})})"
    return repr(setting)


def _weights(layer: Any) -> list:
    weights = layer.get_weights()
    if not weights:
        raise DroprnnError(f"from_keras: layer '{layer.name}' ({type(layer).__name__}) has no weights yet: the Keras "
                           "model is not built. Build it first (keras.Input in the model, or call it once).")
    return weights


def _activation(value: Any, where: str) -> activations.ActivationLike:
    if value is None or isinstance(value, str) or callable(value):
        return value
    if isinstance(value, dict):  # a serialized Keras activation, e.g. {"class_name": "function", "config": "tanh"}
        name = value.get("config")
        if isinstance(name, str):
            return name
    what = value.get("class_name", "a serialized function") if isinstance(value, dict) else type(value).__name__
    raise DroprnnError(f"from_keras: {where} has an activation droprnn cannot read ({what}: a lambda or custom "
                       "function?); use a named activation in the Keras layer, or build that droprnn layer by hand.")


def _cell_args(config: dict, where: str, *names: str) -> dict:
    args = {"units": config["units"], "activation": _activation(config.get("activation", "tanh"), where)}
    for name in ("use_bias", "dropout", "recurrent_dropout", "seed", *names):
        if name in config:
            args[name] = config[name]
    if "recurrent_activation" in config:
        args["recurrent_activation"] = _activation(config["recurrent_activation"], where)
    return args


_CELL_EXTRAS = {"LSTM": ("unit_forget_bias",), "GRU": ("reset_after",), "SimpleRNN": ()}
# droprnn.keras's layers (Keras layers whose loop runs droprnn) keep droprnn's options in their config.
_DROPRNN_OPTIONS = ("recurrent_dropout_mode", "input_dropout_mode", "zoneout_h", "zoneout_c", "impl")
_RNN_FLAGS = ("return_sequences", "return_state", "go_backwards", "stateful", "unroll", "zero_output_for_mask")


def _recurrent(layer: Any) -> RNN:
    kind = type(layer).__name__
    config = _config(layer)
    flags = {k: config[k] for k in _RNN_FLAGS if k in config}
    weights = _weights(layer)
    input_size = weights[0].shape[0]
    if kind in _CELL_EXTRAS:
        args = _cell_args(config, f"{kind} '{layer.name}'", *_CELL_EXTRAS[kind], *_DROPRNN_OPTIONS)
        cls = {"LSTM": LSTM, "GRU": GRU, "SimpleRNN": SimpleRNN}[kind]
        ours: RNN = cls(**args, **flags, input_size=input_size, name=layer.name)
    else:  # keras.layers.RNN around a cell or StackedRNNCells
        cells = getattr(layer.cell, "cells", [layer.cell])
        ours = RNN([_cell(c) for c in cells], **flags, input_size=input_size, name=layer.name)
    ours.set_weights(weights)
    return ours


def _cell(cell: Any) -> Cell:
    kind = type(cell).__name__
    table = {"LSTMCell": (LSTMCell, "unit_forget_bias"), "GRUCell": (GRUCell, "reset_after"), "SimpleRNNCell": (SimpleRNNCell,)}
    if kind not in table:
        raise DroprnnError(f"from_keras: RNN cell {kind} is not supported; expected one of {', '.join(table)}.")
    cls, *extras = table[kind]
    args = _cell_args(_config(cell), f"{kind} '{cell.name}'", *extras)
    return cls(**args)


def _bidirectional(layer: Any) -> Bidirectional:
    config = _config(layer)
    return Bidirectional(
        _recurrent(layer.forward_layer), merge_mode=config.get("merge_mode", "concat"),
        backward_layer=_recurrent(layer.backward_layer), name=layer.name,
    )


def _dense(layer: Any) -> Dense:
    config = _config(layer)
    weights = _weights(layer)
    ours = Dense(
        config["units"], activation=_activation(config.get("activation"), f"Dense '{layer.name}'"),
        use_bias=config.get("use_bias", True), input_size=weights[0].shape[0], name=layer.name,
    )
    ours.set_weights(weights)
    return ours


def _embedding(layer: Any) -> Embedding:
    config = _config(layer)
    ours = Embedding(config["input_dim"], config["output_dim"], mask_zero=config.get("mask_zero", False), name=layer.name)
    ours.set_weights(_weights(layer))
    return ours


def _time_distributed(layer: Any) -> TimeDistributed:
    return TimeDistributed(convert_layer(layer.layer), name=layer.name)


def _simple(cls: type, *keys: str) -> Callable[[Any], nn.Module]:
    def build(layer: Any) -> nn.Module:
        config = _config(layer)
        return cls(**{k: config[k] for k in keys if k in config}, name=layer.name)

    return build


_CONVERTERS: dict[str, Callable[[Any], nn.Module]] = {
    "LSTM": _recurrent,
    "GRU": _recurrent,
    "SimpleRNN": _recurrent,
    "RNN": _recurrent,
    "Bidirectional": _bidirectional,
    "Dense": _dense,
    "Embedding": _embedding,
    "TimeDistributed": _time_distributed,
    "Dropout": _simple(Dropout, "rate", "noise_shape", "seed"),
    "SpatialDropout1D": _simple(SpatialDropout1D, "rate", "seed"),
    "GaussianDropout": _simple(GaussianDropout, "rate", "seed"),
    "GaussianNoise": _simple(GaussianNoise, "stddev", "seed"),
    "AlphaDropout": _simple(AlphaDropout, "rate", "noise_shape", "seed"),
    "Masking": _simple(Masking, "mask_value"),
}


def convert_layer(layer: Any) -> nn.Module:
    """The droprnn equivalent of one Keras layer, with its weights."""
    kind = type(layer).__name__
    if kind not in _CONVERTERS:
        raise DroprnnError(
            f"from_keras: layer '{getattr(layer, 'name', '?')}' of type {kind} is not supported; "
            f"supported: {', '.join(sorted(_CONVERTERS))}."
        )
    ours = _CONVERTERS[kind](layer)
    if not getattr(layer, "trainable", True):  # a frozen Keras layer stays frozen
        ours.requires_grad_(False)
    return ours


def from_keras(model: Any) -> nn.Module:
    """Build the droprnn equivalent of a Keras ``Sequential`` model (or of a single Keras layer).

    The result has the same weights, so in inference (``.eval()``) it computes what the Keras model
    computes. Supported: LSTM, GRU, SimpleRNN, RNN (with those cells, stacked or not), Bidirectional,
    Dense, Embedding, TimeDistributed, Dropout, SpatialDropout1D, GaussianDropout, GaussianNoise,
    AlphaDropout, Masking. Seeds carry over: seeded dropout layers draw the masks Keras's torch backend
    draws. ``droprnn.keras``'s layers carry their droprnn options over too (``recurrent_dropout_mode``,
    ``input_dropout_mode``, ``zoneout_h``, ``zoneout_c``, ``impl``). A frozen layer (``trainable=False``)
    comes back with ``requires_grad=False``; regularizers and constraints, which act only in training, are
    dropped with a warning that names them.
    """
    kind = type(model).__name__
    if not any(c.__module__.split(".")[0] == "keras" for c in type(model).__mro__):  # droprnn.keras's too
        raise DroprnnError(
            f"from_keras: expected a Keras model or layer, got {type(model).__module__}.{type(model).__qualname__}; "
            "for torch.nn.LSTM / GRU / RNN use droprnn.nn's module of the same name, which loads its state_dict."
        )
    if kind != "Sequential":
        if kind in _CONVERTERS:
            return convert_layer(model)
        raise DroprnnError(
            f"from_keras: expected a keras Sequential model or one supported layer, got {kind}; "
            "functional models are not supported (rebuild them as droprnn layers)."
        )
    ours = Sequential(name=model.name)
    for layer in model.layers:
        if type(layer).__name__ == "InputLayer":
            continue
        ours.add(convert_layer(layer))
    return ours
