"""The servers of ``server_bench.py``: the app under test and the two baselines it is
measured against, each started in a subprocess of its own.

* ``app_server``: ``python -m app`` (as ``make serve`` starts it) with a model, a worker count
  and a worker class, random weights, on the CPU.
* ``plain_app``: the echo baseline, a plain FastAPI endpoint that runs the same upload checks
  and the same echo in-process, without a pool.
* ``seed_app``: the seed's server shape, a bare endpoint awaiting ``SPool.async_execute`` on
  ``NullWorker``; no checks, limits or metrics. On our library, or on stateful-pool 0.3.2 with
  ``--stateful-pool-path`` naming where 0.3.2 is installed (``seed_server``).

Each server listens on a free 127.0.0.1 port (``loadtest.servers.ServerProcess``) and logs to a
file in ``args.logs``. The two baselines run as::

    python -m benchmarks.bench_servers --serve-plain   # or --serve-seed; PORT from the env
    python -m benchmarks.bench_servers --serve-seed --stateful-pool-path .bench/seed

This module imports no ``stateful_pool`` at its top: the seed server on 0.3.2 puts 0.3.2's
directory first on its import path before anything imports the library.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, UploadFile

from loadtest.servers import ServerProcess, ServerSpec

READY_TIMEOUT = 120.0


def bench_server(args: argparse.Namespace, name: str, module: str, env: dict[str, str],
                 cli_args: tuple[str, ...] = (), ready_path: str = "/readyz") -> ServerProcess:
    """A server subprocess on a free 127.0.0.1 port, its log in ``args.logs``; ``with`` it to
    start it and always stop it (with any worker it left)."""
    spec = ServerSpec(name, name, module, args=cli_args, ready_path=ready_path)
    return ServerProcess(spec, env, args.logs / f"{name}.log")


def app_server(args: argparse.Namespace, name: str, workers: int,
               worker_class: str = "app.worker:ViTWorker",
               extra: dict[str, str] | None = None) -> ServerProcess:
    return bench_server(args, name, "app", {
        "MODEL_NAME": args.model, "MODEL_WEIGHTS": "random", "DEVICE": "cpu",
        "NUM_WORKERS": str(workers), "WORKER_CLASS": worker_class,
        # No per-request access log line, on both sides of each comparison.
        "LOG_LEVEL": "warning", **(extra or {})})


def baseline_server(args: argparse.Namespace, name: str, flag: str,
                    *more: str) -> ServerProcess:
    """One of this module's baseline apps (``--serve-plain``, ``--serve-seed``)."""
    return bench_server(args, name, "benchmarks.bench_servers", {}, (flag, *more),
                        "/openapi.json")


def seed_server(args: argparse.Namespace, name: str, library: Path) -> ServerProcess:
    """``seed_app`` on the ``stateful_pool`` installed in ``library`` (0.3.2's directory)."""
    return baseline_server(args, name, "--serve-seed", "--stateful-pool-path", str(library))


def plain_app() -> Any:
    """The echo baseline: same upload handling and checks, the echo run in-process."""
    from app.contract import ImageInput
    from app.examples.echo_worker import EchoWorker
    from app.images import inspect_image

    app = FastAPI()
    worker = EchoWorker()

    @app.post("/predict")
    async def predict(files: Annotated[list[UploadFile], File()]) -> dict[str, Any]:
        predictions = []
        for upload in files:
            data = await upload.read()
            header = inspect_image(data, max_pixels=40_000_000, name=upload.filename or "")
            item = ImageInput(data, header.format, header.width, header.height, 5)
            predictions.append({"filename": upload.filename, **worker.execute(item)})
        return {"predictions": predictions}

    return app


def serve(app: Any) -> None:
    """Serve ``app`` on 127.0.0.1:$PORT (ServerProcess sets it), without an access log."""
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["PORT"]), log_level="warning",
                access_log=False)


def seed_app() -> Any:
    """The seed's server shape on whichever ``stateful_pool`` the import path holds first: one
    endpoint, the upload's bytes straight to ``pool.async_execute``, the worker's dict back;
    no checks, limits or metrics."""
    from contextlib import asynccontextmanager

    from benchmarks.null_worker import NullWorker
    from stateful_pool import SPool

    pool: SPool[Any, Any] = SPool(NullWorker)
    # 0.3.2's shutdown() takes no argument.
    bounded = "timeout" in inspect.signature(pool.shutdown).parameters

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        await pool.async_spawn()
        yield
        if bounded:
            pool.shutdown(cancel_futures=True, timeout=10)
        else:
            pool.shutdown()

    app = FastAPI(lifespan=lifespan)

    @app.post("/predict")
    async def predict(files: Annotated[UploadFile, File()]) -> Any:
        return await pool.async_execute(await files.read())

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve one of server_bench's baseline apps "
                                     "on 127.0.0.1:$PORT.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--serve-plain", action="store_true", help="the plain FastAPI echo")
    which.add_argument("--serve-seed", action="store_true",
                       help="the seed's server shape on SPool")
    parser.add_argument("--stateful-pool-path", type=Path,
                        help="import stateful_pool from this directory (0.3.2's) rather than "
                             "from this checkout")
    args = parser.parse_args()
    if args.stateful_pool_path is not None:
        library = args.stateful_pool_path.resolve()
        sys.path.insert(0, str(library))  # before anything imports stateful_pool
        import stateful_pool

        if not Path(stateful_pool.__file__ or "").resolve().is_relative_to(library):
            raise SystemExit(f"stateful_pool came from {stateful_pool.__file__}, not {library}")
    serve(plain_app() if args.serve_plain else seed_app())


if __name__ == "__main__":
    main()
