"""What routes depend on: the settings and the engine, read from the app (a test's app holds its own)."""

from __future__ import annotations

from fastapi import Request

from distillery.serving.config import Settings
from distillery.serving.engine import Engine
from distillery.serving.jobs import EngineUnavailable


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def engine_of(request: Request) -> Engine:
    """The engine; 503 with Retry-After while the model is still loading."""
    engine = request.app.state.engine
    if engine is None:
        raise EngineUnavailable("the model is loading; retry later (GET /readyz says when it is ready)")
    return engine
