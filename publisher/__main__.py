"""Entry point for ``python -m publisher``."""

import sys

from publisher.cli import main

if __name__ == "__main__":
    sys.exit(main())
