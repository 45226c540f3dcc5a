"""`python -m fmc` runs the command line, like the `fmc` script."""

from fmc.cli import entry

entry()
