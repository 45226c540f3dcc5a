"""Layer-by-layer comparison of an artifact against the transformers implementation.

The artifact must be built with `--debug-layers` (an extra entry returns every layer's
output). The reference is the checkpoint run by transformers in float32 on the CPU, with
forward hooks on the embedding, each decoder layer and the final norm; the rows line up
one to one, and the logits are compared last."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fmc.errors import InputError, MissingToolchainError, UsageError


@dataclass
class LayerDiff:
    name: str
    max_abs: float
    max_rel: float  # max |fmc - ref| / max |ref| over the row
    exceeds: bool


def _reference_model(reference: str):
    """transformers' model for a checkpoint fmc can also read (no network)."""
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError as exc:
        raise MissingToolchainError(
            f"fmc compare needs transformers and torch ({exc.name} is missing): "
            "pip install 'fmc[compare]'") from None
    from fmc.frontend.source import open_model

    source = open_model(reference, offline=True)
    kwargs = {"dtype": "float32", "local_files_only": True}
    path = Path(source.reference)
    if source.kind == "preset":
        raise UsageError(f"{reference}: a preset has no weights to compare against; give the "
                         "checkpoint (directory, GGUF file or hub id)")
    if source.kind == "gguf":
        location, kwargs["gguf_file"] = str(path.parent), path.name
    elif source.kind == "hub":  # the snapshot directory, or ORG/NAME:FILE.gguf's file
        first = source.input_files[0]
        location = str(first.parent)
        if first.suffix == ".gguf":
            kwargs["gguf_file"] = first.name
    else:
        location = str(path)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except Exception as exc:  # transformers raises many types for unreadable checkpoints
        raise InputError(f"{reference}: transformers cannot load it: "
                         f"{str(exc).splitlines()[0]}") from None
    return model.eval()


def reference_layer_outputs(model, token_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """([layers + 2, n, hidden], logits [n, vocab]) from transformers, via forward hooks."""
    import torch

    rows: list[np.ndarray] = []

    def record(_module, _inputs, output):
        tensor = output[0] if isinstance(output, tuple) else output
        rows.append(tensor[0].detach().float().numpy())

    inner = model.model
    hooks = [inner.embed_tokens.register_forward_hook(record)]
    hooks += [layer.register_forward_hook(record) for layer in inner.layers]
    hooks.append(inner.norm.register_forward_hook(record))
    try:
        with torch.no_grad():
            logits = model(torch.tensor([token_ids])).logits[0].float().numpy()
    finally:
        for hook in hooks:
            hook.remove()
    return np.stack(rows), logits


def row_names(num_layers: int) -> list[str]:
    return ["embed", *[f"layer {i}" for i in range(num_layers)], "norm", "logits"]


def diff_rows(ours: list[np.ndarray], reference: list[np.ndarray], names: list[str],
              tolerance: float) -> list[LayerDiff]:
    diffs = []
    for name, a, b in zip(names, ours, reference, strict=True):
        if a.shape != b.shape:
            raise InputError(f"{name}: fmc gives shape {a.shape}, the reference {b.shape}")
        max_abs = float(np.abs(a - b).max())
        scale = float(np.abs(b).max()) or 1.0
        rel = max_abs / scale
        diffs.append(LayerDiff(name, max_abs, rel, not rel <= tolerance))  # NaN exceeds
    return diffs


def compare(engine, reference: str, token_ids: list[int],
            tolerance: float = 1e-3) -> list[LayerDiff]:
    """Per-row differences between `engine` (a --debug-layers artifact) and transformers."""
    ours = engine.layer_outputs(token_ids)
    our_logits = engine.logits(token_ids)
    model = _reference_model(reference)
    theirs, their_logits = reference_layer_outputs(model, token_ids)
    names = row_names(engine.config.num_hidden_layers)
    if len(theirs) != len(ours):
        raise InputError(f"{reference}: the reference has {len(theirs) - 2} layers, the "
                         f"artifact {len(ours) - 2}")
    return diff_rows([*ours, our_logits], [*theirs, their_logits], names, tolerance)


def first_divergence(diffs: list[LayerDiff]) -> LayerDiff | None:
    return next((d for d in diffs if d.exceeds), None)


def as_dicts(diffs: list[LayerDiff]) -> list[dict]:
    return [asdict(d) for d in diffs]
