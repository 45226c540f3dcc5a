"""`fmc compare`: an artifact's per-layer activations against transformers, first divergence."""

from __future__ import annotations

from pathlib import Path

import typer

from fmc.cli.output import emit_json, quiet_option, setup_logging, stdout, verify_option


def compare_command(
    artifact: Path = typer.Argument(..., help="Artifact built with --debug-layers."),
    model: str = typer.Argument(None, help="Reference checkpoint (default: the artifact's "
                                           "source)."),
    prompt: str = typer.Option("Hello", "--prompt", "-p", help="Text to run through both."),
    tolerance: float = typer.Option(1e-3, "--tolerance",
                                    help="Max relative difference per row (|Δ|max / |ref|max)."),
    verify: bool = verify_option(),
    threads: int = typer.Option(None, "--threads", help="CPU threads for the artifact."),
    quiet: bool = quiet_option(),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON result on stdout."),
) -> None:
    """Compare every layer's output with transformers; exit 1 at the first divergence."""
    from rich.table import Table

    import fmc
    from fmc.errors import FmcError
    from fmc.tools.compare import as_dicts, compare, first_divergence

    setup_logging(quiet or json_out)
    engine = fmc.load(artifact, verify=verify, threads=threads)
    reference = model or engine.manifest.source.reference
    ids = engine.tokenizer.encode(prompt)
    diffs = compare(engine, reference, ids, tolerance)
    first = first_divergence(diffs)
    if json_out:
        emit_json({"artifact": str(artifact), "reference": reference, "tokens": len(ids),
                   "tolerance": tolerance, "rows": as_dicts(diffs),
                   "first_divergence": first.name if first else None})
    else:
        table = Table(title=f"{artifact} vs transformers ({reference}), {len(ids)} tokens")
        for column in ("row", "max |Δ|", "max |Δ| / max |ref|", ""):
            table.add_column(column, justify="right" if column.startswith("max") else "left")
        for d in diffs:
            mark = "[bold red]◀ first divergence[/]" if d is first else \
                "[red]over[/]" if d.exceeds else ""
            table.add_row(d.name, f"{d.max_abs:.3e}", f"{d.max_rel:.3e}", mark)
        stdout.print(table)
    if first is not None:
        raise FmcError(f"first divergence at {first.name}: relative difference "
                       f"{first.max_rel:.3e} > tolerance {tolerance:g}")
