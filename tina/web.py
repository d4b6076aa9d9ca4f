"""The page at `/` of the Tina endpoint: type class names (or drop example images), get the
model, drop a test image, see the predicted class.

The page is one static file shipped in the package (tina/static/index.html: HTML, CSS and vanilla
JavaScript, nothing from a CDN); it talks only to the endpoint's own routes: GET /v1/info and
/readyz, POST /v1/models (safetensors bytes; the page reads the classes, model id and parameter
count from the file's metadata and offers the bytes as a download) and POST /v1/classify. Every 4xx
/ 5xx JSON error body ({"error": {"code", "message", "field"}, "request_id"}) is shown as is.
`tina.serve` includes `router` in its FastAPI app.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

__all__ = ["PAGE", "router"]

PAGE = files("tina") / "static" / "index.html"

router = APIRouter()


@router.get("/", include_in_schema=False, response_class=HTMLResponse)
async def index() -> HTMLResponse:
    """The web page (read per request: a few kB, and an edited file shows without a redeploy)."""
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))
