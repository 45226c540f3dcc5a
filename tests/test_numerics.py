"""fmc's logits equal transformers' on tiny random checkpoints of every architecture.

Bound: fp32, max |fmc − HF| ≤ 1e-5 × max |HF logit| (the issue allows 1e-4; fmc measures
~5e-7, so a tenfold-tighter bound still catches any real error)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import TINY_MODELS

import fmc

TOLERANCE = 1e-5
PROMPT = [3, 17, 42, 5, 99, 1, 7, 150, 64, 12, 8]


def hf_logits(checkpoint, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def relative_error(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_prefill_and_decode_match_transformers(name, tiny_checkpoint, tiny_artifact):
    from transformers import AutoModelForCausalLM

    engine = fmc.load(tiny_artifact(name))
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(name),
                                                     dtype=torch.float32).eval()

    def ref_logits(ids):
        with torch.no_grad():
            return reference(torch.tensor([ids])).logits[0].numpy()

    # Prefill: every position (batch_prefill) and the last position (prefill).
    expected = ref_logits(PROMPT)
    assert relative_error(engine.logits(PROMPT), expected) <= TOLERANCE
    seq = engine.new_sequence()
    logits = engine.prefill(seq, PROMPT)
    assert relative_error(logits, expected[-1]) <= TOLERANCE

    # Ten greedy decode steps through the KV cache, each against a full HF forward.
    tokens = list(PROMPT)
    for _ in range(10):
        tokens.append(int(np.argmax(logits)))
        logits = engine.decode(seq, tokens[-1])
        assert relative_error(logits, ref_logits(tokens)[-1]) <= TOLERANCE
    engine.remove(seq)


def test_long_prompt_is_chunked(tiny_checkpoint, tmp_path):
    """A prompt longer than the prefill chunk is split and still matches."""
    from fmc.compiler import CompileOptions, compile_model

    out = tmp_path / "chunked"
    compile_model(CompileOptions(model=str(tiny_checkpoint("llama-gqa-untied")), output=out,
                                 prefill_chunk=16))
    ids = [int(i) for i in np.random.default_rng(1).integers(0, 160, 70)]
    engine = fmc.load(out)
    expected = hf_logits(tiny_checkpoint("llama-gqa-untied"), ids)
    assert relative_error(engine.logits(ids), expected) <= TOLERANCE
    seq = engine.new_sequence()
    assert relative_error(engine.prefill(seq, ids), expected[-1]) <= TOLERANCE


def test_wrong_rope_theta_is_detected(tiny_checkpoint, tiny_artifact):
    """Negative control: the comparison is sensitive to a real modelling difference."""
    from transformers import AutoConfig, AutoModelForCausalLM

    engine = fmc.load(tiny_artifact("llama-gqa-untied"))
    checkpoint = tiny_checkpoint("llama-gqa-untied")
    config = AutoConfig.from_pretrained(checkpoint)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    model = AutoModelForCausalLM.from_pretrained(checkpoint, config=config,
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        wrong = model(torch.tensor([PROMPT])).logits[0].numpy()
    assert relative_error(engine.logits(PROMPT), wrong) > 100 * TOLERANCE
