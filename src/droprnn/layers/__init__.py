"""Keras-named layers: recurrent layers, wrappers and the thin core layers."""

from .base import Layer
from .core import Dense, Embedding, Masking, Sequential
from .recurrent import GRU, LSTM, RNN, SimpleRNN, StackedCells
from .wrappers import Bidirectional, TimeDistributed

__all__ = [
    "Bidirectional", "Dense", "Embedding", "GRU", "LSTM", "Layer", "Masking", "RNN", "Sequential", "SimpleRNN",
    "StackedCells", "TimeDistributed",
]
