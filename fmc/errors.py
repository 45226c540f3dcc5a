"""User-facing error types; each kind maps to one documented process exit code."""

from __future__ import annotations

import difflib


class FmcError(Exception):
    """An error caused by the user's input or environment, reported as one line."""

    exit_code = 1


class UsageError(FmcError):
    """A bad option or argument (unknown scheme, target, conflicting flags)."""

    exit_code = 2


class MissingToolchainError(FmcError):
    """A host tool a target needs (compiler, linker) is not installed."""

    exit_code = 3


class InputError(FmcError):
    """A model input that cannot be used: config, weights, tokenizer, files."""

    exit_code = 4


class ArtifactError(FmcError):
    """A compiled artifact that is missing, corrupt or incompatible with this fmc."""

    exit_code = 5


class OutputError(FmcError):
    """The output path cannot be written (exists without --force, not writable, disk full)."""

    exit_code = 6


class DeviceError(FmcError):
    """The device an artifact runs on is unavailable here (no driver, loader or device)."""

    exit_code = 7


class CodegenError(FmcError):
    """The target's code generator (TVM) failed on a valid model: a TVM limitation to report
    (fmc/lowering/codegen_failure.py). The message names the kernel, target and shape."""

    exit_code = 8


class DownloadError(FmcError):
    """A model named by its hub id cannot be downloaded: no network, the hub unreachable or
    failing, or access refused (a gated or private model without a token that may read it).
    The same command can succeed once that is fixed, unlike a bad input (exit 4)."""

    exit_code = 9


class _CrossingTVM:
    """TVM's FFI turns exceptions raised inside a Python pass into RuntimeError. Passes call
    `raise_in_pass(error)`; the pipeline then re-raises the original after the pass fails."""

    pending: FmcError | None = None


def raise_in_pass(error: FmcError):
    _CrossingTVM.pending = error
    raise error


def take_pass_error() -> FmcError | None:
    error, _CrossingTVM.pending = _CrossingTVM.pending, None
    return error


# Exit code when the user interrupts (128 + SIGINT), as shells report it.
INTERRUPTED_EXIT_CODE = 130


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI job cancelled, `kill`): unwinds like Ctrl-C so outputs are cleaned up."""

    exit_code = 128 + 15


def unknown_choice(kind: str, value: str, choices: list[str]) -> UsageError:
    """Build the error for a name that is not in a registry, with a close-match hint."""
    hint = difflib.get_close_matches(value, choices, n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    return UsageError(
        f"unknown {kind} {value!r}{suggestion}; choose one of: {', '.join(sorted(choices))}"
    )
