"""``python -m app`` / ``spool-serve``: one uvicorn process serving the app on HOST:PORT
(with ``API_PROCESSES=N``, N of them sharing the port and one process owning the workers:
``app.serving.frontends``).

``spool-serve --help`` lists every setting; an option sets the environment variable of the
same name (``--model-name X`` is ``MODEL_NAME=X``). ``spool-serve --download-weights`` loads
the configured model once with ``MODEL_WEIGHTS=pretrained`` on CPU, which fills the local
cache, and exits (the Dockerfile's ``BAKE_WEIGHTS``).

SIGTERM or Ctrl-C: uvicorn stops accepting, lets the accepted requests finish (at most
SHUTDOWN_TIMEOUT_S), then the lifespan stops the workers; the exit code is 0. It is 1 when
no worker could start, 2 when the settings are invalid, 3 when HOST:PORT cannot be bound.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import NoReturn

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from .main import create_app
from .ops.connections import bounded_http_protocol, make_room_for
from .ops.logs import configure_logging
from .serving.frontends import api_processes, supervise
from .settings import Settings


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"invalid server settings:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    fatal = False

    def stop_on_fatal() -> None:
        nonlocal fatal
        fatal = True
        server.should_exit = True

    try:
        processes = api_processes(settings)
    except ValueError as exc:
        print(f"invalid server settings: {exc}", file=sys.stderr)
        return 2
    if processes > 1:
        # Several API processes on one port, one process owning the workers.
        return supervise(settings, processes)
    try:
        app = create_app(settings, on_fatal=stop_on_fatal)
    except ValueError as exc:
        print(f"invalid server settings: {exc}", file=sys.stderr)
        return 2
    server = uvicorn_server(app, settings)
    server.run()
    return 1 if fatal or not server.started else 0


def uvicorn_server(app: FastAPI, settings: Settings) -> uvicorn.Server:
    """The uvicorn server of one API process: connection bound, drain timeout, no access log
    of uvicorn's own (the app writes its own); SIGINT and SIGTERM drain it."""
    # The drain timeout as given: uvicorn hands it to asyncio.wait_for, which takes any float
    # (its annotation says int; int() made SHUTDOWN_TIMEOUT_S=0.9 no drain at all).
    make_room_for(settings.max_connections)
    server = uvicorn.Server(uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,  # type: ignore[arg-type]
        http=bounded_http_protocol(settings.max_connections, settings.body_timeout_s,
                                   app.state.metrics.connections_refused.inc,
                                   app.state.metrics.connections_silent.inc),
        lifespan="on"))
    # uvicorn re-raises the signal it caught once its shutdown is complete, which would turn
    # a clean drain into exit status -15; by then there is nothing left to interrupt.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    return server


def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: one option per setting (it sets the environment variable)."""
    parser = argparse.ArgumentParser(
        prog="spool-serve", description="Serve a model behind a stateful_pool.SPool "
        "(FastAPI, one uvicorn process, one worker per GPU). Every option may be given as "
        "the environment variable in brackets instead.")
    for name, info in Settings.model_fields.items():
        default = info.default
        shown = "" if default is None or name == "api_key" else (
            f" (default: {getattr(default, 'value', default)})")
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar="VALUE",
                            help=f"[{name.upper()}] {info.description or ''}{shown}")
    parser.add_argument("--download-weights", action="store_true",
                        help="load the model's pretrained weights once (fills the cache), "
                             "then exit")
    return parser.parse_args(argv)


def download_weights() -> int:
    """Spawn the configured worker in this process on CPU with pretrained weights."""
    from .serving.plan import load_worker_class, make_plan

    os.environ.update(MODEL_WEIGHTS="pretrained", DEVICE="cpu", NUM_WORKERS="1")
    settings = Settings()
    worker_cls = load_worker_class(settings.worker_class)
    [config] = make_plan(settings, worker_cls).configs
    info = worker_cls().spawn(config)
    print(f"pretrained weights of {config.model_name} are in the cache: {info}")
    return 0


def run() -> NoReturn:
    """The ``spool-serve`` console script."""
    options = vars(parse_options())
    download = options.pop("download_weights")
    for name, value in options.items():
        if value is not None:
            os.environ[name.upper()] = str(value)
    exit_now(download_weights() if download else main())


def exit_now(code: int) -> NoReturn:
    """Leave without the interpreter's teardown, which takes over a second with torch loaded:
    by now the workers are stopped; flush the logs and go."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
