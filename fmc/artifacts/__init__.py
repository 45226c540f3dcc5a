"""Artifacts: the output directory (library, weight shards, tokenizer, manifest.json)."""
