"""`fmc chat` and fmc.runtime.chat: templates, incremental turns, sessions, Ctrl-C."""

from __future__ import annotations

import io
import json
import shutil

import pytest

import fmc
from fmc.cli import main
from fmc.runtime.chat import Conversation

MODEL = "llama-gqa-untied"
# A ChatML-like format in the tiny word-level vocabulary: w2 opens a user turn, w4 an
# assistant turn (and is the generation prompt), w3 ends a turn.
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}w4 {{ m['content'] }} w3 "
            "{% else %}w2 {{ m['content'] }} w3 {% endif %}{% endfor %}"
            "{% if add_generation_prompt %}w4{% endif %}")


@pytest.fixture
def artifact(tiny_artifact, tmp_path):
    out = shutil.copytree(tiny_artifact(MODEL), tmp_path / "chat-artifact")
    config = out / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "chat_template": TEMPLATE}))
    return out


def test_later_turns_prefill_only_the_new_tail_and_match_a_full_rerun(artifact):
    engine = fmc.load(artifact)
    chat = Conversation(engine)
    first = "".join(chat.reply("w5 w6 w7", max_tokens=6))
    assert chat.prefilled == len(engine.tokenizer.encode("w2 w5 w6 w7 w3 w4", False))
    second = "".join(chat.reply("w8 w9", max_tokens=6))
    rendered = chat.template.render(chat.messages[:3])
    full = engine.tokenizer.encode(rendered, add_special_tokens=False)
    assert chat.prefilled < len(full) // 2  # the history was not prefilled again
    # The same turn from scratch: a fresh sequence fed the whole rendered conversation.
    alone = engine.tokenizer.decode(list(engine.generate_ids(full, 6, stop_at_eos=True)))
    assert second == alone and first and chat.messages[-1]["content"] == second
    assert engine.sequence_length(chat.seq) == len(engine.history[chat.seq])


def _chat(artifact, monkeypatch, capsys, text, *extra):
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    assert main(["chat", str(artifact), "--json", "-n", "5", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_session_resumes_without_prefilling_the_history(artifact, tmp_path, monkeypatch,
                                                          capsys):
    both = _chat(artifact, monkeypatch, capsys, "w5 w6\nw7 w8\n")["turns"]
    session = tmp_path / "s.fmcs"
    one = _chat(artifact, monkeypatch, capsys, "w5 w6\n", "--session", str(session))
    two = _chat(artifact, monkeypatch, capsys, "w7 w8\n", "--session", str(session))
    assert [t["assistant"] for t in one["turns"] + two["turns"]] == \
        [t["assistant"] for t in both]
    assert two["turns"][0]["prefilled_tokens"] == both[1]["prefilled_tokens"]
    assert two["cached_tokens"] > 0


def test_ctrl_c_stops_the_reply_not_the_conversation(artifact, monkeypatch, capsys):
    from fmc.runtime.engine import Engine

    original, calls = Engine.decode, []

    def interrupted(self, seq, token):
        calls.append(token)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, seq, token)

    monkeypatch.setattr(Engine, "decode", interrupted)
    result = _chat(artifact, monkeypatch, capsys, "w5 w6\nw7 w8\n")
    assert len(result["turns"]) == 2 and result["turns"][1]["assistant"]
    assert len(result["turns"][0]["assistant"].split()) == 2  # stopped after two tokens


def test_an_artifact_without_a_chat_template_is_a_clear_error(tiny_artifact, monkeypatch,
                                                               capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("w5\n"))
    assert main(["--quiet", "chat", str(tiny_artifact(MODEL))]) == 5
    assert "no chat_template" in capsys.readouterr().err
