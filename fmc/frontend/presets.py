"""Built-in architectures by name, as Hugging Face config dicts (weights come separately).

Each family declares its own presets (fmc/frontend/archs/); this is their union, built-ins
only (`fmc.frontend.archs.registry.presets()` includes plugins' too)."""

from __future__ import annotations

from fmc.frontend.archs.registry import presets as _presets

PRESETS: dict[str, dict] = _presets()
