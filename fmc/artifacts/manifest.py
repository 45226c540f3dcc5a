"""manifest.json: what an artifact holds and how to load it, with versions and hashes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fmc.errors import ArtifactError

FORMAT = "fmc-artifact"
SCHEMA_VERSION = 1
# Bumped when the library's entry functions or calling convention change incompatibly.
ABI_VERSION = 1
MANIFEST = "manifest.json"


def dumps(manifest: dict[str, Any]) -> str:
    """Canonical JSON: sorted keys, fixed separators, trailing newline (reproducible bytes)."""
    return json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def read_manifest(artifact: Path) -> dict[str, Any]:
    path = Path(artifact) / MANIFEST
    if not Path(artifact).is_dir():
        raise ArtifactError(f"{artifact}: not an artifact directory")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing (not an fmc artifact?)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: corrupt ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an fmc artifact manifest")
    abi = manifest.get("abi_version")
    if not isinstance(abi, int):
        raise ArtifactError(f"{path}: 'abi_version' is missing")
    if abi > ABI_VERSION:
        raise ArtifactError(f"{path}: ABI version {abi} is newer than this fmc supports "
                            f"({ABI_VERSION}); upgrade fmc")
    if abi < ABI_VERSION:
        raise ArtifactError(f"{path}: ABI version {abi} is older than this fmc's "
                            f"({ABI_VERSION}); recompile the artifact")
    for key in ("target", "model", "params", "library", "quantization"):
        if key not in manifest:
            raise ArtifactError(f"{path}: {key!r} is missing")
    return manifest
