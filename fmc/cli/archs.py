"""`fmc archs`: the model families fmc compiles, with the names they answer to and presets."""

from __future__ import annotations

import typer
from rich.table import Table

from fmc.cli.output import emit_json, quiet_option, setup_logging, stdout


def archs_command(
    arch_plugin: list[str] = typer.Option([], "--arch-plugin",
                                          help="Load this architecture plugin first."),
    quiet: bool = quiet_option(),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """List the model architectures: HF model_type, GGUF architecture, presets, features."""
    setup_logging(quiet or json_out)
    from fmc.frontend.archs import registry

    families = registry.all_architectures()
    try:  # a plugin's families are listed, not kept (fmc runs in-process in tests and APIs)
        for path in arch_plugin:
            registry.load_plugin(path)
        rows = [arch.describe() for arch in registry.all_architectures().values()]
    finally:
        registry.ARCHITECTURES.clear()
        registry.ARCHITECTURES.update(families)
    if json_out:
        emit_json(rows)
        return
    table = Table(title="fmc architectures", show_lines=True)
    for column in ("family", "HF model_type", "GGUF", "presets", "peculiarities"):
        table.add_column(column)
    for row in rows:
        table.add_row(f"[bold]{row['name']}[/]\n{row['doc']}",
                      ", ".join(row["hf_model_types"]) or "—",
                      ", ".join(row["gguf_architectures"]) or "—",
                      "\n".join(row["presets"]) or "—",
                      "\n".join(row["features"]) or "—")
    stdout.print(table)
