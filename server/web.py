"""The chat page at / and its static files (server/static/, shipped as package data). No auth here: the page
itself holds no secret, and the API calls it makes carry the key the user types in."""
import mimetypes
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

from server.errors import APIError

router = APIRouter(include_in_schema=False)

_STATIC = files("server") / "static"
# the page loads its script and style from this server only and calls no other (the API key goes nowhere else)
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _static(name: str) -> Response:
    # only the files that ship in static/ by their plain names: no path from the URL reaches the file system
    found = {f.name: f for f in _STATIC.iterdir() if f.is_file()}
    if name not in found:
        raise APIError(404, f"no such file: {name}", code="not_found")
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return Response(found[name].read_bytes(), media_type=media_type,
                    headers={"Cache-Control": "no-cache", "Content-Security-Policy": _CSP,
                             "X-Content-Type-Options": "nosniff"})


@router.get("/")
async def index() -> Response:
    return _static("index.html")


@router.get("/static/{name}")
async def static(name: str) -> Response:
    return _static(name)
