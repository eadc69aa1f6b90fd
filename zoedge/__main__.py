"""``python -m zoedge``: the ``zoedge`` command line."""
import sys

from zoedge.cli import main

if __name__ == "__main__":
    sys.exit(main())
