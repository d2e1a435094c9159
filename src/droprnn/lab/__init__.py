"""The dropout lab: train one recurrent model with each dropout placement over several seeds and report the results.

``droprnn lab`` (classification on real series or text) and ``droprnn lab ptb`` (Penn Treebank language
modelling) are the commands; from Python::

    from droprnn.lab import LabConfig, run_lab
    results, files = run_lab(LabConfig(variants="none,both", seeds=2, out="runs/mine"))
"""

from .config import LabConfig
from .runner import run_lab
from .variants import VARIANTS

__all__ = ["LabConfig", "VARIANTS", "run_lab"]
