"""`fmc ppl`: llama.cpp's windowed protocol and, with --kl-base, the KL divergence and
same-top-token rate against a base artifact — each checked against a direct computation."""

from __future__ import annotations

import json
import math

import numpy as np

import fmc
from fmc.cli import main
from fmc.runtime.perplexity import perplexity

TOKENS = [int(t) for t in np.random.default_rng(0).integers(2, 160, 3 * 16 + 5)]


def reference(engine, base, context=16):
    """Windows of `context` tokens, second half scored; KL(base ‖ engine) per position."""
    nll, kl, same, count = 0.0, 0.0, 0, 0
    for start in range(0, len(TOKENS) - context + 1, context):
        window = TOKENS[start:start + context]
        ours = engine.logits(window).astype(np.float64)
        theirs = base.logits(window).astype(np.float64)
        for position in range(context // 2, context - 1):
            p = np.exp(ours[position] - ours[position].max())
            p /= p.sum()
            q = np.exp(theirs[position] - theirs[position].max())
            q /= q.sum()
            nll -= math.log(p[window[position + 1]])
            kl += float((q * np.log(q / p)).sum())
            same += int(p.argmax() == q.argmax())
            count += 1
    return math.exp(nll / count), kl / count, same / count


def test_perplexity_and_kl_divergence_equal_a_direct_computation(tiny_artifact):
    base = fmc.load(tiny_artifact("llama-quant"))
    quantized = fmc.load(tiny_artifact("llama-quant", "q4f16"))
    measured = perplexity(quantized, TOKENS, context=16, base=base)
    ppl, kl, same = reference(quantized, base)
    assert measured["chunks"] == 3 and measured["scored_tokens"] == 3 * 7
    assert math.isclose(measured["perplexity"], ppl, rel_tol=1e-6)
    assert math.isclose(measured["kl_divergence"], kl, rel_tol=1e-5) and kl > 1e-4
    assert measured["same_top_token"] == same
    itself = perplexity(base, TOKENS, context=16, base=base)
    assert abs(itself["kl_divergence"]) < 1e-9 and itself["same_top_token"] == 1.0
    assert math.isclose(itself["base_perplexity"], itself["perplexity"])


def test_ppl_cli_reports_kl_against_a_base(tiny_artifact, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{t}" for t in TOKENS))
    code = main(["ppl", str(tiny_artifact("llama-quant", "q4f16")), "--text", str(text),
                 "--context", "16", "--kl-base", str(tiny_artifact("llama-quant")), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["chunks"] == 3 and result["kl_divergence"] > 0
    assert 0 <= result["same_top_token"] <= 1 and result["base_perplexity"] > 1


def test_decode_path_scores_the_same_positions_as_prefill(tiny_artifact):
    engine = fmc.load(tiny_artifact("llama-quant", "q4f16"))
    prefill = perplexity(engine, TOKENS, context=16)
    decode = perplexity(engine, TOKENS, context=16, decode=True)
    assert decode["path"] == "decode" and decode["scored_tokens"] == prefill["scored_tokens"]
    # Different kernels (GEMV per step vs one GEMM per window), the same function.
    assert math.isclose(decode["perplexity"], prefill["perplexity"], rel_tol=1e-5)
