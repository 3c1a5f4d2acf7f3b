"""The page: static/index.html, app.js and style.css (package data), read once."""
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from phoclip.serve.models import CssResponse, JavaScriptResponse, SvgResponse

router = APIRouter(tags=["page"])

# the page runs only its own script and style, shows only its own and dropped pictures
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
       "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
CACHE = "no-cache"  # revalidated: a new version of the page is seen at once


def static_files() -> dict[str, str]:
    """The page's files, from the package (a missing one fails at start, not per request)."""
    folder = resources.files("phoclip.serve") / "static"
    return {name: (folder / name).read_text(encoding="utf-8")
            for name in ("index.html", "app.js", "style.css", "favicon.svg")}


@router.get("/", response_class=HTMLResponse)
async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.static["index.html"], headers={"Content-Security-Policy": CSP,
                                                                         "Cache-Control": CACHE})


@router.get("/app.js", response_class=JavaScriptResponse)
async def script(request: Request) -> Response:
    return JavaScriptResponse(request.app.state.static["app.js"], headers={"Cache-Control": CACHE})


@router.get("/style.css", response_class=CssResponse)
async def style(request: Request) -> Response:
    return CssResponse(request.app.state.static["style.css"], headers={"Cache-Control": CACHE})


@router.get("/favicon.svg", response_class=SvgResponse)
async def icon(request: Request) -> Response:
    return SvgResponse(request.app.state.static["favicon.svg"], headers={"Cache-Control": "max-age=86400"})
