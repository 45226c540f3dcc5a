"""`fmc serve` through the official `openai` client: a real server process on a free port of
127.0.0.1, serving a tiny compiled model with a chat template. Greedy outputs are checked
against solo runs of the same artifact in this process (what `fmc run` prints)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")

MODEL = "llama-gqa-untied"
NAME = "tiny"
KEY = "sk-test-key"
# A ChatML-like format in the tiny word-level vocabulary (as tests/test_chat.py).
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}w4 {{ m['content'] }} w3 "
            "{% else %}w2 {{ m['content'] }} w3 {% endif %}{% endfor %}"
            "{% if add_generation_prompt %}w4{% endif %}")


@pytest.fixture(scope="module")
def artifact(tiny_artifact, tmp_path_factory) -> Path:
    out = shutil.copytree(tiny_artifact(MODEL), tmp_path_factory.mktemp("serve") / "chat")
    config = out / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "chat_template": TEMPLATE}))
    return out


class Server:
    def __init__(self, artifact: Path, *options: str):
        """`fmc serve --port 0 --json`: the OS picks a free port, the ready line names it."""
        self.log = artifact.parent / f"server-{time.monotonic_ns()}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fmc.cli", "serve", str(artifact), "--port", "0", "--json",
             "--name", NAME, "--threads", "1", *options],
            stdout=subprocess.PIPE, stderr=self.log.open("w"), text=True)
        timer = threading.Timer(60, self.process.kill)  # never wait forever for the line
        timer.start()
        line = self.process.stdout.readline()
        timer.cancel()
        if not line:
            self.stop()
            raise AssertionError(f"server did not start: {self.log.read_text()}")
        self.ready = json.loads(line)
        self.port = self.ready["port"]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def client(self, key: str = KEY, **options):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0,
                             timeout=30, **options)

    def raw(self, path: str, body: dict | None = None, key: str | None = KEY):
        """(status, headers, body) of a plain HTTP request."""
        request = urllib.request.Request(self.url + path, method="POST" if body else "GET",
                                         data=json.dumps(body).encode() if body else None)
        if key is not None:
            request.add_header("Authorization", f"Bearer {key}")
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.headers, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read().decode()

    def metrics(self) -> dict[str, float]:
        status, _, text = self.raw("/metrics")
        assert status == 200
        return parse_prometheus(text)


def released(metrics: dict[str, float]) -> bool:
    """Nothing runs or waits, and the only pages in use are those of finished sequences
    kept for prefix reuse."""
    label = f'{{model="{NAME}"}}'
    idle = (metrics["fmc_running_sequences" + label], metrics["fmc_queue_depth" + label])
    kept = metrics["fmc_prefix_cache_pages" + label]
    return idle == (0, 0) and metrics["fmc_kv_pages_used" + label] <= kept


def assert_released(metrics: dict[str, float]) -> None:
    assert released(metrics), {k: v for k, v in metrics.items() if "pages" in k or "running" in k}


def parse_prometheus(text: str) -> dict[str, float]:
    """name{labels} → value; every sample line must be well-formed."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            assert re.fullmatch(r"(# (HELP|TYPE) \w+ .+)?", line), line
            continue
        match = re.fullmatch(r'(\w+(?:\{(?:\w+="[^"]*",?)*\})?) (-?[0-9.e+-]+|\+Inf|NaN)', line)
        assert match, f"not a Prometheus sample: {line!r}"
        samples[match.group(1)] = float(match.group(2))
    return samples


def write_char_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer with no merges over printable ASCII (one token per
    character) in `vocab_size` ids, so a tiny model can write JSON: ids 0–2 are <unk>, <s>,
    </s> (the tiny models' end-of-sequence id is 2), the rest pad the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or b >= 174]
    codes, extra = {}, 0
    for b in range(256):  # GPT-2's bytes → unicode table
        codes[b] = chr(b) if b in printable else chr(256 + (extra := extra + 1) - 1)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in [*range(32, 127), 10]:
        vocab[codes[b]] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"<pad{len(vocab)}>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"}))


@pytest.fixture(scope="module")
def json_artifact(tiny_artifact, tmp_path_factory) -> Path:
    """The tiny model with a character tokenizer (served --no-verify: the tokenizer's hash
    no longer matches the manifest)."""
    out = shutil.copytree(tiny_artifact(MODEL), tmp_path_factory.mktemp("serve") / "json")
    write_char_tokenizer(out / "tokenizer", 160)
    return out


@pytest.fixture(scope="module")
def server(artifact, json_artifact):
    # A small prefill budget: prompts longer than 16 tokens are prefilled in chunks between
    # decode steps, which the concurrency test exercises. A second model, "json", writes
    # characters (structured output).
    srv = Server(artifact, "--api-key", KEY, "--prefill-budget", "16", str(json_artifact),
                 "--name", "json", "--no-verify")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def engine(artifact):
    import fmc

    return fmc.load(artifact, threads=1)


def solo(engine, ids: list[int], max_tokens: int) -> tuple[str, int]:
    """(text, tokens) of a greedy run alone: what `fmc run` generates."""
    tokens = list(engine.generate_ids(ids, max_tokens))
    return engine.tokenizer.decode(tokens), len(tokens)


def chat_ids(engine, messages) -> list[int]:
    from fmc.runtime.chat import ChatTemplate

    text = ChatTemplate(engine.path).render(messages)
    return engine.tokenizer.encode(text, add_special_tokens=False)


def test_models_health_and_a_greedy_completion_equal_to_the_solo_run(server, engine, artifact,
                                                                    capsys):
    model = server.ready["models"][0]
    assert (model["id"], model["context_window"], model["chat_template"]) == (NAME, 256, True)
    assert server.ready["auth"] is True and server.ready["host"] == "127.0.0.1"
    client = server.client()
    assert [m.id for m in client.models.list()] == [NAME, "json"]
    assert server.raw("/health", key=None)[0] == 200
    result = client.completions.create(model=NAME, prompt="w5 w6 w7", max_tokens=12,
                                       temperature=0)
    text, count = solo(engine, engine.tokenizer.encode("w5 w6 w7"), 12)
    assert result.choices[0].text == text
    assert result.choices[0].finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (3, count)
    assert result.usage.total_tokens == 3 + count
    from fmc.cli import main  # and `fmc run` itself says the same

    assert main(["run", str(artifact), "-p", "w5 w6 w7", "-n", "12", "--json",
                 "--threads", "1"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert (run["text"], len(run["token_ids"]), run["finish_reason"]) == \
        (result.choices[0].text, result.usage.completion_tokens, "length")


def test_chat_streamed_and_not_equal_the_solo_run_with_usage(server, engine):
    client = server.client()
    messages = [{"role": "system", "content": "w9 w10"}, {"role": "user", "content": "w5 w6"}]
    ids = chat_ids(engine, messages)
    text, count = solo(engine, ids, 10)
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10,
                                           temperature=0, extra_body={"unknown_field": 1})
    assert whole.choices[0].message.content == text
    assert whole.choices[0].message.role == "assistant"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(ids), count)
    stream = client.chat.completions.create(model=NAME, messages=messages,
                                            max_completion_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == count


def test_stop_strings_are_cut_exactly_even_across_tokens(server, engine):
    client = server.client()
    text, _ = solo(engine, engine.tokenizer.encode("w5 w6 w7"), 12)
    words = text.split(" ")
    stop = words[2][-1] + " " + words[3][:2]  # the end of token 3, a space, token 4's start
    expected = text[:text.find(stop)]
    whole = client.completions.create(model=NAME, prompt="w5 w6 w7", max_tokens=12,
                                      temperature=0, stop=[stop, "never"])
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=NAME, prompt="w5 w6 w7", max_tokens=12,
                                         temperature=0, stop=stop, stream=True)
    pieces = [c.choices[0].text for c in streamed]
    assert "".join(pieces) == expected


def test_n_choices_seeds_penalties_and_logprobs(server, engine):
    client = server.client()
    messages = [{"role": "user", "content": "w5 w6"}]
    text, count = solo(engine, chat_ids(engine, messages), 8)
    greedy = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8,
                                            temperature=0, n=3)
    assert [c.message.content for c in greedy.choices] == [text] * 3
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert greedy.usage.completion_tokens == 3 * count
    sampled = [client.completions.create(model=NAME, prompt="w5 w6", max_tokens=8, n=2,
                                         temperature=1.0, seed=7) for _ in range(2)]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]
    assert sampled[0].choices[0].text != sampled[0].choices[1].text  # seeds 7 and 8
    # A frequency penalty breaks the greedy repetition of one word.
    plain = client.completions.create(model=NAME, prompt="w5 w6", max_tokens=8, temperature=0)
    penalized = client.completions.create(model=NAME, prompt="w5 w6", max_tokens=8,
                                          temperature=0, frequency_penalty=2.0)
    repeats = [len(t.split()) - len(set(t.split())) for t in
               (plain.choices[0].text, penalized.choices[0].text)]
    assert repeats[0] > 0 and repeats[1] < repeats[0]
    scored = client.chat.completions.create(model=NAME, messages=messages, max_tokens=4,
                                            temperature=0, logprobs=True, top_logprobs=3)
    content = scored.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    for item in content:  # greedy: the chosen token is the likeliest
        assert item.token == item.top_logprobs[0].token
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob) and item.logprob < 0


SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["color", "ok", "size"],
          "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                         "size": {"enum": [1, 2, 3]}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                  "unit": {"enum": ["C", "F"]}}}}}


def test_json_schema_output_validates_and_tool_calls_have_openai_shape(server):
    import jsonschema

    client = server.client()
    messages = [{"role": "user", "content": "Describe a ball as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "ball", "schema": SCHEMA}}
    result = client.chat.completions.create(model="json", messages=messages, max_tokens=80,
                                            response_format=fmt, n=3, temperature=1.0, seed=3)
    for choice in result.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    streamed = client.completions.create(model="json", prompt="{", max_tokens=80,
                                         temperature=0, stream=True,
                                         extra_body={"response_format": fmt})
    jsonschema.validate(json.loads("".join(c.choices[0].text for c in streamed)), SCHEMA)
    free = client.chat.completions.create(model="json", messages=messages, max_tokens=120,
                                          temperature=0,
                                          response_format={"type": "json_object"})
    assert free.choices[0].finish_reason == "length" or \
        isinstance(json.loads(free.choices[0].message.content), dict)

    call = client.chat.completions.create(model="json", messages=messages, max_tokens=80,
                                          tools=[WEATHER], tool_choice="required",
                                          temperature=0)
    choice = call.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (tool,) = choice.message.tool_calls
    assert tool.type == "function" and tool.function.name == "get_weather"
    assert tool.id.startswith("call_")
    jsonschema.validate(json.loads(tool.function.arguments), WEATHER["function"]["parameters"])
    chunks = list(client.chat.completions.create(
        model="json", messages=messages, max_tokens=80, tools=[WEATHER], temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True))
    calls = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert [(c.function.name, c.function.arguments) for c in calls] == \
        [("get_weather", tool.function.arguments)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="json", messages=messages, tools=[WEATHER],
                                       tool_choice={"type": "function",
                                                    "function": {"name": "other"}})
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="json", messages=messages,
                                       response_format={"type": "xml"})
    with pytest.raises(openai.BadRequestError, match="objekt") as error:
        client.chat.completions.create(model="json", messages=messages, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}})
    assert error.value.body["param"] == "response_format"


def test_wrong_types_are_400_naming_the_field_and_auth_is_401(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=NAME, prompt="w5", max_tokens="ten")
    assert error.value.status_code == 400 and "max_tokens" in str(error.value)
    assert error.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "w5"}],
                                       temperature="hot")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):  # beyond the context
        client.completions.create(model=NAME, prompt="w5", max_tokens=100000)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other", prompt="w5", max_tokens=2)
    status, _, body = server.raw("/v1/completions", {"model": NAME, "prompt": "w5", "n": "two"})
    assert status == 400 and json.loads(body)["error"]["param"] == "n"
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    assert server.raw("/v1/models", key=None)[0] == 401
    assert server.raw("/metrics", key=None)[0] == 401
    assert server.raw("/health", key=None)[0] == 200


async def greedy_text(client, prompt, max_tokens: int, stream: bool = False,
                      **options) -> str:
    """A greedy completion's text through the async client, streamed or in one response."""
    if stream:
        chunks = await client.completions.create(model=NAME, prompt=prompt, temperature=0,
                                                 max_tokens=max_tokens, stream=True, **options)
        return "".join([c.choices[0].text async for c in chunks])
    result = await client.completions.create(model=NAME, prompt=prompt, temperature=0,
                                             max_tokens=max_tokens, **options)
    return result.choices[0].text


def run_clients(client, calls, timeout: float | None = None) -> list:
    """The results of the coroutines `calls` run concurrently (in `timeout` seconds); the
    client closed after."""

    async def everyone():
        try:
            return await asyncio.wait_for(asyncio.gather(*calls), timeout)
        finally:
            await client.close()

    return asyncio.run(everyone())


def test_concurrent_greedy_requests_equal_their_solo_runs(server, engine):
    """Mixed prompt lengths (some prefilled in 16-token chunks) decoded together, more
    sequences than the KV cache holds at once: every text equals its solo run."""
    prompts = [" ".join(f"w{5 + (7 * i + j) % 150}" for j in range(length))
               for i, length in enumerate([3, 40, 9, 25, 1, 60, 14, 33, 5, 18])]
    expected = [solo(engine, engine.tokenizer.encode(p), 20) for p in prompts]
    before = server.metrics()
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

    texts = run_clients(client, (greedy_text(client, p, 20, stream=bool(i % 2))
                                 for i, p in enumerate(prompts)))
    assert texts == [t for t, _ in expected]
    after = server.metrics()
    label = f'{{model="{NAME}"}}'

    def delta(name):
        return after[name + label] - before.get(name + label, 0)

    assert delta("fmc_generation_tokens_total") == sum(n for _, n in expected)
    assert delta("fmc_prompt_tokens_total") >= sum(len(p.split()) for p in prompts)
    steps, stepped = delta("fmc_decode_steps_total"), delta("fmc_decode_step_sequences_total")
    assert stepped / steps > 1.5  # requests shared decode steps
    assert_released(after)
    assert delta("fmc_time_to_first_token_seconds_count") == len(prompts)
    ok = 'fmc_http_requests_total{route="/v1/completions",method="POST",status="200"}'
    assert after[ok] - before.get(ok, 0) == len(prompts)


def test_sequences_preempted_for_kv_pages_resume_and_still_equal_their_solo_runs(server,
                                                                                  engine):
    """8 sequences growing to 60+ tokens need ~40 pages; the cache has 17: the newest are
    preempted and recomputed, and every text is still its solo run's."""
    prompts = [" ".join(f"w{5 + (7 * i + j) % 150}" for j in range(length))
               for i, length in enumerate([3, 7, 9, 5, 1, 6, 4, 8])]
    expected = [engine.tokenizer.decode(list(engine.generate_ids(
        engine.tokenizer.encode(p), 60, stop_at_eos=False))) for p in prompts]
    label = f'{{model="{NAME}"}}'
    before = server.metrics()["fmc_preemptions_total" + label]
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

    assert run_clients(client, (greedy_text(client, p, 60, extra_body={"ignore_eos": True})
                                for p in prompts)) == expected
    after = server.metrics()
    assert after["fmc_preemptions_total" + label] > before
    assert_released(after)


def test_malformed_requests_are_4xx_never_5xx(server):
    request = urllib.request.Request(server.url + "/v1/completions", data=b"{not json",
                                     headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=10)
    assert error.value.code == 400 and "JSON" in json.loads(error.value.read())["error"]["message"]
    assert json.loads(server.raw("/v1/completions", {"prompt": "w5"})[2])["error"]["param"] \
        == "model"  # two models are served: a request must name one
    cases = [({"prompt": "w5", "max_tokens": 2, "temperature": 5}, 400, "temperature"),
             ({"max_tokens": 2}, 400, "prompt"),
             ({"prompt": " ".join(["w5"] * 300), "max_tokens": 1}, 400, "prompt"),
             ({"prompt": [[5, 6], [99999]], "max_tokens": 1}, 400, "prompt"),
             ({"prompt": "w5", "stop": 3}, 400, "stop"),
             ({"prompt": "w5", "n": 9}, 400, "n"),
             ({"prompt": "w5", "stream": "yes"}, 400, "stream")]
    for body, status, param in cases:
        got, _, text = server.raw("/v1/completions", {"model": NAME, **body})
        assert (got, json.loads(text)["error"]["param"]) == (status, param), (body, text)
    got, _, text = server.raw("/v1/chat/completions", {"model": NAME,
                                                        "messages": [{"content": "w5"}]})
    assert got == 400 and json.loads(text)["error"]["param"] == "messages[0].role"
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest("POST", "/v1/completions")  # announces 64 MiB, sends none of it
    for header, value in (("Authorization", f"Bearer {KEY}"), ("Content-Length", 64 << 20)):
        connection.putheader(header, value)
    connection.endheaders()
    assert connection.getresponse().status == 413
    connection.close()
    assert server.raw("/v1/nothing", key=None)[0] == 404


def test_a_second_chat_turn_prefills_only_the_new_turn_and_equals_the_solo_run(server,
                                                                                  engine):
    client = server.client()
    label = f'{{model="{NAME}"}}'
    first = [{"role": "user", "content": " ".join(f"w{i}" for i in range(10, 40))}]
    one = client.chat.completions.create(model=NAME, messages=first, max_tokens=12,
                                         temperature=0)
    second = [*first, {"role": "assistant", "content": one.choices[0].message.content},
              {"role": "user", "content": "w50 w51"}]
    before = server.metrics()["fmc_prefix_reused_tokens_total" + label]
    two = client.chat.completions.create(model=NAME, messages=second, max_tokens=8,
                                         temperature=0)
    ids = chat_ids(engine, second)
    assert two.choices[0].message.content == solo(engine, ids, 8)[0]
    cached = two.usage.prompt_tokens_details.cached_tokens
    # The first turn's prompt and reply were cached, but the reply's last token (sampled,
    # never decoded): only the new user turn and that token were prefilled.
    assert cached == len(chat_ids(engine, first)) + one.usage.completion_tokens - 1
    assert two.usage.prompt_tokens == len(ids) and len(ids) - cached == 7
    after = server.metrics()
    assert after["fmc_prefix_reused_tokens_total" + label] - before == cached
    assert after["fmc_prefix_cache_sequences" + label] >= 1


def test_a_client_that_disconnects_frees_its_pages(server):
    stream = server.client().completions.create(
        model=NAME, prompt="w5 w6", max_tokens=200, temperature=0, stream=True,
        extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    stream.close()
    deadline = time.monotonic() + 10
    while True:
        metrics = server.metrics()
        cancelled = f'fmc_requests_finished_total{{model="{NAME}",outcome="cancelled"}}'
        if released(metrics) and metrics.get(cancelled):
            break
        assert time.monotonic() < deadline, "the cancelled request kept its pages"
        time.sleep(0.05)


def test_load_32_clients_with_early_disconnects_and_shared_prefixes(server, engine):
    """32 concurrent clients, mixed prompt lengths, 8 sharing a 40-token prefix; every 4th
    goes away early (4 mid-stream, 4 before a non-streamed answer). Completed greedy answers
    equal their solo runs, nothing is a 5xx, the pages come back, the metrics add up."""
    shared = [10 + j % 100 for j in range(40)]
    prompts = []
    for i in range(32):
        if i % 4 == 1:
            ids = [*shared, 20 + i, 30 + i]
        else:
            ids = [5 + (11 * i + j) % 150 for j in range((3, 30, None, 9)[i % 4] or 17)]
        prompts.append(ids)
    leaving = {i for i in range(32) if i % 4 == 3}
    expected = {i: solo(engine, p, 16)[0] for i, p in enumerate(prompts) if i not in leaving}
    label = f'{{model="{NAME}"}}'
    before = server.metrics()
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0,
                                timeout=60)

    async def one(i):
        ids = prompts[i]
        if i in leaving and i % 8 == 3:  # reads two chunks of a long stream and hangs up
            stream = await client.completions.create(model=NAME, prompt=ids, max_tokens=200,
                                                     temperature=0, stream=True,
                                                     extra_body={"ignore_eos": True})
            seen = 0
            async for _chunk in stream:
                seen += 1
                if seen == 2:
                    break
            await stream.close()
            return None
        if i in leaving:  # gives up before its answer, after the server has the request
            impatient = client.with_options(timeout=openai.Timeout(60, read=0.05))
            with pytest.raises(openai.APITimeoutError):
                await impatient.completions.create(
                    model=NAME, prompt=ids, max_tokens=200, temperature=0,
                    extra_body={"ignore_eos": True})
            return None
        return await greedy_text(client, ids, 16, stream=bool(i % 2))

    texts = run_clients(client, (one(i) for i in range(32)), timeout=60)
    assert {i: t for i, t in enumerate(texts) if i not in leaving} == expected
    deadline = time.monotonic() + 30  # a loaded 2-core machine notices cancellations late
    while not released(after := server.metrics()):
        assert time.monotonic() < deadline, "pages or sequences were not released"
        time.sleep(0.05)
    while True:  # the cancellations are counted when the engine notices them
        after = server.metrics()
        outcomes = {o: after.get(f'fmc_requests_finished_total{{model="{NAME}",outcome="{o}"}}',
                                 0) - before.get(f'fmc_requests_finished_total{{model="{NAME}",'
                                                 f'outcome="{o}"}}', 0)
                    for o in ("ok", "error", "cancelled")}
        if sum(outcomes.values()) == 32 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert outcomes["error"] == 0 and outcomes["ok"] >= len(expected)
    assert outcomes["ok"] + outcomes["cancelled"] == 32
    statuses = {}
    for key, value in after.items():
        if key.startswith("fmc_http_requests_total"):
            status = int(re.search(r'status="(\d+)"', key).group(1))
            statuses[status] = statuses.get(status, 0) + value - before.get(key, 0)
    assert not [s for s, count in statuses.items() if s >= 500 and count]
    route = 'fmc_http_requests_total{route="/v1/completions",method="POST",status="%d"}'
    answered = sum(after.get(route % s, 0) - before.get(route % s, 0) for s in (200, 499))
    assert answered == 32
    assert after["fmc_prefix_reused_tokens_total" + label] > \
        before["fmc_prefix_reused_tokens_total" + label]  # the shared prefix was reused


def test_the_chat_page_is_one_self_contained_file(server):
    status, headers, page = server.raw("/", key=None)  # the page is open; its calls need the key
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "/v1/chat/completions" in page and "tokens/s" in page
    assert not re.search(r"https?://|<script[^>]*src=|<link", page)  # no CDN, no build


def test_the_chat_page_streams_a_conversation_in_a_real_browser(server, engine):
    """Debian's chromium driven by Playwright (no browser download): two turns, the reply
    equal to the solo run, the rate shown."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    first = [{"role": "user", "content": "w5 w6"}]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#key", KEY)
            page.dispatch_event("#key", "change")
            page.wait_for_function("document.getElementById('model').options.length === 2")
            page.select_option("#model", NAME)
            page.fill("#max", "8")
            page.fill("#temperature", "0")
            replies = []
            for text in ("w5 w6", "w7"):
                page.fill("#input", text)
                page.press("#input", "Enter")
                page.wait_for_function(f"document.querySelectorAll('.assistant').length === "
                                       f"{len(replies) + 1} && "
                                       "document.getElementById('stats').dataset.done === '1'",
                                       timeout=20000)
                replies.append(page.locator(".assistant").last.text_content())
            stats = page.text_content("#stats")
        finally:
            browser.close()
    assert replies[0] == solo(engine, chat_ids(engine, first), 8)[0]
    second = [*first, {"role": "assistant", "content": replies[0]},
              {"role": "user", "content": "w7"}]
    assert replies[1] == solo(engine, chat_ids(engine, second), 8)[0]
    assert re.search(r"\d+ tokens · [0-9.]+ tokens/s", stats), stats


def test_an_exception_in_one_requests_sampling_fails_that_request_only(engine):
    """The engine loop in-process: one of two batched requests raises in its third
    sampling step; it gets an error event, the other finishes as its solo run."""
    from fmc.runtime.sampling import SamplingParams
    from fmc.serve.batching import EngineLoop, Request
    from fmc.serve.metrics import Metrics

    ids = engine.tokenizer.encode("w5 w6 w7")
    loop = EngineLoop("t", engine, Metrics(), prefix_pages=0)

    async def run():
        rule = engine.stop_rule(12)
        good = Request(ids, rule, SamplingParams(), 1, engine.tokenizer)
        bad = Request(ids, rule, SamplingParams(), 1, engine.tokenizer)
        generation, calls = bad.choices[0].generation, []

        def failing(*args):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("boom")
            return type(generation).step(generation, *args)

        generation.step = failing
        loop.start()
        try:
            loop.submit(good)
            loop.submit(bad)
            results = []
            for request in (good, bad):
                events = []
                while not (events and (events[-1].done or events[-1].error)):
                    events.append(await asyncio.wait_for(request.events.get(), 30))
                results.append(events)
            return results
        finally:
            loop.stop()

    good, bad = asyncio.run(run())
    assert "".join(e.text for e in good) == solo(engine, ids, 12)[0] and good[-1].done
    assert "boom" in bad[-1].error and len(bad) == 3  # two tokens, then the error
    assert engine.history == {}  # both sequences were removed


async def streamed_texts(requests) -> list[str]:
    """Each in-process request's text, once its last event has come (an error fails)."""
    texts = []
    for request in requests:
        events = []
        while not (events and (events[-1].done or events[-1].error)):
            events.append(await asyncio.wait_for(request.events.get(), 60))
        assert not events[-1].error, events[-1].error
        texts.append("".join(e.text for e in events))
    return texts


def recorded_engine_calls(engine, monkeypatch, gate: threading.Event, prefill_size) -> list:
    """The engine loop's calls, in order: ("prefill", prefill_size(prompts)) and ("decode",
    batch size). Decode steps wait for `gate`: on a loaded machine the loop's thread could
    otherwise run a stream to its end before the test has submitted what it interleaves."""
    calls = []
    prefill, decode = engine.prefill_batch, engine.decode_batch

    def gated_decode(seqs, tokens):
        gate.wait(30)
        calls.append(("decode", len(seqs)))
        return decode(seqs, tokens)

    monkeypatch.setattr(engine, "prefill_batch", lambda seqs, prompts: (
        calls.append(("prefill", prefill_size(prompts))), prefill(seqs, prompts))[1])
    monkeypatch.setattr(engine, "decode_batch", gated_decode)
    return calls


def test_a_long_prompt_is_prefilled_in_budget_chunks_between_decode_steps(engine,
                                                                          monkeypatch):
    """The engine loop in-process with a 16-token prefill budget: while a 60-token prompt
    is prefilled (16, 16, 16, 12), the running request decodes between every chunk; both
    answers equal their solo runs."""
    from fmc.runtime.sampling import SamplingParams
    from fmc.serve.batching import EngineLoop, Request
    from fmc.serve.metrics import Metrics

    second_submitted = threading.Event()
    calls = recorded_engine_calls(engine, monkeypatch, second_submitted,
                                  lambda prompts: sum(map(len, prompts)))
    short = engine.tokenizer.encode("w5 w6 w7")
    long = [5 + (3 * j) % 150 for j in range(60)]
    loop = EngineLoop("t", engine, Metrics(), prefill_budget=16, prefix_pages=0)

    async def run():
        first = Request(short, engine.stop_rule(30), SamplingParams(), 1, engine.tokenizer)
        second = Request(long, engine.stop_rule(5), SamplingParams(), 1, engine.tokenizer)
        loop.start()
        try:
            loop.submit(first)
            while ("prefill", len(short)) not in calls:  # the first request is running
                await asyncio.sleep(0.01)
            loop.submit(second)
            second_submitted.set()
            return await streamed_texts([first, second])
        finally:
            loop.stop()

    texts = asyncio.run(run())
    monkeypatch.undo()
    start = calls.index(("prefill", 16))
    assert calls[start:start + 8] == [("prefill", 16), ("decode", 1)] * 3 + \
        [("prefill", 12), ("decode", 2)]
    assert texts[1] == solo(engine, long, 5)[0]
    assert texts[0] == solo(engine, short, 30)[0]
    assert engine.history == {}


def test_prompts_arriving_together_are_spread_over_steps_while_streams_decode(engine,
                                                                             monkeypatch):
    """Prefill budget 64, busy budget 12: four 10-token prompts submitted together while a
    stream decodes are prefilled one per step, a decode step between each (packed into one
    40-token call, the stream would wait for all four); with nothing decoding, the same four
    share one call. Every answer equals its solo run."""
    from fmc.runtime.sampling import SamplingParams
    from fmc.serve.batching import EngineLoop, Request
    from fmc.serve.metrics import Metrics

    all_submitted = threading.Event()
    calls = recorded_engine_calls(engine, monkeypatch, all_submitted,
                                  lambda prompts: tuple(map(len, prompts)))
    running = engine.tokenizer.encode("w5 w6 w7")
    burst = [[5 + (7 * i + 3 * j) % 150 for j in range(10)] for i in range(4)]

    def serve_burst(stream: bool) -> list[str]:
        loop = EngineLoop("t", engine, Metrics(), prefill_budget=64, prefix_pages=0,
                          busy_prefill_budget=12)

        async def run():
            requests = [Request(p, engine.stop_rule(3), SamplingParams(), 1, engine.tokenizer)
                        for p in burst]
            if stream:
                requests.insert(0, Request(running, engine.stop_rule(30), SamplingParams(),
                                           1, engine.tokenizer))
            if not stream:  # all in the inbox before the loop's first turn
                for request in requests:
                    loop.submit(request)
            loop.start()
            try:
                if stream:
                    loop.submit(requests[0])
                    while ("prefill", (len(running),)) not in calls:
                        await asyncio.sleep(0.01)
                    # the loop is now held in the stream's first decode step, so its next
                    # turn admits the whole burst at once
                    for request in requests[1:]:
                        loop.submit(request)
                all_submitted.set()
                return await streamed_texts(requests)
            finally:
                loop.stop()

        return asyncio.run(run())

    texts = serve_burst(stream=True)
    start = calls.index(("prefill", (10,)))
    assert [kind for kind, _ in calls[start:start + 8]] == ["prefill", "decode"] * 4
    assert [size for kind, size in calls[start:start + 8] if kind == "prefill"] == [(10,)] * 4
    assert texts[0] == solo(engine, running, 30)[0]
    calls.clear()
    alone = serve_burst(stream=False)
    assert calls[0] == ("prefill", (10, 10, 10, 10))
    monkeypatch.undo()
    assert texts[1:] == alone == [solo(engine, p, 3)[0] for p in burst]
    assert engine.history == {}


def test_a_lone_stream_yields_its_pages_to_a_prompt_being_prefilled(engine):
    """A long stream and a 200-token prompt prefilled 4 tokens a turn share the tiny
    artifact's 17-page KV cache.
    The stream grows into the pages the prompt was promised; when it needs a page and none is
    free, it is the only decoding sequence, and it is preempted (recomputed later) rather than
    run into a full cache. No error; every answer equals its solo run."""
    from fmc.runtime.sampling import SamplingParams
    from fmc.serve.batching import EngineLoop, Request
    from fmc.serve.metrics import Metrics

    assert engine.available_pages() == 17
    stream = [5, 6, 7]
    prompt = [5 + (7 * j) % 150 for j in range(200)]
    metrics = Metrics()
    loop = EngineLoop("t", engine, metrics, prefill_budget=4, prefix_pages=0)

    async def run():
        requests = [Request(stream, engine.stop_rule(150), SamplingParams(), 1,
                            engine.tokenizer),
                    Request(prompt, engine.stop_rule(5), SamplingParams(), 1, engine.tokenizer)]
        for request in requests:  # both in the inbox before the loop's first turn
            loop.submit(request)
        loop.start()
        try:
            return await streamed_texts(requests)
        finally:
            loop.stop()

    texts = asyncio.run(run())
    assert sum(metrics.preemptions.values()) >= 1
    assert texts == [solo(engine, stream, 150)[0], solo(engine, prompt, 5)[0]]
    assert engine.history == {}


def test_a_prompt_being_prefilled_keeps_a_page_for_each_of_its_choices(engine):
    """Choices 2…n fork the finished prompt; mid-page, each fork copies that page. Until the
    prompt is done, its job keeps them reserved (it used to keep one, for choice 1)."""
    from fmc.runtime.sampling import SamplingParams
    from fmc.serve.batching import EngineLoop, Request
    from fmc.serve.metrics import Metrics

    loop = EngineLoop("t", engine, Metrics(), prefill_budget=16, prefix_pages=0)

    async def admitted() -> int:
        request = Request(list(range(5, 25)), engine.stop_rule(2), SamplingParams(), 3,
                          engine.tokenizer)
        loop._waiting.append(request)
        loop._admit()
        try:
            return loop._reserved_pages()
        finally:
            loop._release(request)

    assert asyncio.run(admitted()) == 2 + 3  # 20 prompt tokens, then a page per choice
    assert engine.history == {}


@pytest.mark.parametrize("option", ["--prefill-budget", "--busy-prefill-budget"])
def test_a_budget_below_one_is_a_usage_error(option, artifact, capsys):
    from fmc.cli import main

    assert main(["serve", str(artifact), option, "0"]) == 2
    assert "--busy-prefill-budget must be ≥ 1" in capsys.readouterr().err


def test_a_full_queue_is_429_with_retry_after_and_sigterm_exits_0(tiny_artifact):
    srv = Server(tiny_artifact(MODEL), "--max-batch", "1", "--max-queue", "1")
    try:
        status, _, body = srv.raw("/v1/chat/completions", {"messages": [
            {"role": "user", "content": "w5"}]}, key=None)  # this artifact has no template
        assert status == 400 and "no chat template" in json.loads(body)["error"]["message"]
        results = []

        def call():
            results.append(srv.raw("/v1/completions", {"prompt": "w5", "max_tokens": 200,
                                                       "temperature": 0, "ignore_eos": True},
                                   key=None))

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(status for status, _, _ in results)
        assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}
        for status, headers, body in results:
            if status == 429:
                assert headers["Retry-After"] == "1"
                assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"
        # SIGTERM while a stream is running: the server finishes and exits 0.
        stream = srv.client().completions.create(model=NAME, prompt="w5", max_tokens=100,
                                                 temperature=0, stream=True)
        next(iter(stream))
        srv.process.send_signal(signal.SIGTERM)
        list(stream)
        assert srv.process.wait(20) == 0
    finally:
        srv.stop()
