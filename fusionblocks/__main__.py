"""``python -m fusionblocks``: the same command as the ``fusionblocks`` console script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
