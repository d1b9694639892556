"""Entry point of ``python -m registration``."""

import sys

from registration.cli import main

if __name__ == "__main__":
    sys.exit(main())
