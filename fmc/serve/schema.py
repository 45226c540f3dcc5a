"""Request bodies of the OpenAI API, checked by hand: unknown fields are ignored (as OpenAI's
server ignores them), a field of the wrong type or out of range is an `APIError` (400) that
names it. The result is a plain `GenerationRequest` the engine loop understands."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MAX_N = 8  # choices per request; also bounded by the engine's batch size
MAX_STOP = 4  # stop strings, as OpenAI allows
MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """An error answered as OpenAI's error object: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type_, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object", type(None): "null"}.get(type(value),
                                                                       type(value).__name__)


def _wrong(name: str, expected: str, value: Any) -> APIError:
    return APIError(400, f"'{name}' must be {expected}, got {_kind(value)}", param=name)


def _int(body: dict, name: str, default: int | None = None, low: int | None = None,
         high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong(name, "an integer", value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"≥ {low}" if high is None else f"between {low} and {high}"
        raise APIError(400, f"'{name}' must be {bounds}, got {value}", param=name)
    return value


def _float(body: dict, name: str, default: float, low: float | None = None,
           high: float | None = None, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong(name, "a number", value)
    value = float(value)
    if (low is not None and (value <= low if low_open else value < low)) or \
            (high is not None and value > high):
        lower = f"> {low}" if low_open else f"≥ {low}"
        bounds = lower if high is None else f"{lower} and ≤ {high}"
        raise APIError(400, f"'{name}' must be {bounds}, got {value:g}", param=name)
    return value


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _wrong(name, "a boolean", value)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _wrong("stop", "a string or an array of strings", value)
    if len(value) > MAX_STOP:
        raise APIError(400, f"'stop' takes at most {MAX_STOP} strings, got {len(value)}",
                       param="stop")
    return tuple(s for s in value if s)  # an empty stop string never matches


def _model(body: dict) -> str | None:
    value = body.get("model")
    if value is not None and not isinstance(value, str):
        raise _wrong("model", "a string", value)
    return value


@dataclass
class GenerationRequest:
    """What both completion endpoints ask of the engine, per prompt."""

    model: str | None
    prompts: list[Any]  # chat: [messages]; completions: strings or token-id lists
    max_tokens: int | None  # None: up to the context window
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    echo: bool = False
    json_schema: dict | None = None  # response_format json_object / json_schema
    tools: list[dict] = field(default_factory=list)
    forced_tools: list[str] | None = None  # tool_choice "required" or a named function


def _common(body: dict, prompts: list[Any], max_tokens: int | None) -> GenerationRequest:
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _wrong("stream_options", "an object", options)
    include_usage = _bool(options or {}, "include_usage") if options else False
    if options and not isinstance(options.get("include_usage", False), bool):
        raise _wrong("stream_options.include_usage", "a boolean", options["include_usage"])
    return GenerationRequest(
        model=_model(body), prompts=prompts, max_tokens=max_tokens,
        json_schema=_response_format(body),
        n=_int(body, "n", 1, 1, MAX_N), stream=stream, include_usage=include_usage,
        temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_float(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=_int(body, "top_k", 0, -1) or 0,
        seed=_int(body, "seed"),
        stop=_stop(body),
        presence_penalty=_float(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_float(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_float(body, "repetition_penalty", 1.0, 0.0, low_open=True),
        ignore_eos=_bool(body, "ignore_eos"),
    )


def _response_format(body: dict) -> dict | None:
    """The JSON schema the output must follow, or None for free text."""
    value = body.get("response_format")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _wrong("response_format", "an object", value)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise _wrong("response_format.json_schema", "an object", spec)
        schema = spec.get("schema")
        if schema is None:
            return {"type": "object"}
        if not isinstance(schema, dict):
            raise _wrong("response_format.json_schema.schema", "an object", schema)
        return schema
    raise APIError(400, "'response_format.type' must be \"text\", \"json_object\" or "
                   f"\"json_schema\", got {json.dumps(kind)}", param="response_format.type")


def _tools(body: dict) -> tuple[list[dict], list[str] | None]:
    """(tools, the names a call is forced among — None when the model may answer text)."""
    tools = body.get("tools")
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise _wrong("tools", "an array", tools)
    names = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise APIError(400, f"'{where}' must be {{\"type\": \"function\", "
                           "\"function\": {…}}", param=where)
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _wrong(f"{where}.function", "an object", function)
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise _wrong(f"{where}.function.name", "a non-empty string", function.get("name"))
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise _wrong(f"{where}.function.parameters", "an object", parameters)
        names.append(function["name"])
    choice = body.get("tool_choice")
    if choice is None or choice in ("none", "auto"):
        return tools, None
    if choice == "required":
        if not tools:
            raise APIError(400, "'tool_choice' is \"required\" but there are no 'tools'",
                           param="tool_choice")
        return tools, names
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict) and \
            isinstance(choice["function"].get("name"), str):
        name = choice["function"]["name"]
        if name not in names:
            raise APIError(400, f"'tool_choice' names {name!r}, which is not in 'tools'",
                           param="tool_choice")
        return tools, [name]
    raise APIError(400, "'tool_choice' must be \"none\", \"auto\", \"required\" or "
                   '{"type": "function", "function": {"name": …}}', param="tool_choice")


def _text_of(content: Any, where: str) -> str:
    """A message's content: a string, or an array of {"type": "text", "text": …} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                raise APIError(400, f"'{where}[{i}]' must be a text part "
                               '({"type": "text", "text": …}); only text is supported',
                               param=f"{where}[{i}]")
            texts.append(part["text"])
        return "".join(texts)
    if content is None:
        return ""
    raise _wrong(where, "a string or an array of text parts", content)


def chat_request(body: dict) -> GenerationRequest:
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array", param="messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _wrong(f"messages[{i}]", "an object", message)
        role = message.get("role")
        if not isinstance(role, str):
            raise _wrong(f"messages[{i}].role", "a string", role)
        clean.append({"role": role,
                      "content": _text_of(message.get("content"), f"messages[{i}].content")})
    max_tokens = _int(body, "max_completion_tokens", None, 0)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None, 0)
    request = _common(body, [clean], max_tokens)
    request.tools, request.forced_tools = _tools(body)
    request.logprobs = _bool(body, "logprobs")
    request.top_logprobs = _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if request.top_logprobs and not request.logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return request


def _prompts(value: Any) -> list[Any]:
    """A completion prompt: a string, an array of strings, an array of token ids, or an
    array of such arrays → a list of prompts (strings or token-id lists)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return [list(value)]
        if all(isinstance(p, list) and p and
               all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in value):
            return [list(p) for p in value]
    if value is None:
        raise APIError(400, "'prompt' is required", param="prompt")
    raise _wrong("prompt", "a string, an array of strings or an array of token ids", value)


def completion_request(body: dict) -> GenerationRequest:
    request = _common(body, _prompts(body.get("prompt")), _int(body, "max_tokens", 16, 0))
    top = _int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    request.logprobs = top is not None
    request.top_logprobs = top or 0
    request.echo = _bool(body, "echo")
    return request
