"""fmc's own IR passes, one per module."""
