"""The playground: one HTML page at `/` to try the server in a browser (static; it calls the public API)."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()
PAGE = files("distillery.serving") / "static" / "playground.html"


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))
