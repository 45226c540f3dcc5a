"""`fmc targets`: the compilation targets, and whether their host toolchain was found."""

from __future__ import annotations

import typer
from rich.table import Table

from fmc.cli.output import emit_json, quiet_option, setup_logging, stdout


def targets_command(
    quiet: bool = quiet_option(),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """List targets with the tools each needs (found on PATH, and their versions)."""
    setup_logging(quiet or json_out)
    from fmc.cli.doctor import runtime_line
    from fmc.targets.registry import families, get

    rows = []
    for name in families():
        target = get(name)
        tools = [{"name": tool.name, "purpose": tool.purpose, "path": tool.path(),
                  "version": tool.version(), "install": tool.install_hint}
                 for tool in target.tools]
        rows.append({"name": name, "description": target.description, "tools": tools,
                     "ready": all(tool["path"] for tool in tools)})
        runtime = target.runtime_status()
        if runtime is not None:
            rows[-1]["runtime"] = runtime
    if json_out:
        emit_json(rows)
        return
    table = Table(title="fmc targets")
    for column in ("target", "what it builds", "toolchain"):
        table.add_column(column)
    for row in rows:
        tools = "\n".join(
            f"[green]✓[/] {t['name']} ({t['version'] or 'found'})" if t["path"]
            else f"[red]✗[/] {t['name']} — {t['install']}" for t in row["tools"]) or "—"
        if "runtime" in row:
            tools += f"\nruns here: {runtime_line(row['runtime'])}"
        table.add_row(row["name"], row["description"], tools)
    stdout.print(table)
