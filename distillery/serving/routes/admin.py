"""The operator's routes: adapters (list; load and unload behind the API key), health, readiness, metrics."""

from __future__ import annotations

import asyncio
import errno
import secrets
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST

from distillery.serving.config import API_KEY_ENV, Settings
from distillery.serving.engine import Engine
from distillery.serving.jobs import on_torch_thread
from distillery.serving.openapi import ADMIN, FAILURES, INVALID
from distillery.serving.routes.deps import engine_of, settings_of
from distillery.serving.schemas import (AdapterList, AdapterLoaded, Health, LoadAdapterRequest, Problem, Readiness,
                                        Unloaded)

router = APIRouter(tags=["admin"])

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="APIKey",
                              description=f"The server's `{API_KEY_ENV}`; without one set, admin routes answer 403.")


def admin(x_api_key: str | None = Security(api_key_header), settings: Settings = Depends(settings_of)) -> None:
    if not settings.api_key:
        raise HTTPException(status_code=403, detail=f"admin routes are disabled: start the server with {API_KEY_ENV} "
                                                    f"set (e.g. to `openssl rand -hex 32`) and send it in X-API-Key")
    given, key = ((k or "").encode("utf-8", "surrogateescape") for k in (x_api_key, settings.api_key))
    if not secrets.compare_digest(given, key):  # bytes: any header value compares, in constant time
        raise HTTPException(status_code=401, detail="admin routes need the server's key in the X-API-Key header",
                            headers={"WWW-Authenticate": 'APIKey header="X-API-Key"'})


def located(root: str, relative: str) -> Path:
    """The adapter folder or LoRA file at `relative` under `root` (file system calls: off the event loop)."""
    root_path = Path(root).resolve()
    found = (root_path / relative).resolve()
    if not found.is_relative_to(root_path):  # the schema's pattern keeps ".." out; a symlink can still lead outside
        raise HTTPException(status_code=400, detail=f"path {relative!r} is outside the adapters root")
    try:
        usable = found.is_dir() or (found.suffix == ".safetensors" and found.is_file())
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        usable = False  # a name longer than the file system allows names no folder
    if not usable:
        raise HTTPException(status_code=404, detail=f"no adapter folder or .safetensors LoRA file {relative!r} under "
                                                    f"the adapters root")
    return found


@router.get("/adapters", response_model=AdapterList, response_model_exclude_none=True)
async def list_adapters(eng: Engine = Depends(engine_of)) -> dict:
    return eng.adapters()


@router.post("/adapters", status_code=201, response_model=AdapterLoaded, dependencies=[Depends(admin)], responses={
    400: {"model": Problem, "description": "Not a usable adapter: outside the root, not safetensors, made for "
                                           "another base, or corrupt; nothing loaded."},
    **ADMIN,
    404: {"model": Problem, "description": "No adapter folder or LoRA file at that path under the adapters root."},
    409: {"model": Problem, "description": "An adapter of that name is registered already."},
    413: FAILURES[413],
    **INVALID,
})
async def load_adapter(req: LoadAdapterRequest, eng: Engine = Depends(engine_of),
                       settings: Settings = Depends(settings_of)) -> dict:
    """Load an adapter folder, or a LoRA .safetensors file (kohya / A1111 / diffusers: a style adapter), from
    under the adapters root."""
    if eng.has_adapter(req.name):
        raise HTTPException(status_code=409, detail=f"an adapter named {req.name!r} is registered already; "
                                                    f"DELETE /adapters/{req.name} first")
    try:
        path = await asyncio.to_thread(located, settings.adapters_root, req.path)
    except (ValueError, OSError, RuntimeError) as exc:  # a symlink loop, a folder it may not read, ...
        raise HTTPException(status_code=400, detail=f"path {req.path!r} is not usable: {exc}") from None
    try:
        return await on_torch_thread(eng.load_adapter, req.name, path)
    except ValueError as exc:  # AdapterError: the files say why
        raise HTTPException(status_code=400, detail=str(exc)) from None


@router.delete("/adapters/{name}", response_model=Unloaded, dependencies=[Depends(admin)], responses={
    **ADMIN,
    404: {"model": Problem, "description": "No adapter of that name; the message lists those available."},
    409: {"model": Problem, "description": "Requests are using it; retry when they finish."},
})
async def unload_adapter(name: str, eng: Engine = Depends(engine_of)) -> dict:
    await on_torch_thread(eng.unload_adapter, name)  # it frees tensors: the torch thread's work
    return {"unloaded": name}


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
          "description": "Prometheus text exposition (docs/metrics.md)."}})
async def metrics(eng: Engine = Depends(engine_of)) -> Response:
    return Response(eng.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", response_model=Health, responses={
    503: {"model": Health, "description": "Dead: the engine's worker died (the liveness probe restarts it)."}})
async def healthz(request: Request) -> JSONResponse:
    """Alive while the process can serve, the model loading included (the startup and liveness probes ask)."""
    eng = request.app.state.engine
    dead = eng is not None and eng.dead is not None
    return JSONResponse(status_code=503 if dead else 200, content={"status": "dead" if dead else "alive"})


@router.get("/readyz", response_model=Readiness, responses={
    503: {"model": Readiness, "description": "Not ready: loading, warming up, draining or stopping."}})
async def readyz(request: Request) -> JSONResponse:
    eng = request.app.state.engine
    ready = bool(eng and eng.ready)
    return JSONResponse(status_code=200 if ready else 503, content={"ready": ready})
