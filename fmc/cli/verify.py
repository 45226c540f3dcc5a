"""`fmc verify`: check an artifact end to end (manifest, hashes, tensors, library)."""

from __future__ import annotations

from pathlib import Path

import typer

from fmc.cli.output import emit_json, quiet_option, setup_logging, stdout


def verify_command(
    artifact: Path = typer.Argument(..., help="Artifact directory."),
    quiet: bool = quiet_option(),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON result on stdout."),
) -> None:
    """Check the manifest (format, ABI), every file's sha256, the tensors' shapes and dtypes,
    and that the library loads and describes the same parameters. Exit 5 on the first
    failure (named in one line)."""
    setup_logging(quiet or json_out)
    from fmc.errors import ArtifactError
    from fmc.runtime.artifact import verify_artifact

    checks = verify_artifact(artifact)
    failed = next((c for c in checks if c["ok"] is False), None)
    if json_out:
        emit_json({"artifact": str(artifact), "ok": failed is None, "checks": checks})
    else:
        for check in checks:
            mark = {True: "[green]✓[/]", False: "[red]✗[/]", None: "[yellow]–[/]"}[check["ok"]]
            stdout.print(f"{mark} {check['check']}: {check['detail']}", highlight=False)
    if failed is not None:  # stdout already holds the JSON; stderr gets the one-line error
        raise ArtifactError(failed["detail"])
