"""Sub-commands of `python -m suite`: one module each (see suite/cli.py)."""
