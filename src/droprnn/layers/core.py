"""Thin Keras-named layers so a Keras tutorial translates line by line: ``Sequential``, ``Dense``,
``Embedding`` and ``Masking``."""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import activations, initializers
from ..errors import DroprnnError, check_positive_int, fail, type_name
from ..kernels import dense
from .base import Layer, declared_input_size, float_input, sequence_mask

Tensor = torch.Tensor


class Sequential(Layer):
    """A stack of layers called in order, passing the (B, T) mask along as Keras does.

    A mask comes from ``mask=`` / ``lengths=`` or from a layer that makes one (``Embedding(mask_zero=True)``,
    ``Masking``); each droprnn layer receives it and hands on ``compute_mask(x, mask)``. Plain
    ``nn.Module`` layers may be added too; they receive only the tensor and end the mask.
    """

    accepts_lengths = True

    def __init__(self, layers: Optional[Iterable[nn.Module]] = None, name: Optional[str] = None) -> None:
        super().__init__(name)
        self.layers = nn.ModuleList()
        for layer in layers or ():
            self.add(layer)

    def add(self, layer: nn.Module) -> None:
        """Append ``layer``; as Keras does, build its weights now when the feature size reaching it is known
        (the first layer was given ``input_shape=``), so the model is whole before it is compiled or exported."""
        if not isinstance(layer, nn.Module):
            raise fail(self.where, "layer", "an nn.Module (a droprnn layer or any torch module)", type_name(layer))
        features = self.output_features(None)
        if isinstance(layer, Layer) and not layer.built and features is not None:
            parameters = list(self.parameters())
            factory = {"dtype": parameters[-1].dtype, "device": parameters[-1].device} if parameters else {}
            layer.build(features, **factory)
        self.layers.append(layer)

    @property
    def input_features(self) -> Optional[int]:
        return next(iter(self.layers)).input_features if len(self.layers) and isinstance(self.layers[0], Layer) else None

    def output_features(self, features: Optional[int]) -> Optional[int]:
        for layer in self.layers:
            if not isinstance(layer, Layer):
                return None
            features = layer.output_features(layer.input_features or features)
        return features

    def pop(self) -> nn.Module:
        if not len(self.layers):
            raise DroprnnError(f"{self.where}: pop() on a model with no layers.")
        layer = self.layers[-1]
        del self.layers[-1]
        return layer

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> nn.Module:
        return self.layers[index]

    def keras_weights(self) -> list[nn.Parameter]:
        weights = []
        for layer in self.layers:
            if isinstance(layer, Layer):
                weights.extend(layer.keras_weights())
            elif any(True for _ in layer.parameters()):
                raise DroprnnError(
                    f"{self.where}: layer {type(layer).__name__} is not a droprnn layer and has no Keras weight layout."
                )
        return weights

    def compute_mask(self, x: Tensor, mask: Optional[Tensor] = None) -> Optional[Tensor]:
        # What the inner layers hand on is only known by running them; a nested Sequential ends the mask.
        return None

    def forward(
        self, x: Any, mask: Optional[Tensor] = None, lengths: Optional[Tensor] = None, training: Optional[bool] = None
    ) -> Tensor:
        if not len(self.layers):
            raise DroprnnError(f"{self.where}: the model has no layers; add some with .add(layer).")
        if mask is not None or lengths is not None:
            if not torch.is_tensor(x) or x.dim() < 2:
                raise fail(self.where, "inputs", "a (batch, time, ...) tensor when a mask or lengths is given", type_name(x))
            mask, lengths = sequence_mask(self.where, mask, lengths, x.shape[0], x.shape[1], x.device)
        # `training` goes down as given: None lets each layer follow its own mode (see mc_dropout_mode).
        for layer in self.layers:
            if isinstance(layer, Layer):
                next_mask = layer.compute_mask(x, mask)
                if lengths is not None and layer.accepts_lengths:  # the same steps, as lengths
                    x = layer(x, lengths=lengths, training=training)
                else:
                    x = layer(x, mask=mask, training=training)
                if next_mask is not mask:  # a layer that changes the mask ends what the lengths say
                    lengths = None
                mask = next_mask
            else:
                x = layer(x)
                mask = lengths = None
        return x

    def summary(self) -> str:
        """A table of layers and parameter counts (returned and printed)."""
        rows = [("layer", "type", "params")]
        for layer in self.layers:
            name = getattr(layer, "name", "")
            rows.append((name, type(layer).__name__, f"{sum(p.numel() for p in layer.parameters()):,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.append(f"total params: {self.count_params():,}")
        text = "\n".join(lines)
        print(text)
        return text


class Dense(Layer):
    """``activation(x @ kernel + bias)`` on the last axis; kernel (in, units) as Keras.

    Input (..., D) → (..., units). The mask passes through.
    """

    def __init__(
        self,
        units: int,
        activation: activations.ActivationLike = None,
        use_bias: bool = True,
        kernel_initializer: initializers.InitializerLike = "glorot_uniform",
        bias_initializer: initializers.InitializerLike = "zeros",
        input_shape: Optional[Sequence[Any]] = None,
        input_size: Optional[int] = None,
        name: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
        device: Any = None,
    ) -> None:
        super().__init__(name)
        self.units = check_positive_int(self.where, "units", units)
        self.activation = activations.get(activation, self.where, "activation")
        self.use_bias = bool(use_bias)
        self.kernel_initializer = initializers.get(kernel_initializer, self.where, "kernel_initializer")
        self.bias_initializer = initializers.get(bias_initializer, self.where, "bias_initializer")
        self.input_size: Optional[int] = None
        self.register_parameter("kernel", None)
        self.register_parameter("bias", None)
        size = declared_input_size(self.where, input_shape, input_size)
        if size is not None:
            self.build(size, dtype=dtype, device=device)

    @property
    def built(self) -> bool:
        return self.input_size is not None

    @property
    def input_features(self) -> Optional[int]:
        return self.input_size

    def output_features(self, features: Optional[int]) -> Optional[int]:
        return self.units

    def build(self, input_size: int, dtype: Optional[torch.dtype] = None, device: Any = None) -> None:
        if self.built:
            return
        self.input_size = check_positive_int(self.where, "input_size", input_size)
        factory = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        self.kernel = nn.Parameter(torch.empty(input_size, self.units, **factory))
        if self.use_bias:
            self.bias = nn.Parameter(torch.empty(self.units, **factory))
        self.reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        kernel = state_dict.get(prefix + "kernel")  # weights loaded into a Dense without them build it (Cell does too)
        if not self.built and torch.is_tensor(kernel) and kernel.dim() == 2:
            self.build(kernel.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_parameters(self) -> None:
        if not self.built:
            return
        with torch.no_grad():
            self.kernel.copy_(self.kernel_initializer(self.kernel.shape, self.kernel.dtype, self.kernel.device))
            if self.bias is not None:
                self.bias.copy_(self.bias_initializer(self.bias.shape, self.bias.dtype, self.bias.device))

    def keras_weights(self) -> list[nn.Parameter]:
        if not self.built:
            raise DroprnnError(f"{self.where}: weights do not exist yet; give `input_shape=` or call the layer once.")
        return [p for p in (self.kernel, self.bias) if p is not None]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, units={self.units}, input_size={self.input_size}"

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, training: Optional[bool] = None) -> Tensor:
        x = float_input(self.where, x, self.kernel.dtype if self.built else None)
        if x.dim() == 0:
            raise fail(self.where, "inputs", "a tensor of shape (..., features)", "a scalar")
        if not self.built:
            self.build_for_input(x.shape[-1], x)
        elif x.shape[-1] != self.input_size:
            raise fail(self.where, "inputs", f"{self.input_size} features on the last axis", f"shape {tuple(x.shape)}")
        # One product with the bias, as torch.nn.Linear (under autocast too: a separate bias add would promote),
        # by the library this machine runs faster (kernels/dense.py).
        return self.activation(dense.linear(x, self.kernel, self.bias))


class Embedding(Layer):
    """Integer ids (B, T) → vectors (B, T, output_dim); weight ``embeddings`` (input_dim, output_dim).

    With ``mask_zero=True`` id 0 is padding: ``compute_mask(ids)`` is ``ids != 0``, and Sequential passes
    it to the next layers (an RNN then skips the padded steps).
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        embeddings_initializer: initializers.InitializerLike = "uniform",
        mask_zero: bool = False,
        name: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
        device: Any = None,
    ) -> None:
        super().__init__(name)
        self.input_dim = check_positive_int(self.where, "input_dim", input_dim)
        self.output_dim = check_positive_int(self.where, "output_dim", output_dim)
        self.embeddings_initializer = initializers.get(embeddings_initializer, self.where, "embeddings_initializer")
        self.mask_zero = bool(mask_zero)
        self.embeddings = nn.Parameter(
            torch.empty(self.input_dim, self.output_dim, dtype=dtype or torch.get_default_dtype(), device=device)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            e = self.embeddings
            e.copy_(self.embeddings_initializer(e.shape, e.dtype, e.device))

    def keras_weights(self) -> list[nn.Parameter]:
        return [self.embeddings]

    def output_features(self, features: Optional[int]) -> Optional[int]:
        return self.output_dim

    def extra_repr(self) -> str:
        return f"name={self.name!r}, input_dim={self.input_dim}, output_dim={self.output_dim}, mask_zero={self.mask_zero}"

    def _ids(self, ids: Any) -> Tensor:
        ids = torch.as_tensor(ids)
        if ids.is_floating_point():
            ids = ids.long()
        if ids.dtype not in (torch.int32, torch.int64):
            ids = ids.long()
        if not ids.numel():
            return ids
        # Reading the range back would wait for the GPU at every call, and cannot be part of a compiled
        # program: check it on the device there.
        if ids.is_cuda or torch.compiler.is_compiling():
            self._assert_ids_in_range(ids)
        elif int(ids.min()) < 0 or int(ids.max()) >= self.input_dim:
            raise fail(self.where, "inputs", f"ids in [0, {self.input_dim - 1}]", f"ids in [{int(ids.min())}, {int(ids.max())}]")
        return ids

    def _assert_ids_in_range(self, ids: Tensor) -> None:
        """The range check queued on the ids' device: it fails at the next synchronisation (as a device-side
        assertion on a GPU), never making the host wait."""
        inside = (ids.min() >= 0) & (ids.max() < self.input_dim)
        torch._assert_async(inside, f"{self.where}: argument `inputs` expected ids in [0, {self.input_dim - 1}]")

    def compute_mask(self, x: Tensor, mask: Optional[Tensor] = None) -> Optional[Tensor]:
        if not self.mask_zero:
            return mask
        return torch.as_tensor(x) != 0

    def forward(self, ids: Any, mask: Optional[Tensor] = None, training: Optional[bool] = None) -> Tensor:
        return F.embedding(self._ids(ids), self.embeddings)


class Masking(Layer):
    """Mark timesteps whose features all equal ``mask_value`` as padding.

    ``compute_mask(x)`` is ``any(x != mask_value, axis=-1)`` of shape (B, T); the output zeroes the masked
    timesteps (as Keras). ``mask_value=float("nan")`` marks the steps whose features are all NaN (NaN equals
    nothing, so Keras's comparison would mark none). Input and output (B, T, F).
    """

    def __init__(self, mask_value: float = 0.0, name: Optional[str] = None) -> None:
        super().__init__(name)
        if isinstance(mask_value, bool) or not isinstance(mask_value, numbers.Real):
            raise fail(self.where, "mask_value", "a number (the padding value; float('nan') for NaN padding)",
                       repr(mask_value))
        self.mask_value = float(mask_value)
        self.masks_nan = math.isnan(self.mask_value)  # decided once: compiled programs cannot call math.isnan

    def extra_repr(self) -> str:
        return f"name={self.name!r}, mask_value={self.mask_value}"

    def compute_mask(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        x = torch.as_tensor(x)
        if x.dim() < 2:
            raise fail(self.where, "inputs", "a tensor of shape (batch, time, features)", f"shape {tuple(x.shape)}")
        if self.masks_nan:
            return ~torch.isnan(x).all(dim=-1)
        return (x != self.mask_value).any(dim=-1)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, training: Optional[bool] = None) -> Tensor:
        keep = self.compute_mask(x)
        return torch.where(keep[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
