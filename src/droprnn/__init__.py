"""droprnn: recurrent neural networks in PyTorch with dropout done right.

Keras-exact recurrent layers and dropout (``LSTM(dropout=, recurrent_dropout=)``, ``Dropout(noise_shape=)``
…) as ordinary ``nn.Module`` objects. ``import droprnn`` loads torch and numpy only.
"""

from .cells import Cell, GRUCell, LSTMCell, SimpleRNNCell
from .dropout import (
    AlphaDropout, CellMasks, Dropout, DropoutPlan, GaussianDropout, GaussianNoise, SpatialDropout1D,
)
from .errors import DroprnnError
from .interop.keras import from_keras
from .layers import (
    GRU, LSTM, RNN, Bidirectional, Dense, Embedding, Layer, Masking, Sequential, SimpleRNN, TimeDistributed,
)

__version__ = "0.1.0"

__all__ = [
    "AlphaDropout", "Bidirectional", "Cell", "CellMasks", "Dense", "Dropout", "DropoutPlan", "DroprnnError",
    "Embedding", "GRU", "GRUCell", "GaussianDropout", "GaussianNoise", "LSTM", "LSTMCell", "Layer", "Masking",
    "RNN", "Sequential", "SimpleRNN", "SimpleRNNCell", "SpatialDropout1D", "TimeDistributed", "from_keras",
]
