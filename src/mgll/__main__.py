"""``python -m mgll`` is the same as the ``mgll`` command."""

import sys

from mgll.cli import main

if __name__ == "__main__":
    sys.exit(main())
