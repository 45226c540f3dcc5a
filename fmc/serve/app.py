"""The HTTP side: a FastAPI app with OpenAI's routes over one `EngineLoop` per model.

POST /v1/chat/completions and /v1/completions (JSON, or server-sent events with `stream`),
GET /v1/models, /health and /metrics. Errors are OpenAI's error object with a 4xx status
(a 5xx only for a failure inside the server). With an API key, /v1/* and /metrics need
`Authorization: Bearer KEY` (compared in constant time); /health is always open."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from fmc.serve.batching import EngineLoop, Event, QueueFull, Request
from fmc.serve.metrics import Metrics
from fmc.serve.schema import (
    APIError,
    GenerationRequest,
    chat_request,
    completion_request,
    parse_json,
)

log = logging.getLogger("fmc.serve")

MAX_BODY_BYTES = 4 * 1024 * 1024
RETRY_AFTER_SECONDS = 1
ROUTES = ("/", "/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
          "/metrics")
CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"


@dataclass
class Model:
    name: str
    engine: Any
    loop: EngineLoop
    template: Any = None  # fmc.runtime.chat.ChatTemplate, or None
    template_error: str = ""
    created: int = 0


class _CountRequests:
    """ASGI middleware: every HTTP response's status into the metrics, by route."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            path = scope.get("path", "")
            self.metrics.request(path if path in ROUTES else "other", scope.get("method", ""),
                                 status["code"])


def create_app(models: list[Model], metrics: Metrics, api_key: str | None = None,
               max_body: int = MAX_BODY_BYTES):
    by_name = {m.name: m for m in models}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for model in models:
            model.loop.start()
        yield
        for model in models:
            model.loop.stop()

    app = FastAPI(title="fmc", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)

    def error_response(error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return error_response(APIError(exc.status_code, str(exc.detail), code=None,
                                       headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("request failed")
        return error_response(APIError(500, f"internal error: {type(exc).__name__}",
                                       type_="server_error"))

    def authorize(request: HTTPRequest) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key (Authorization: Bearer KEY)",
                           code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: HTTPRequest) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise APIError(413, f"the request body exceeds {max_body} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise APIError(413, f"the request body exceeds {max_body} bytes")
            chunks.append(chunk)
        return parse_json(b"".join(chunks))

    def pick(name: str | None) -> Model:
        if name is None:
            if len(models) == 1:
                return models[0]
            raise APIError(400, "'model' is required", param="model")
        if name not in by_name:
            raise APIError(404, f"The model '{name}' does not exist (served: "
                           f"{', '.join(by_name)})", param="model", code="model_not_found")
        return by_name[name]

    @app.get("/")
    async def chat_page():
        """A chat page (one static file, no CDN); its API calls carry the key, not the page."""
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": [m.name for m in models]}

    @app.get("/metrics")
    async def metrics_route(request: HTTPRequest):
        authorize(request)
        return PlainTextResponse(metrics.render([m.name for m in models]),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models(request: HTTPRequest):
        authorize(request)
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "fmc",
             "context_window": m.engine.context_window} for m in models]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        authorize(request)
        spec = chat_request(await read_body(request))
        model = pick(spec.model)
        if model.template is None:
            raise APIError(400, f"model '{model.name}' has no chat template "
                           f"({model.template_error}); use /v1/completions", param="messages")
        text = _render(model.template, spec.prompts[0], spec.tools)
        ids = model.engine.tokenizer.encode(text, add_special_tokens=False)
        return await _generate(request, model, spec, [ids], [text], chat=True)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        authorize(request)
        spec = completion_request(await read_body(request))
        model = pick(spec.model)
        tokenizer = model.engine.tokenizer
        ids, texts = [], []
        for prompt in spec.prompts:
            if isinstance(prompt, str):
                ids.append(tokenizer.encode(prompt))
                texts.append(prompt)
            else:
                vocab = model.engine.config.vocab_size
                bad = [t for t in prompt if not 0 <= t < vocab]
                if bad:
                    raise APIError(400, f"token id {bad[0]} is outside the vocabulary "
                                   f"(0..{vocab - 1})", param="prompt")
                ids.append(list(prompt))
                texts.append(tokenizer.decode(prompt))
        return await _generate(request, model, spec, ids, texts, chat=False)

    async def _generate(http: HTTPRequest, model: Model, spec: GenerationRequest,
                        prompts: list[list[int]], texts: list[str], chat: bool):
        engine, loop = model.engine, model.loop
        window = engine.context_window
        if spec.n > loop.max_batch:
            raise APIError(400, f"'n' is {spec.n}; this server runs at most {loop.max_batch} "
                           "sequences at once (--max-batch)", param="n")
        field = "max_completion_tokens" if chat else "max_tokens"
        rules = []
        for ids in prompts:
            if not ids:
                raise APIError(400, "the prompt is empty", param="messages" if chat else "prompt")
            if len(ids) > window:
                raise APIError(400, f"the prompt is {len(ids)} tokens; the context window "
                               f"holds {window}", param="messages" if chat else "prompt",
                               code="context_length_exceeded")
            max_tokens = window - len(ids) if spec.max_tokens is None else spec.max_tokens
            if len(ids) + max_tokens > window:
                raise APIError(400, f"'{field}' is {max_tokens}, but the prompt is {len(ids)} "
                               f"tokens and the context window holds {window} (at most "
                               f"{window - len(ids)} more)", param=field,
                               code="context_length_exceeded")
            rules.append(engine.stop_rule(max_tokens, not spec.ignore_eos, spec.stop))
        from fmc.runtime.sampling import SamplingParams

        sampling = SamplingParams(spec.temperature, spec.top_p, spec.seed, max(spec.top_k, 0),
                                  spec.repetition_penalty)
        grammar = await _grammar(engine, spec)
        events: asyncio.Queue[Event] = asyncio.Queue()
        requests = [Request(ids, rule, sampling, spec.n, engine.tokenizer,
                            spec.presence_penalty, spec.frequency_penalty,
                            spec.top_logprobs if spec.logprobs else None, events, i * spec.n,
                            grammar)
                    for i, (ids, rule) in enumerate(zip(prompts, rules, strict=True))]
        submitted = []
        try:
            for r in requests:
                loop.submit(r)
                submitted.append(r)
        except QueueFull:
            for r in submitted:
                r.cancel()
            raise APIError(429, f"the queue is full ({loop.max_queue} waiting requests); "
                           "retry later", type_="requests", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        answer = _Answer(model.name, chat, spec, prompts, texts, engine.tokenizer, requests)
        if spec.stream:
            from sse_starlette.sse import EventSourceResponse

            return EventSourceResponse(_stream(answer, events, requests), ping=15)
        async def collect():
            async for event in _events(events, len(requests)):
                answer.add(event)

        task = asyncio.ensure_future(collect())
        try:
            while not task.done():  # a client that went away cancels its requests
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await http.is_disconnected():
                    task.cancel()
                    # nginx's 499 "client closed request", for the metrics: nobody reads it
                    return JSONResponse(APIError(499, "the client disconnected").body(),
                                        status_code=499)
            await task
        finally:
            for r in requests:
                r.cancel()
        return JSONResponse(answer.final())

    app.add_middleware(_CountRequests, metrics=metrics)
    return app


def _render(template, messages: list[dict], tools: list[dict]) -> str:
    """The conversation in the model's chat template; `tools` are passed to templates that
    describe them (HF's convention), others ignore them."""
    from jinja2.exceptions import TemplateError

    if not tools:
        from fmc.errors import FmcError

        try:
            return template.render(messages)
        except FmcError as exc:
            raise APIError(400, str(exc), param="messages") from None
    try:
        return template.template.render(messages=messages, tools=tools,
                                        add_generation_prompt=True, **template.special)
    except TemplateError as exc:
        raise APIError(400, f"chat template: {exc}", param="messages") from None


async def _grammar(engine, spec: GenerationRequest):
    """The token-mask grammar a request needs (a forced tool call, else response_format),
    compiled off the event loop; None for free text."""
    from fmc.serve.grammar import Grammar, tool_call_schema

    if spec.forced_tools:
        schema, param = tool_call_schema(spec.tools, spec.forced_tools), "tools"
    elif spec.json_schema is not None:
        schema, param = spec.json_schema, "response_format"
    else:
        return None
    return await asyncio.to_thread(Grammar, engine, schema, param)


async def _events(events: asyncio.Queue, count: int):
    """Events of `count` requests sharing one queue, until each is done; an error raises."""
    open_ = count
    while open_:
        event = await events.get()
        if event.error is not None:
            raise APIError(500, event.error, type_="server_error")
        if event.done:
            open_ -= 1
            continue
        yield event


async def _stream(answer: _Answer, events: asyncio.Queue, requests: list[Request]):
    try:
        for chunk in answer.opening():
            yield {"data": json.dumps(chunk)}
        try:
            async for event in _events(events, len(requests)):
                chunk = answer.add(event)
                if chunk is not None:
                    yield {"data": json.dumps(chunk)}
        except APIError as exc:  # headers are sent: the error goes in the stream
            yield {"data": json.dumps(exc.body())}
            return
        if answer.spec.include_usage:
            yield {"data": json.dumps(answer.usage_chunk())}
        yield {"data": "[DONE]"}
    finally:  # a client that went away cancels its requests (pages freed next step)
        for r in requests:
            r.cancel()


class _Answer:
    """Accumulates one API call's choices; builds the streamed chunks and the final body."""

    def __init__(self, model: str, chat: bool, spec: GenerationRequest,
                 prompts: list[list[int]], texts: list[str], tokenizer,
                 requests: list[Request]):
        self.model, self.chat, self.spec = model, chat, spec
        self.requests = requests
        self.tokenizer = tokenizer
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.prompt_tokens = sum(len(p) for p in prompts)
        count = len(prompts) * spec.n
        self.texts = [""] * count
        if spec.echo and not chat:
            self.texts = [texts[i // spec.n] for i in range(count)]
        self.tokens = [0] * count
        self.finish: list[str | None] = [None] * count
        self.logprobs: list[list[dict]] = [[] for _ in range(count)]
        self.offset = [len(t) for t in self.texts]  # completions' text_offset
        self.tool_mode = chat and bool(spec.forced_tools)  # the text is a tool call's JSON

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _chat_logprob(self, event: Event) -> dict:
        def entry(token, logprob):
            text = self._token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        top = [entry(t, lp) for t, lp in (event.top_logprobs or [])]
        return {**entry(event.token, event.logprob), "top_logprobs": top}

    def add(self, event: Event) -> dict | None:
        i = event.choice
        if event.token is not None:
            self.tokens[i] += 1
        self.texts[i] += event.text
        if event.finish_reason is not None:
            self.finish[i] = event.finish_reason
        logprob = None
        if event.token is not None and event.logprob is not None:
            if self.chat:
                logprob = self._chat_logprob(event)
            else:
                logprob = {"token": self._token_text(event.token), "logprob": event.logprob,
                           "top": {self._token_text(t): lp
                                   for t, lp in (event.top_logprobs or [])},
                           "offset": self.offset[i]}
            self.logprobs[i].append(logprob)
        self.offset[i] += len(event.text)
        if not self.spec.stream or not (event.text or event.finish_reason or logprob):
            return None
        if self.tool_mode:  # the call goes out whole when it is complete
            if event.finish_reason is None:
                return None
            calls, finish = self._tool_calls(i)
            chunk = self._chunk(i, "" if calls else self.texts[i], finish, None)
            if calls:
                chunk["choices"][0]["delta"] = {"tool_calls": [
                    {"index": 0, **call} for call in calls]}
            return chunk
        return self._chunk(i, event.text, event.finish_reason, logprob)

    def _tool_calls(self, i: int) -> tuple[list[dict], str | None]:
        """OpenAI's `tool_calls` from choice i's text, and its finish reason
        ("tool_calls"; or the original one when the JSON was cut short)."""
        try:
            call = json.loads(self.texts[i])
            name, arguments = call["name"], call["arguments"]
        except (ValueError, KeyError, TypeError):
            return [], self.finish[i]
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": name, "arguments": json.dumps(arguments)}}], "tool_calls"

    def _chunk(self, i: int, text: str, finish: str | None, logprob: dict | None) -> dict:
        if self.chat:
            choice = {"index": i, "delta": {"content": text} if text else {},
                      "logprobs": {"content": [logprob]} if logprob else None,
                      "finish_reason": finish}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": i, "text": text,
                      "logprobs": self._completion_logprobs([logprob]) if logprob else None,
                      "finish_reason": finish}
            kind = "text_completion"
        chunk = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                 "choices": [choice]}
        if self.spec.include_usage:
            chunk["usage"] = None
        return chunk

    def opening(self) -> list[dict]:
        """Chat streams open every choice with the assistant role."""
        if not self.chat:
            return []
        chunks = []
        for i in range(len(self.texts)):
            chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                     "model": self.model,
                     "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}]}
            if self.spec.include_usage:
                chunk["usage"] = None
            chunks.append(chunk)
        return chunks

    def usage(self) -> dict:
        completion = sum(self.tokens)
        cached = sum(r.cached for r in self.requests)  # set before the requests' events
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat
                else "text_completion", "created": self.created, "model": self.model,
                "choices": [], "usage": self.usage()}

    @staticmethod
    def _completion_logprobs(entries: list[dict]) -> dict:
        return {"tokens": [e["token"] for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [e["top"] for e in entries],
                "text_offset": [e["offset"] for e in entries]}

    def final(self) -> dict:
        choices = []
        for i, text in enumerate(self.texts):
            if self.tool_mode and (parsed := self._tool_calls(i))[0]:
                choices.append({"index": i, "message": {"role": "assistant", "content": None,
                                                        "tool_calls": parsed[0]},
                                "logprobs": {"content": self.logprobs[i]}
                                if self.spec.logprobs else None,
                                "finish_reason": parsed[1]})
            elif self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": {"content": self.logprobs[i]}
                                if self.spec.logprobs else None,
                                "finish_reason": self.finish[i]})
            else:
                choices.append({"index": i, "text": text,
                                "logprobs": self._completion_logprobs(self.logprobs[i])
                                if self.spec.logprobs else None,
                                "finish_reason": self.finish[i]})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices,
                "usage": self.usage()}
