"""Dropout: the per-call mask plan of recurrent layers and the dropout-family layers."""

from .layers import AlphaDropout, Dropout, GaussianDropout, GaussianNoise, SpatialDropout1D
from .plan import CellMasks, DropoutPlan, draw_cell_masks, draw_plan

__all__ = [
    "AlphaDropout", "CellMasks", "Dropout", "DropoutPlan", "GaussianDropout", "GaussianNoise",
    "SpatialDropout1D", "draw_cell_masks", "draw_plan",
]
