"""What several test modules share, one module per topic; test modules import their
helpers from here, never from one another."""

from pathlib import Path

# The repository's root, for the tests that run its tools or read its files.
ROOT = Path(__file__).resolve().parent.parent.parent
