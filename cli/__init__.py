"""The `minillm` console script. This module imports nothing heavy, so that a Ctrl-C while
NumPy and the model code load still ends quietly (exit 130) instead of with a traceback."""

import sys

EXIT_SIGINT = 130


def main() -> None:
    try:
        from .main import main as run

        run()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(EXIT_SIGINT)
