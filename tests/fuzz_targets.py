"""Readers of untrusted files as fuzz targets: each returns normally or raises fmc's own
error. Used by tests/test_fuzz.py (hypothesis) and, as a script, by libFuzzer via atheris:

    python tests/fuzz_targets.py {safetensors|gguf|manifest|toml} CORPUS_DIR [libFuzzer flags]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from fmc.errors import ArtifactError, InputError


def read_safetensors(path: Path) -> None:
    from fmc.artifacts.safetensors_reader import SafetensorsFile

    size = path.stat().st_size
    try:
        file = SafetensorsFile(path)
        for name in file.index():
            # never more than the file holds (×2: bfloat16 is returned as float32)
            assert file.load(name).nbytes <= 2 * size
        file.close()
    except InputError:
        pass


def read_gguf(path: Path) -> None:
    from fmc.frontend.gguf_file import open_gguf

    size = path.stat().st_size
    try:
        _, weights, _, _ = open_gguf(path)
        for name in weights.index():
            # Dequantized to float32: at most 8 values per stored byte (2-bit types).
            assert weights.load(name).size <= 8 * size
    except InputError:
        pass


def read_manifest_file(artifact: Path) -> None:
    from fmc.artifacts.manifest import read_manifest
    from fmc.runtime.artifact import should_verify, verify_files

    try:
        manifest = read_manifest(artifact)
        should_verify(manifest, None)
        verify_files(artifact, manifest)
    except ArtifactError:
        pass


def read_build_file(path: Path) -> None:
    from fmc.project.config import load

    try:
        builds = load(path)
        assert builds and all(b.settings.get("output") for b in builds)
    except InputError:
        pass


# target → (file name the bytes are written to, reader of the written path)
TARGETS = {
    "safetensors": ("model.safetensors", read_safetensors),
    "gguf": ("model.gguf", read_gguf),
    "manifest": ("manifest.json", lambda path: read_manifest_file(path.parent)),
    "toml": ("fmc.toml", read_build_file),
}


def main() -> None:
    import atheris

    name = sys.argv[1]
    file_name, reader = TARGETS[name]
    with atheris.instrument_imports():
        import fmc.artifacts.manifest  # noqa: F401
        import fmc.artifacts.safetensors_reader  # noqa: F401
        import fmc.frontend.gguf_file  # noqa: F401
        import fmc.project.config  # noqa: F401
    directory = Path(tempfile.mkdtemp(prefix=f"fmc-fuzz-{name}-"))
    path = directory / file_name

    def one_input(data: bytes) -> None:
        path.write_bytes(data)
        reader(path)

    atheris.Setup([sys.argv[0], *sys.argv[2:]], one_input)
    try:
        atheris.Fuzz()
    finally:
        for leftover in directory.iterdir():
            os.unlink(leftover)
        directory.rmdir()


if __name__ == "__main__":
    main()
