"""Entry point of ``python -m registration``."""

import sys

from registration.cli import console_logging, main

if __name__ == "__main__":
    console_logging()
    sys.exit(main())
