"""`fmc build`: the builds named in an fmc.toml, each compiled unless up to date."""
