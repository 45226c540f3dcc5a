"""`fmc quant list`: the registered quantization schemes, their storage layouts, and the
built-in recipes."""

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
    """List schemes (bits per weight, storage layout, output-layer default) and recipes."""
    setup_logging(quiet or json_out)
    from fmc.quant import all_schemes, load_plugin
    from fmc.quant import recipe as recipes

    for path in plugin:
        load_plugin(path)
    rows = []
    example = 4096  # a [N, K] weight with N = K = 4096 shows each array's shape
    for scheme in all_schemes().values():
        layout = ", ".join(f"{t.name} {t.dtype}[N, {_fraction(t.shape[1], example)}]"
                           for t in scheme.storage((example, example), "example"))
        rows.append({"kind": "scheme", **scheme.describe(), "storage": layout})
    recipe_rows = []
    for name in recipes.builtin_names():
        recipe = recipes.builtin(name)
        recipe_rows.append({"kind": "recipe", "name": name, "description": recipe.description,
                            "default": recipe.default, "output": recipe.output,
                            "rules": [f"{r.match}={r.scheme}" + (f" if {r.layers.text}"
                                                                 if r.layers else "")
                                      for r in recipe.rules]})
    if json_out:
        emit_json(rows + recipe_rows)
        return
    table = Table(title="quantization schemes")
    for column in ("name", "bits/weight", "storage of an [N, K] weight", "output layer",
                   "lossless GGUF"):
        table.add_column(column)
    for row in rows:
        fallback = f" (else {row['fallback']})" if row["fallback"] else ""
        table.add_row(row["name"], f"{row['bits_per_weight']:g}", row["storage"] + fallback,
                      row["output_scheme"] or "same", ", ".join(row["gguf_lossless"]) or "-")
    stdout.print(table)
    recipe_table = Table(title="recipes (--quant NAME; your own: --quant-recipe FILE)")
    for column in ("name", "default", "output layer", "rules"):
        recipe_table.add_column(column)
    for row in recipe_rows:
        recipe_table.add_row(row["name"], row["default"], row["output"] or "default's",
                             "; ".join(row["rules"]))
    stdout.print(recipe_table)
    stdout.print("gguf: keep a GGUF input's own tensor types (the default for GGUF inputs)")


def _fraction(size: int, k: int) -> str:
    if size == k:
        return "K"
    return f"K/{k // size}" if k % size == 0 else f"{size / k:g}·K"
