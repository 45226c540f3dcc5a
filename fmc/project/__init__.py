"""The fmc.toml project file: its builds (models × targets × quants), each compiled unless up
to date (`fmc build`)."""
