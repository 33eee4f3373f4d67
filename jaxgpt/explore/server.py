"""The explorer's web server: the static page and a small JSON API over `Explorer`.

    GET  /                → static/index.html (and /static/* beside it)
    GET  /api/model       → the model's shape, the page's limits, whether it can chat
    POST /api/analyze     {"text": ...} or {"ids": [...]}           → everything the page draws
    POST /api/lens        {"ids": [...], "position": i}             → logit lens at position i
    POST /api/head        {"ids": [...], "layer": l, "head": h}     → that head's v and outputs
    POST /api/next        {"ids": [...], "temperature", "top_k", "top_p", "seed"}
                          → {"token": id, "analysis": analyze(ids + [id])}
    POST /api/chat        {"message", "temperature", "top_k", "top_p", "max_new_tokens"}
                          → text/event-stream: `data: {"piece": ...}` per piece of the reply,
                            then `event: done` with the reply and the turn's cache statistics
    POST /api/chat/reset  → the session's conversation is forgotten

Every POST may name the page's `session`: its sequence and KV cache ("next token" extends it by
one token) and its conversation are kept per session. Bad requests get status 400 and {"error":
one line for the page}; anything unexpected gets 500 with the exception's message (or, once a
reply is streaming, an `event: error`). The server keeps serving either way.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Generator, Iterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import iterate_in_threadpool

from jaxgpt.errors import JaxgptError
from jaxgpt.explore.analysis import Explorer, session_id
from jaxgpt.explore.chat import Chats

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


def server_sent(events: Iterator[dict[str, Any]]) -> Iterator[str]:
    """Events as the text/event-stream format: a `data:` line each (`event: done` for the last);
    an error after the stream began becomes an `event: error` (status 200 is already sent)."""
    try:
        for event in events:
            kind = "event: done\n" if "done" in event else ""
            yield f"{kind}data: {json.dumps(event)}\n\n"
    except Exception as err:  # the stream is the only way left to tell the page
        text = str(err) if isinstance(err, JaxgptError) else f"internal error: {err!r}"
        yield f"event: error\ndata: {json.dumps({'error': text})}\n\n"


async def streamed(events: Generator[dict[str, Any], None, None], first: dict[str, Any]):
    """`first`, then `events`, as server-sent events read in a worker thread. However the
    stream ends — finished, or cancelled because the page went away mid-reply — `events` is
    closed, which frees its chat session (left to the garbage collector, a dropped stream kept
    the session "still streaming" indefinitely)."""
    try:
        async for text in iterate_in_threadpool(server_sent(itertools.chain([first], events))):
            yield text
    finally:
        events.close()


def create_app(explorer: Explorer) -> FastAPI:
    chats = Chats(explorer.model)
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
        return {**explorer.info(), "chat": chats.absent is None, "chat_absent": chats.absent}

    # JAX runs on the event loop: one local user, one request at a time (a chat reply streams
    # from a worker thread; its conversation is its own).
    @app.post("/api/analyze")
    async def analyze_route(request: Request) -> JSONResponse:
        data = await read_json(request)
        start = time.perf_counter()
        ids, session = ids_of(data), session_id(data.get("session"))
        return JSONResponse(timed(explorer.analyze(ids, data.get("position"), session), start))

    @app.post("/api/lens")
    async def lens_route(request: Request) -> JSONResponse:
        data = await read_json(request)
        start = time.perf_counter()
        ids, session = ids_of(data), session_id(data.get("session"))
        return JSONResponse(timed({"lens": explorer.lens_at(ids, data.get("position"), session)},
                                  start))  # fmt: skip

    @app.post("/api/head")
    async def head_route(request: Request) -> JSONResponse:
        data = await read_json(request)
        start = time.perf_counter()
        ids, session = ids_of(data), session_id(data.get("session"))
        result = explorer.head(ids, data.get("layer"), data.get("head"), session)
        return JSONResponse(timed(result, start))

    @app.post("/api/next")
    async def next_route(request: Request) -> JSONResponse:
        data = await read_json(request)
        start = time.perf_counter()
        ids, session = ids_of(data), session_id(data.get("session"))
        token = explorer.next_token(ids, data, session)
        sample_ms = round(1e3 * (time.perf_counter() - start), 1)
        analysis = explorer.analyze([*ids, token], session=session)
        return JSONResponse(timed({"token": token, "sample_ms": sample_ms, **analysis}, start))

    @app.post("/api/chat")
    async def chat_route(request: Request) -> StreamingResponse:
        data = await read_json(request)
        events = chats.reply(session_id(data.get("session")), data)
        first = next(events)  # the prefill and first token: a bad message is a 400, not a stream
        return StreamingResponse(
            streamed(events, first),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/api/chat/reset")
    async def chat_reset_route(request: Request) -> JSONResponse:
        data = await read_json(request)
        return JSONResponse({"reset": chats.reset(session_id(data.get("session")))})

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app
