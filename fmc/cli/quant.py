"""`fmc quant list`: the registered quantization schemes and their storage layouts."""

from __future__ import annotations

import typer
from rich.table import Table

from fmc.cli.output import emit_json, quiet_option, setup_logging, stdout

app = typer.Typer(help="Quantization schemes.", no_args_is_help=True)


@app.command("list")
def list_command(
    plugin: list[str] = typer.Option([], "--quant-plugin", help="Also load this plugin file."),
    quiet: bool = quiet_option(),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """List schemes: bits per weight, storage layout, output-layer default."""
    setup_logging(quiet or json_out)
    from fmc.quant import all_schemes, load_plugin

    for path in plugin:
        load_plugin(path)
    rows = []
    example = 4096  # a [N, K] weight with N = K = 4096 shows each array's shape
    for scheme in all_schemes().values():
        layout = ", ".join(f"{t.name} {t.dtype}[N, {_fraction(t.shape[1], example)}]"
                           for t in scheme.storage((example, example), "example"))
        rows.append({**scheme.describe(), "storage": layout})
    if json_out:
        emit_json(rows)
        return
    table = Table(title="quantization schemes")
    for column in ("name", "bits/weight", "storage of an [N, K] weight", "output layer",
                   "lossless GGUF"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], f"{row['bits_per_weight']:.2f}", row["storage"],
                      row["output_scheme"] or "same", ", ".join(row["gguf_lossless"]) or "-")
    stdout.print(table)


def _fraction(size: int, k: int) -> str:
    if size == k:
        return "K"
    return f"K/{k // size}" if k % size == 0 else f"{size / k:g}·K"
