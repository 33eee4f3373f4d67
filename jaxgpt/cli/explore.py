"""`jaxgpt explore --model MODEL [--port P]`: the journey of a prompt as a local web page."""

from __future__ import annotations

import argparse
import socket
import sys

from jaxgpt.config import PRESETS
from jaxgpt.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explore",
        help="explore a prompt's journey through the model in a local web page",
        description="Start a local web server with an interactive page: tokens, embeddings, "
        "attention per layer and head, the residual stream and logit lens, and the next-token "
        "distribution with temperature / top-k / top-p and a 'next token' button (each press "
        "extends a KV cache by one token); for a chat model, a chat tab streaming replies. Needs "
        "the `web` extra (pip install 'jaxgpt[web]'). Works offline.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a Hugging Face GPT-2 directory, a jaxgpt training run directory, or a preset name "
        f"with RANDOM weights ({', '.join(PRESETS)})",
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.set_defaults(func=run)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or one clear error (port in use, bad address)."""
    if not 0 < port < 65536:
        raise InputError(f"--port must be from 1 to 65535, got {port}")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise InputError(
            f"cannot listen on {host}:{port}: {err.strerror} (is another server using port "
            f"{port}? pass --port with a free one)"
        ) from err
    sock.listen(64)
    return sock


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from jaxgpt.explore.server import create_app
    except ImportError as err:
        raise InputError(
            f"jaxgpt explore needs the web extra ({err.name} is missing): pip install 'jaxgpt[web]'"
        ) from err
    from jaxgpt.cli.common import load_model
    from jaxgpt.explore.analysis import Explorer

    sock = bind(args.host, args.port)
    try:
        explorer = Explorer(load_model(args.model, decoding=True))
        server = uvicorn.Server(
            uvicorn.Config(create_app(explorer), log_level="warning", access_log=False)
        )
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(
            f"jaxgpt explore: {explorer.model.source} at http://{host}:{args.port}/ "
            "(Ctrl-C to stop)",
            file=sys.stderr,
        )
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
