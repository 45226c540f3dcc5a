"""`fmc passes`: the compile phases and IR passes, in order, with one-line docs."""

from __future__ import annotations

import typer
from rich.table import Table

from fmc.cli.output import emit_json, quiet_option, setup_logging, stdout


def passes_command(
    pass_plugin: list[str] = typer.Option([], "--pass-plugin", help="Load this plugin first."),
    quiet: bool = quiet_option(),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """List the pipeline: phases, and the passes of the fuse and lower phases."""
    setup_logging(quiet or json_out)
    from fmc.compiler import PHASES
    from fmc.lowering.pipeline import PIPELINE, load_pass_plugin

    for path in pass_plugin:
        load_pass_plugin(path)
    rows = []
    for phase in PHASES:
        passes = [p for p in PIPELINE if p.phase == phase.name]
        rows.append({"phase": phase.name, "doc": phase.doc,
                     "passes": [{"name": p.name, "doc": p.doc, "required": p.required,
                                 "default": p.default} for p in passes]})
    if json_out:
        emit_json(rows)
        return
    table = Table(title="fmc pipeline", show_lines=False)
    for column in ("#", "phase / pass", "what it does"):
        table.add_column(column)
    number = 0
    for row in rows:
        table.add_row("", f"[bold]{row['phase']}[/]", row["doc"])
        for spec in row["passes"]:
            number += 1
            mark = "" if spec["required"] else \
                " [dim](optional)[/]" if spec["default"] else " [dim](opt-in: --enable-pass)[/]"
            table.add_row(str(number), f"  {spec['name']}{mark}", spec["doc"])
    stdout.print(table)
