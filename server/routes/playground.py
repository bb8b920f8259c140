"""GET /playground: the browser playground, three static files shipped in the famserve.clients package (found on
disk, not imported). The page itself needs no API key (it is static; app.py lists PATHS as open); it asks the user
for a key and sends it as a bearer token on every API call."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import APIRouter, Response

from famserve.server.errors import NotFoundError

router = APIRouter(include_in_schema=False)

# URL path -> (file in clients/playground/, media type)
ASSETS = {
    "/playground": ("index.html", "text/html; charset=utf-8"),
    "/playground/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
    "/playground/playground.css": ("playground.css", "text/css; charset=utf-8"),
}
PATHS = frozenset(ASSETS)  # served without an API key
# Everything the page loads or calls is on this server; nothing external, no inline script.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def playground_folder() -> Path:
    """clients/playground of the installed famserve.clients package (located without importing it)."""
    spec = importlib.util.find_spec("famserve.clients")
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError("the playground is not installed (famserve.clients is missing)", code="unknown_url")
    return Path(next(iter(spec.submodule_search_locations))) / "playground"


def _handler(name: str, media_type: str):
    def serve() -> Response:  # sync: FastAPI runs it on a worker thread, off the event loop
        try:
            content = (playground_folder() / name).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"the playground file {name} is not installed", code="unknown_url") from None
        return Response(content, media_type=media_type, headers=HEADERS)

    return serve


for _path, (_name, _media_type) in ASSETS.items():
    router.add_api_route(_path, _handler(_name, _media_type), methods=["GET"], response_class=Response)
