"""droprnn: recurrent neural networks in PyTorch with dropout done right.

Keras-exact recurrent layers and dropout (``LSTM(dropout=, recurrent_dropout=)``, ``Dropout(noise_shape=)``
…) as ordinary ``nn.Module`` objects. ``import droprnn`` loads torch and numpy only.
"""

from .cells import Cell, GRUCell, LSTMCell, SimpleRNNCell
from . import nn
from .layers.dropout import (
    AlphaDropout, Dropout, EmbeddingDropout, GaussianDropout, GaussianNoise, LockedDropout, SpatialDropout1D,
    TimestepDropout, WordDropout,
)
from .dropout.mc import mc_dropout_mode, mc_predict
from .dropout.plan import CellMasks, DropoutPlan
from .errors import DroprnnError
from .interop.keras import from_keras
from .diagnostics import explain
from .layers import (
    GRU, LSTM, RNN, Bidirectional, Dense, Embedding, Layer, Masking, Sequential, SimpleRNN, TimeDistributed,
)
from .random import CounterMask

__version__ = "0.1.0"

__all__ = [
    "AlphaDropout", "Bidirectional", "Cell", "CellMasks", "CounterMask", "Dense", "Dropout", "DropoutPlan", "DroprnnError",
    "Embedding", "EmbeddingDropout", "GRU", "GRUCell", "GaussianDropout", "GaussianNoise", "LSTM", "LSTMCell",
    "Layer", "LockedDropout", "Masking", "RNN", "Sequential", "SimpleRNN", "SimpleRNNCell", "SpatialDropout1D",
    "TimeDistributed", "TimestepDropout", "WordDropout", "explain", "from_keras", "mc_dropout_mode", "mc_predict", "nn",
]
