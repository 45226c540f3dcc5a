"""`python -m fmc.cli …` runs the fmc command."""

from fmc.cli import entry

entry()
