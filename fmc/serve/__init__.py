"""`fmc serve`: an OpenAI-compatible HTTP server over compiled artifacts (docs/serve.md).

`fmc.serve.app` holds the routes, `fmc.serve.schema` the request checks,
`fmc.serve.batching` the engine loop (continuous batching) and `fmc.serve.metrics` the
Prometheus metrics. Data flows cli → serve → runtime; nothing here imports the compiler."""

from __future__ import annotations

import os
import time
from pathlib import Path

from fmc.errors import UsageError

API_KEY_ENV = "FMC_API_KEY"


def load_models(artifacts: list[Path], names: list[str] | None = None, *,
                max_batch: int | None = None, max_queue: int = 64,
                prefill_budget: int | None = None, prefix_pages: int | None = None,
                busy_prefill_budget: int | None = None, metrics=None, **load_options):
    """One `Model` (engine, engine loop, chat template) per artifact; names default to the
    artifact directories' names."""
    import fmc
    from fmc.errors import ArtifactError
    from fmc.runtime.chat import ChatTemplate
    from fmc.serve.app import Model
    from fmc.serve.batching import EngineLoop
    from fmc.serve.metrics import Metrics

    names = list(names or [])
    if len(names) > len(artifacts):
        raise UsageError(f"{len(names)} --name values for {len(artifacts)} artifacts")
    names += [Path(a).resolve().name for a in artifacts[len(names):]]
    if len(set(names)) != len(names):
        raise UsageError(f"two models would be named the same ({', '.join(names)}); "
                         "give each a --name")
    metrics = metrics or Metrics()
    models = []
    for name, path in zip(names, artifacts, strict=True):
        engine = fmc.load(path, max_batch_size=max(max_batch or 8, 1), **load_options)
        engine.tokenizer  # noqa: B018  (a missing tokenizer fails at start, not per request)
        template, template_error = None, ""
        try:
            template = ChatTemplate(engine.path)
        except ArtifactError as exc:
            template_error = str(exc)
        loop = EngineLoop(name, engine, metrics, max_batch, max_queue, prefill_budget,
                          prefix_pages, busy_prefill_budget)
        models.append(Model(name, engine, loop, template, template_error, int(time.time())))
    return models, metrics


def _check_listen(host: str, port: int) -> None:
    """Fail early, in one line, when the address cannot be bound (in use, not local)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UsageError(f"--host {host}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
            probe.listen(1)
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(artifacts: list[Path], names: list[str] | None = None, host: str = "127.0.0.1",
          port: int = 8000, api_key: str | None = None, max_queue: int = 64,
          max_batch: int | None = None, prefill_budget: int | None = None,
          prefix_pages: int | None = None, busy_prefill_budget: int | None = None,
          grace: float = 10.0, log_level: str = "info", on_ready=None,
          **load_options) -> None:
    """Load every artifact and serve until SIGINT/SIGTERM; `on_ready(info)` is called once
    the sockets listen, with the URL, the bound port (useful with port 0) and the models."""
    import uvicorn

    from fmc.serve.app import create_app

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started and on_ready is not None:
                bound = [s.getsockname() for srv in self.servers for s in srv.sockets]
                actual = bound[0][1] if bound else port
                on_ready({"url": f"http://{host}:{actual}", "host": host, "port": actual,
                          "models": [{"id": m.name, "artifact": str(m.engine.path),
                                      "context_window": m.engine.context_window,
                                      "chat_template": m.template is not None}
                                     for m in models],
                          "max_batch": max_batch, "max_queue": max_queue,
                          "auth": api_key is not None})

    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    _check_listen(host, port)  # before the (slow) loading
    models, metrics = load_models(artifacts, names, max_batch=max_batch, max_queue=max_queue,
                                  prefill_budget=prefill_budget, prefix_pages=prefix_pages,
                                  busy_prefill_budget=busy_prefill_budget, **load_options)
    app = create_app(models, metrics, api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=grace, access_log=False)
    try:
        Server(config).run()
    except SystemExit as exc:  # uvicorn's startup failure (the address was taken meanwhile)
        if exc.code == 3:
            raise UsageError(f"cannot listen on {host}:{port} (uvicorn's error above)") from None
        raise
