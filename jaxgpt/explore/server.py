"""The explorer's web server: the static page and a small JSON API over `Explorer`.

    GET  /                → static/index.html (and /static/* beside it)
    GET  /api/model       → the model's shape and the page's limits
    POST /api/analyze     {"text": ...} or {"ids": [...]}           → everything the page draws
    POST /api/lens        {"ids": [...], "position": i}             → logit lens at position i
    POST /api/head        {"ids": [...], "layer": l, "head": h}     → that head's v and outputs
    POST /api/next        {"ids": [...], "temperature", "top_k", "top_p", "seed"}
                          → {"token": id, "analysis": analyze(ids + [id])}

Bad requests get status 400 and {"error": one line for the page}; anything unexpected gets 500
with the exception's message. The server keeps serving either way.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from jaxgpt.errors import JaxgptError
from jaxgpt.explore.analysis import Explorer

STATIC = resources.files("jaxgpt.explore") / "static"
MAX_BODY_BYTES = 64_000


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, with a clear error for anything else."""
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise JaxgptError(f"the request is {len(body)} bytes; at most {MAX_BODY_BYTES}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise JaxgptError(f"the request is not UTF-8 text (byte {err.start} is invalid)") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise JaxgptError(f"the request is not valid JSON: {err.msg}") from err
    if not isinstance(data, dict):
        raise JaxgptError("the request must be a JSON object")
    return data


def create_app(explorer: Explorer) -> FastAPI:
    app = FastAPI(title="jaxgpt explore", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(JaxgptError)
    async def bad_request(request: Request, err: JaxgptError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse(
            {"error": f"internal error: {type(err).__name__}: {err}"}, status_code=500
        )

    def ids_of(data: dict[str, Any]) -> list[int]:
        if "ids" in data:
            return explorer.check_ids(data["ids"])
        return explorer.encode(data.get("text"))

    def timed(result: dict[str, Any], start: float) -> dict[str, Any]:
        result["server_ms"] = round(1e3 * (time.perf_counter() - start), 1)
        return result

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"))

    @app.get("/api/model")
    def model_info() -> dict[str, Any]:
        return explorer.info()

    # JAX runs on the event loop: one local user, one request at a time.
    @app.post("/api/analyze")
    async def analyze_route(request: Request) -> JSONResponse:
        data = await read_json(request)
        start = time.perf_counter()
        ids = ids_of(data)
        return JSONResponse(timed(explorer.analyze(ids, data.get("position")), start))

    @app.post("/api/lens")
    async def lens_route(request: Request) -> JSONResponse:
        data = await read_json(request)
        start = time.perf_counter()
        return JSONResponse(
            timed({"lens": explorer.lens_at(ids_of(data), data.get("position"))}, start)
        )

    @app.post("/api/head")
    async def head_route(request: Request) -> JSONResponse:
        data = await read_json(request)
        start = time.perf_counter()
        result = explorer.head(ids_of(data), data.get("layer"), data.get("head"))
        return JSONResponse(timed(result, start))

    @app.post("/api/next")
    async def next_route(request: Request) -> JSONResponse:
        data = await read_json(request)
        start = time.perf_counter()
        ids = ids_of(data)
        token = explorer.next_token(ids, data)
        sample_ms = round(1e3 * (time.perf_counter() - start), 1)
        analysis = explorer.analyze([*ids, token])
        return JSONResponse(timed({"token": token, "sample_ms": sample_ms, **analysis}, start))

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app
