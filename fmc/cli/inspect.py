"""`fmc inspect`: what an artifact holds, as a table or as JSON."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from fmc.cli.output import (
    emit_json,
    human_bytes,
    quiet_option,
    setup_logging,
    stdout,
    windowed_kv_note,
)

if TYPE_CHECKING:
    from fmc.artifacts.manifest import Collectives, Manifest


def inspect_command(
    artifact: Path = typer.Argument(..., help="Artifact directory."),
    quiet: bool = quiet_option(),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest summary as JSON."),
) -> None:
    """Show an artifact's target, quantization, model, weights and memory estimate."""
    setup_logging(quiet or json_out)
    from fmc.artifacts.manifest import read_manifest

    manifest = read_manifest(artifact)
    model, memory = manifest.model, manifest.memory
    quantization, target = manifest.quantization, manifest.target
    weights_bytes = sum(p.stored.bytes for p in manifest.params if p.stored)
    summary = {
        "artifact": str(artifact),
        "fmc_version": manifest.fmc_version,
        "tvm_version": manifest.tvm_version,
        "abi_version": manifest.abi_version,
        "target": target.requested,
        "tvm_target": target.tvm_target,
        "validation": target.validation,
        "library": manifest.library.file,
        "quantization": quantization.default,
        "quant_overrides": list(quantization.overrides),
        # layers per scheme (a recipe or `gguf` mixes several; fallbacks show here)
        "layer_schemes": dict(sorted(Counter(quantization.layers.values()).items())),
        "calibration": quantization.calibration and quantization.calibration.to_dict(),
        "cpu_dot": target.cpu_dot,
        "compute_dtype": manifest.compute_dtype,
        "architecture": model.architecture,
        "features": model.features(),
        "source": manifest.source.to_dict(),
        "layers": model.num_hidden_layers,
        "hidden_size": model.hidden_size,
        "heads": f"{model.num_attention_heads} q / {model.num_key_value_heads} kv",
        "vocab_size": model.vocab_size,
        "parameters": len(manifest.params),
        "weights_present": manifest.weights.present,
        "weight_shards": len(manifest.weights.shards),
        "weight_bytes": weights_bytes,
        "context_window": manifest.runtime.context_window,
        "memory": memory.to_dict(),
        "entry_functions": list(manifest.entry_functions),
        "tensor_parallel": _tensor_parallel(manifest),
    }
    if json_out:
        emit_json(summary)
        return
    table = Table(title=str(artifact), show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("target", f"{summary['target']} ({target.tvm_kind}, "
                   f"library {summary['library']})"),
        ("validated", ", ".join(f"{k} {v}" for k, v in summary["validation"].items()
                                if k != "checked_with") + (
            f" ({summary['validation']['checked_with']})"
            if summary["validation"].get("checked_with") else "") or "—"),
        ("quantization", summary["quantization"] + (
            f" + {', '.join(summary['quant_overrides'])}" if summary["quant_overrides"] else "")
         + (" (layers: " + ", ".join(f"{k} ×{v}" for k, v in summary["layer_schemes"].items())
            + ")" if summary["layer_schemes"] else "")
         + (f"; calibrated on {quantization.calibration.file} "
            f"({quantization.calibration.tokens} tokens)" if quantization.calibration
            else "")),
        ("compute dtype", summary["compute_dtype"] + (
            f", {summary['cpu_dot']} dot products in decode GEMVs" if summary["cpu_dot"]
            else "")),
        ("model", f"{summary['architecture']}, {summary['layers']} layers, hidden "
                  f"{summary['hidden_size']}, heads {summary['heads']}, vocab "
                  f"{summary['vocab_size']}; {', '.join(summary['features'])}"),
        ("source", f"{manifest.source.kind}: {manifest.source.reference}"
                   + (f" at commit {manifest.source.commit}" if manifest.source.commit else "")),
        ("weights", f"{summary['parameters']} tensors in {summary['weight_shards']} shard(s), "
                    f"{human_bytes(weights_bytes)}" if summary["weights_present"]
                    else "none (weights-free artifact)"),
        ("memory estimate", f"{human_bytes(memory.total_bytes)} = weights "
                            f"{human_bytes(memory.weights_bytes)} + KV cache "
                            f"{human_bytes(memory.kv_cache_bytes)} "
                            f"({memory.context_window} tokens) + workspace "
                            f"{human_bytes(memory.workspace_bytes)}"),
        *([("sliding window", windowed)] if (windowed := windowed_kv_note(
            model.windowed_layers, model.num_hidden_layers, memory.kv_cache_bytes,
            memory.windowed_kv_cache_bytes, memory.context_window)) else []),
        ("entry functions", ", ".join(summary["entry_functions"])),
        *([("tensor parallel", _describe_ranks(summary["tensor_parallel"],
                                                manifest.tensor_parallel.collectives))]
          if summary["tensor_parallel"] else []),
        ("versions", f"fmc {summary['fmc_version']}, TVM {summary['tvm_version']}, "
                     f"ABI {summary['abi_version']}"),
    ]
    for field, value in rows:
        table.add_row(field, value)
    stdout.print(table)


def _tensor_parallel(manifest: Manifest) -> dict | None:
    """Ranks, each rank's weight bytes (from its shards' tensors) and the collectives a
    forward step issues; None for a single-device artifact."""
    tp = manifest.tensor_parallel
    if tp is None:
        return None
    per_rank = [sum(p.ranks[r].bytes for p in manifest.params if p.ranks is not None)
                for r in range(tp.ranks)]
    local = tp.local_model
    return {"ranks": tp.ranks, "weight_bytes_per_rank": per_rank,
            "kv_cache_bytes_per_rank": manifest.memory.kv_cache_bytes,
            "heads_per_rank": f"{local.num_attention_heads} q / "
                              f"{local.num_key_value_heads} kv",
            "intermediate_size_per_rank": local.intermediate_size,
            "collectives_per_step": tp.collectives.to_dict()}


def _describe_ranks(tp: dict, collectives: Collectives) -> str:
    weights = ", ".join(human_bytes(b) for b in tp["weight_bytes_per_rank"])
    return (f"{tp['ranks']} ranks; per rank: weights {weights}, KV cache "
            f"{human_bytes(tp['kv_cache_bytes_per_rank'])}, heads {tp['heads_per_rank']}, "
            f"MLP {tp['intermediate_size_per_rank']}; "
            f"{collectives.allreduce_sum_per_step} all-reduce(s) per step "
            f"({collectives.function}); memory estimate above is per rank")
