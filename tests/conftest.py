"""Shared fixtures: tiny checkpoints and their compiled artifacts, built once per session."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from models import TINY_MODELS, write_tiny_checkpoint  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Tests monkeypatch fmc in-process, which a build cache keyed by files cannot see: compiles
# use no cache unless a test asks for one (tests/test_cache.py).
os.environ["FMC_NO_CACHE"] = "1"
# Compiles default to the CPU's exact float dot product, on every machine: the tests against
# reference numerics (transformers, numpy) run there; the int8 path has its own tolerance
# tests (test_cpu_int8_dot.py), which ask for it.
os.environ["FMC_CPU_DOT"] = "float"
logging.getLogger("fmc").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """name → path of a tiny HF checkpoint (written on first use)."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = write_tiny_checkpoint(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_artifact(tiny_checkpoint, tmp_path_factory):
    """(name, quant, target) → path of the compiled artifact (compiled on first use)."""
    from fmc.compiler import CompileOptions, compile_model

    cache: dict[tuple[str, str, str], Path] = {}

    def get(name: str, quant: str = "q0f32", target: str = "cpu") -> Path:
        key = (name, quant, target)
        if key not in cache:
            suffix = "" if target == "cpu" else f"-{target}"
            out = tmp_path_factory.mktemp("artifacts") / f"{name}-{quant}{suffix}"
            compile_model(CompileOptions(model=str(tiny_checkpoint(name)), output=out,
                                         quant=quant, target=target))
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from fmc.frontend.source import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_default_artifact(smollm2_gguf, tmp_path_factory):
    """target → SmolLM2's default compile (every GGUF tensor kept in its stored type: Q4_1,
    Q8_0), compiled on first use."""
    from fmc.compiler import CompileOptions, compile_model

    cache: dict[str, Path] = {}

    def get(target: str = "cpu") -> Path:
        if target not in cache:
            out = tmp_path_factory.mktemp("smollm2") / f"gguf-kept-{target}"
            compile_model(CompileOptions(model=str(smollm2_gguf), output=out, target=target))
            cache[target] = out
        return cache[target]

    return get


def pytest_collection_modifyitems(config, items):
    if not items:
        raise pytest.UsageError("no tests collected")
    assert TINY_MODELS  # the registry of tiny models must not be empty


@pytest.fixture
def bad_plugins(tmp_path) -> tuple[Path, Path]:
    """Two plugin files every plugin loader must refuse with a clear error: broken.py raises
    on import, empty.py registers nothing."""
    broken, empty = tmp_path / "broken.py", tmp_path / "empty.py"
    broken.write_text("raise RuntimeError('boom')\n")
    empty.write_text("x = 1\n")
    return broken, empty


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname}: {record.getMessage()}")

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def fmc_log():
    """The "fmc" logger's records (`.text`), whatever a CLI call did to its propagation."""
    logger = logging.getLogger("fmc")
    level, handler = logger.level, _Records()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)
