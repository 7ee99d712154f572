"""The FastAPI app: settings, the engine's lifespan, one router per API, error shapes, the OpenAPI document."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI

from distillery.serving.body_limit import BodyLimit
from distillery.serving.config import Settings, get_settings
from distillery.serving.engine import Engine
from distillery.serving.errors import ErrorShapes, install_error_handlers
from distillery.serving.jobs import on_torch_thread
from distillery.serving.openapi import install_openapi
from distillery.serving.routes import a1111_api, admin, native, openai_api, playground

log = logging.getLogger("distillery.app")
READY_LOG = "distillery is ready"  # logged through uvicorn's logger once the model is warm (distillery/testing)
DESCRIPTION = ("Text-to-image serving for distilled diffusion models: single-evaluation guidance, per-request adapters, "
               "step-level batching. `guidance` is w: eps = (1 + w) eps(c) - w eps(empty).")


def _exit_process(cause: BaseException) -> None:
    """The engine's worker died, or the model could not load: stop the server (uvicorn shuts down gracefully on
    SIGTERM, then dies of it, so the exit status says so) and let the orchestrator start a fresh one."""
    log.critical("stopping the server so that it is restarted: %r", cause)
    os.kill(os.getpid(), signal.SIGTERM)


def _drain_on_sigterm(app: FastAPI) -> None:
    """SIGTERM: stop taking new requests at once (503, /readyz 503) while uvicorn lets those in flight finish,
    within `graceful_shutdown_s`. Chained before uvicorn's own handler; only the main thread may install one."""
    if threading.current_thread() is not threading.main_thread():
        return  # in-process test clients run the lifespan on another thread: no signals there
    previous = signal.getsignal(signal.SIGTERM)

    def drain(signum, frame):
        engine = getattr(app.state, "engine", None)
        if engine is not None:
            engine.drain()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, drain)


def create_app(settings: Settings | None = None, load_in_background: bool = False) -> FastAPI:
    """The app. `load_in_background` (the `distillery serve` command): the server listens at once, answering
    /healthz while the model loads and 503 elsewhere until it is warm; otherwise the lifespan waits for it."""
    settings = settings or get_settings()

    async def load(app: FastAPI) -> None:
        on_death = _exit_process if settings.exit_on_worker_death else None
        engine = await on_torch_thread(Engine.from_settings, settings, on_death)
        await engine.start()
        app.state.engine = engine
        app.openapi_schema = None  # the document states the loaded model's limits from now on
        logging.getLogger("uvicorn.error").info("%s: model %s warm, serving", READY_LOG, settings.model_path)

    async def load_or_exit(app: FastAPI) -> None:
        try:
            await load(app)
        except Exception as exc:  # noqa: BLE001 - the process cannot serve: say why, and exit
            log.exception("the model could not be loaded")
            _exit_process(exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = None
        loading = asyncio.create_task(load_or_exit(app)) if load_in_background else None
        if loading is None:
            await load(app)
        _drain_on_sigterm(app)
        yield
        if loading is not None and not loading.done():
            loading.cancel()
        if app.state.engine is not None:
            await app.state.engine.stop()

    app = FastAPI(title="distillery", version="0.1.0", lifespan=lifespan, description=DESCRIPTION)
    app.state.settings, app.state.engine = settings, None
    shapes = ErrorShapes()
    for api in (openai_api, a1111_api):
        shapes.register(api.router.prefix, api.error_shape)
    install_error_handlers(app, shapes)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, shapes=shapes)
    for api in (native, admin, playground, openai_api, a1111_api):
        app.include_router(api.router)
    install_openapi(app)
    return app


def serving_app() -> FastAPI:
    """What `distillery serve` runs: the settings from the environment, the model loaded behind a live socket."""
    return create_app(load_in_background=True)
