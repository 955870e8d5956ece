"""Entry point of ``python -m hvpfunc``; see :mod:`hvpfunc.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
