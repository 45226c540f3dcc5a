"""The generation policy (fmc.runtime.generation) and the loops that share it: EOS, an exactly
full context, stop strings and max_tokens = 0 behave the same alone, batched and in chat."""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest

import fmc
from fmc.errors import UsageError
from fmc.runtime.chat import Conversation
from fmc.runtime.generation import Generation, StopRule

EOS = 1
PIECES = {0: "", 1: "</s>", 2: "ab", 3: "c", 4: "S", 5: "TO", 6: "P", 7: "x"}


class Letters:
    """A tokenizer whose token i decodes to PIECES[i]."""

    def decode(self, ids):
        return "".join(PIECES[i] for i in ids)


def logits_for(token: int) -> np.ndarray:
    row = np.zeros(len(PIECES), np.float32)
    row[token] = 1
    return row


def run(rule: StopRule, tokens: list[int], length: int = 0, tokenizer=None):
    """Steps for a scripted sequence of argmax tokens; the sequence grows by one per step."""
    generation = Generation(rule, tokenizer=tokenizer)
    steps = []
    for offset, token in enumerate(tokens):
        if generation.finished:
            break
        steps.append(generation.step(logits_for(token), [], length + offset))
    return steps, generation


def test_eos_ends_without_emitting_unless_told_to_generate_through_it():
    steps, generation = run(StopRule.of(8, 100, [EOS]), [2, EOS, 3])
    assert [(s.token, s.finish_reason) for s in steps] == [(2, None), (None, "stop")]
    assert generation.produced == 1
    steps, _ = run(StopRule.of(8, 100, [EOS], stop_at_eos=False), [2, EOS, 3])
    assert [s.token for s in steps] == [2, EOS, 3]


def test_max_tokens_counts_emitted_tokens_and_zero_finishes_before_the_prompt():
    steps, _ = run(StopRule.of(2, 100, [EOS]), [2, 3, 7])
    assert [(s.token, s.finish_reason) for s in steps] == [(2, None), (3, "length")]
    generation = Generation(StopRule.of(0, 100))
    assert generation.finished and generation.finish_reason == "length"
    with pytest.raises(UsageError, match="has finished"):
        generation.step(logits_for(2), [], 0)
    with pytest.raises(UsageError, match="--max-tokens must be ≥ 0"):
        StopRule.of(-1, 100)


@pytest.mark.parametrize("prompt, emitted", [(7, 4), (9, 2), (10, 1)])
def test_a_full_context_emits_the_token_that_cannot_be_decoded_and_stops(prompt, emitted):
    # The sequence holds `prompt` tokens when the first logits arrive; each emitted token is
    # decoded (length + 1) until the context (10) is full.
    steps, generation = run(StopRule.of(100, 10), [2] * 20, length=prompt)
    assert len(steps) == emitted == 10 - prompt + 1
    assert steps[-1].finish_reason == "length" and generation.finish_reason == "length"


def test_stop_strings_end_the_text_before_them_across_token_boundaries():
    rule = StopRule.of(100, 100, stop=["STOP"])
    steps, generation = run(rule, [2, 4, 5, 6, 3], tokenizer=Letters())
    assert "".join(s.text for s in steps) == "ab"
    assert generation.finish_reason == "stop" and steps[-1].token == 6
    # "S" and "TO" were held back as a possible start of "STOP", then released at "x".
    steps, generation = run(rule, [4, 5, 7, 3], tokenizer=Letters())
    assert [s.text for s in steps] == ["", "", "STOx", "c"]
    assert generation.finish_reason is None
    # A stop string inside one token's text, and text released when max_tokens ends it.
    steps, _ = run(StopRule.of(100, 100, stop=["bc"]), [2, 3], tokenizer=Letters())
    assert "".join(s.text for s in steps) == "a"
    steps, _ = run(StopRule.of(2, 100, stop=["Sx"]), [3, 4], tokenizer=Letters())
    assert "".join(s.text for s in steps) == "cS" and steps[-1].finish_reason == "length"
    with pytest.raises(UsageError, match="need the artifact's tokenizer"):
        Generation(rule)


# -- the loops that use it, on a tiny artifact ------------------------------------------------
MODEL = "llama-gqa-untied"
TEMPLATE = "{% for m in messages %}w2 {{ m['content'] }} w3 {% endfor %}w4"


@pytest.fixture
def engine(tiny_artifact, tmp_path):
    out = shutil.copytree(tiny_artifact(MODEL), tmp_path / "artifact")
    config = out / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": TEMPLATE}))
    return fmc.load(out, context_window=24)


def batched(engine, prompt_ids, rule):
    async def collect():
        return [step async for step in engine.steps_async(prompt_ids, rule, text=True)]

    return asyncio.run(collect())


def test_alone_batched_and_chat_stop_at_the_same_token_when_the_context_fills(engine):
    chat = Conversation(engine)
    prompt = engine.tokenizer.encode(chat.template.render(
        [{"role": "user", "content": "w5 w6 w7 w8 w9"}]), add_special_tokens=False)
    rule = engine.stop_rule(100, stop_at_eos=False)
    alone = list(engine.steps(prompt, rule, text=True))
    together = batched(engine, prompt, rule)
    assert len(alone) == engine.context_window - len(prompt) + 1
    assert [s.token for s in together] == [s.token for s in alone]
    assert alone[-1].finish_reason == together[-1].finish_reason == "length"
    assert list(engine.history) == [chat.seq]  # both released their sequences
    # chat stops at EOS; the tiny model's EOS (w1) is never the argmax here, so it runs to
    # the same full context.
    answer = "".join(chat.reply("w5 w6 w7 w8 w9", max_tokens=100))
    assert answer == "".join(s.text for s in alone)


def test_stop_strings_and_max_tokens_zero_in_every_loop(engine):
    prompt = engine.tokenizer.encode("w5 w6 w7")
    full = "".join(s.text for s in engine.steps(prompt, engine.stop_rule(6), text=True))
    stop = full.split()[2]  # the third generated word
    rule = engine.stop_rule(6, stop=[stop])
    alone = "".join(s.text for s in engine.steps(prompt, rule, text=True))
    assert alone == full[:full.index(stop)] and stop not in alone
    assert "".join(s.text for s in batched(engine, prompt, rule)) == alone
    assert "".join(engine.stream("w5 w6 w7", 6, stop=[stop])) == alone
    zero = engine.stop_rule(0)
    assert list(engine.steps(prompt, zero)) == [] and batched(engine, prompt, zero) == []
    assert list(Conversation(engine).reply("w5", max_tokens=0)) == []


def test_fmc_run_stop_strings_and_finish_reason(engine, capsys):
    from fmc.cli import main

    prompt = engine.tokenizer.encode("w5 w6 w7")
    full = "".join(s.text for s in engine.steps(prompt, engine.stop_rule(6), text=True))
    stop = full.split()[1]
    args = ["run", str(engine.path), "-p", "w5 w6 w7", "-n", "6", "--context-window", "24"]
    assert main([*args, "--stop", stop, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["text"] == full[:full.index(stop)] and result["finish_reason"] == "stop"
    assert main([*args, "--stop", stop]) == 0
    assert capsys.readouterr().out == full[:full.index(stop)] + "\n"
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["finish_reason"] == "length"
