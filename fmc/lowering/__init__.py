"""Lowering: the ordered IR passes of the fuse and lower phases, and fmc's own passes."""
