"""``python -m droprnn``: the ``droprnn`` command."""

import sys

from .cli import main

if __name__ == "__main__":  # importing the module (documentation tools do) runs nothing
    sys.exit(main())
