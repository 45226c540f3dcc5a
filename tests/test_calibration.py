"""--calib: activation statistics from fmc's numpy forward pass equal the ones transformers
gives, they reach the quantizers, and they are recorded in the manifest and the cache key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmc.compiler import CompileOptions, compile_model
from fmc.errors import InputError
from fmc.frontend import open_model
from fmc.frontend.calibration import activation_statistics


def word_text(count: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(f"w{i}" for i in rng.integers(2, 160, count))


def hf_statistics(checkpoint, windows) -> dict[str, np.ndarray]:
    """Mean x² per input channel of every nn.Linear, from forward hooks on transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(hook(f"{name}.weight"))
    with torch.no_grad():
        model(torch.tensor(windows))
    count = len(windows) * len(windows[0])
    if model.config.tie_word_embeddings:
        sums["model.embed_tokens.weight"] = sums.pop("lm_head.weight")
    return {name: (total / count).float().numpy() for name, total in sums.items()}


@pytest.mark.parametrize("name", ["llama3-rope-scaling", "qwen2-bias", "llama-gqa-untied"])
def test_statistics_equal_transformers(name, tiny_checkpoint):
    checkpoint = tiny_checkpoint(name)
    source = open_model(str(checkpoint))
    rng = np.random.default_rng(1)
    windows = rng.integers(0, 160, (3, 40)).tolist()
    ours = activation_statistics(source.config, source.weights, windows)
    theirs = hf_statistics(checkpoint, windows)
    assert set(ours) == set(theirs)
    for tensor, expected in theirs.items():
        np.testing.assert_allclose(ours[tensor], expected, rtol=2e-4, atol=1e-7, err_msg=tensor)


def test_calibrated_compile(tiny_checkpoint, tmp_path):
    """The manifest records the text's sha256; the weights differ from an uncalibrated
    compile, and a changed text misses the weights cache but not the library's."""
    import hashlib

    checkpoint = str(tiny_checkpoint("llama-quant"))
    text = tmp_path / "calib.txt"
    text.write_text(word_text(600))
    cache = tmp_path / "cache"
    first = compile_model(CompileOptions(model=checkpoint, output=tmp_path / "a",
                                         quant="q4f16", calib=str(text), cache_dir=cache))
    calibration = first.manifest.quantization.calibration
    assert calibration.sha256 == hashlib.sha256(text.read_bytes()).hexdigest()
    assert calibration.tokens == 2 * 512  # the last window overlaps the first
    plain = compile_model(CompileOptions(model=checkpoint, output=tmp_path / "b", quant="q4f16",
                                         use_cache=False))
    shas = {p.name: p.stored.sha256 for p in plain.manifest.params}
    changed = [p.name for p in first.manifest.params if p.stored.sha256 != shas[p.name]]
    assert any("q_weight" in name for name in changed)
    text.write_text(word_text(600, seed=1))
    again = compile_model(CompileOptions(model=checkpoint, output=tmp_path / "c",
                                         quant="q4f16", calib=str(text), cache_dir=cache))
    assert again.cache == {"library": "hit", "weights": "miss"}


def test_a_missing_calibration_text_names_the_file(tiny_checkpoint, tmp_path):
    with pytest.raises(InputError, match="nope.txt: cannot read the calibration text"):
        compile_model(CompileOptions(model=str(tiny_checkpoint("llama-quant")),
                                     output=tmp_path / "x", quant="q4f16",
                                     calib=str(tmp_path / "nope.txt")))
    assert not (tmp_path / "x").exists()
