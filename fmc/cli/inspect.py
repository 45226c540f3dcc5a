"""`fmc inspect`: what an artifact holds, as a table or as JSON."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from fmc.cli.output import emit_json, human_bytes, quiet_option, setup_logging, stdout


def inspect_command(
    artifact: Path = typer.Argument(..., help="Artifact directory."),
    quiet: bool = quiet_option(),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest summary as JSON."),
) -> None:
    """Show an artifact's target, quantization, model, weights and memory estimate."""
    setup_logging(quiet or json_out)
    from fmc.artifacts.manifest import read_manifest

    manifest = read_manifest(artifact)
    model, memory = manifest["model"], manifest["memory"]
    weights_bytes = sum(p.get("bytes", 0) for p in manifest["params"])
    summary = {
        "artifact": str(artifact),
        "fmc_version": manifest["fmc_version"],
        "tvm_version": manifest["tvm_version"],
        "abi_version": manifest["abi_version"],
        "target": manifest["target"].get("spec", manifest["target"]["name"]),
        "tvm_target": manifest["target"]["tvm_target"],
        "validation": manifest["target"].get("validation", {}),
        "library": manifest["library"]["file"],
        "quantization": manifest["quantization"]["default"],
        "quant_overrides": manifest["quantization"]["overrides"],
        "compute_dtype": manifest["compute_dtype"],
        "architecture": model["architecture"],
        "source": manifest["source"],
        "layers": model["num_hidden_layers"],
        "hidden_size": model["hidden_size"],
        "heads": f"{model['num_attention_heads']} q / {model['num_key_value_heads']} kv",
        "vocab_size": model["vocab_size"],
        "parameters": len(manifest["params"]),
        "weights_present": manifest["weights"]["present"],
        "weight_shards": len(manifest["weights"]["shards"]),
        "weight_bytes": weights_bytes,
        "context_window": manifest["runtime"]["context_window"],
        "memory": memory,
        "entry_functions": manifest["entry_functions"],
    }
    if json_out:
        emit_json(summary)
        return
    table = Table(title=str(artifact), show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("target", f"{summary['target']} ({manifest['target']['tvm_target'].get('kind')}, "
                   f"library {summary['library']})"),
        ("validated", ", ".join(f"{k} {v}" for k, v in summary["validation"].items()
                                if k != "checked_with") + (
            f" ({summary['validation']['checked_with']})"
            if summary["validation"].get("checked_with") else "") or "—"),
        ("quantization", summary["quantization"] + (
            f" + {', '.join(summary['quant_overrides'])}" if summary["quant_overrides"] else "")),
        ("compute dtype", summary["compute_dtype"]),
        ("model", f"{summary['architecture']}, {summary['layers']} layers, hidden "
                  f"{summary['hidden_size']}, heads {summary['heads']}, vocab "
                  f"{summary['vocab_size']}"),
        ("source", f"{manifest['source']['kind']}: {manifest['source']['reference']}"),
        ("weights", f"{summary['parameters']} tensors in {summary['weight_shards']} shard(s), "
                    f"{human_bytes(weights_bytes)}" if summary["weights_present"]
                    else "none (weights-free artifact)"),
        ("memory estimate", f"{human_bytes(memory['total_bytes'])} = weights "
                            f"{human_bytes(memory['weights_bytes'])} + KV cache "
                            f"{human_bytes(memory['kv_cache_bytes'])} "
                            f"({memory['context_window']} tokens) + workspace "
                            f"{human_bytes(memory['workspace_bytes'])}"),
        ("entry functions", ", ".join(summary["entry_functions"])),
        ("versions", f"fmc {summary['fmc_version']}, TVM {summary['tvm_version']}, "
                     f"ABI {summary['abi_version']}"),
    ]
    for field, value in rows:
        table.add_row(field, value)
    stdout.print(table)
