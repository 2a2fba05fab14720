"""A locust user that posts images to ``POST /predict`` and checks every answer.

Runs against any server with the ``/predict`` contract (multipart field ``files``, answer
``{"predictions": [one object per file]}``)::

    locust -f loadtest/locustfile.py --headless -u 100 -r 100 -t 60s \\
        --host http://127.0.0.1:8000 --images-per-request 8

Options (each also read from the environment variable in brackets):

* ``--images-per-request N`` (``LOADTEST_IMAGES_PER_REQUEST``, default 1)
* ``--image-dir DIR`` (``LOADTEST_IMAGE_DIR``): post these files instead of generated JPEGs
* ``--image-size WxH`` (``LOADTEST_IMAGE_SIZE``, default 320x240): size of generated images
* ``--image-kind photo|uni-colour`` (``LOADTEST_IMAGE_KIND``, default photo): noisy gradient
  JPEGs, or one-colour PNGs as in the seed's benchmark
* ``--max-requests N`` (``LOADTEST_MAX_REQUESTS``, default 0 = no limit): stop the whole run
  after N requests, a bound on top of ``-t``
* ``--run-info PATH`` (``LOADTEST_RUN_INFO``): on exit, write JSON ``{"stopped_at": unix
  time the load stopped, "errors": {error: occurrences}}`` (locust's JSON has neither, and
  its ``_failures.csv`` can be written before the last stats arrive)

A request counts as a failure unless the status is 200 and the body holds exactly one
prediction object per image sent. Users wait for nothing between requests (closed loop):
``-u`` is the number of requests in flight.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
import time
from pathlib import Path

import gevent
from locust import FastHttpUser, constant, events, task

# `locust -f loadtest/locustfile.py` puts loadtest/ on sys.path, not the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.answers import answer_problem  # noqa: E402
from loadtest.images import load_images, parse_size, request_bodies  # noqa: E402

_bodies: list[tuple[bytes, str]] = []
_sent = itertools.count(1)
_stopped_at: list[float] = []


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:  # type: ignore[no-untyped-def]
    parser.add_argument("--images-per-request", type=int, default=1,
                        env_var="LOADTEST_IMAGES_PER_REQUEST", help="images in each request")
    parser.add_argument("--image-dir", default="", env_var="LOADTEST_IMAGE_DIR",
                        help="post the images of this folder instead of generated ones")
    parser.add_argument("--image-size", default="320x240", env_var="LOADTEST_IMAGE_SIZE",
                        help="WxH of the generated images")
    parser.add_argument("--image-kind", default="photo", env_var="LOADTEST_IMAGE_KIND",
                        help="generated images: photo (noisy gradient JPEGs) or uni-colour "
                        "(one-colour PNGs, as in the seed's benchmark)")
    parser.add_argument("--max-requests", type=int, default=0, env_var="LOADTEST_MAX_REQUESTS",
                        help="stop the run after this many requests (0: no limit)")
    parser.add_argument("--run-info", default="", env_var="LOADTEST_RUN_INFO",
                        help="write the stop time and the failures seen, as JSON, on exit")


@events.init.add_listener
def build_bodies(environment, **_kwargs) -> None:  # type: ignore[no-untyped-def]
    """Encode the request bodies once, before the run's clock starts.

    Not at test_start: -t counts from there, and generating the images under load once took
    the whole of a 2-second run, so --reset-stats fired just before the stop.
    """
    options = environment.parsed_options
    uploads = load_images(options.image_kind, parse_size(options.image_size), options.image_dir)
    _bodies[:] = request_bodies(uploads, options.images_per_request)


@events.test_stop.add_listener
def note_stop_time(environment, **_kwargs) -> None:  # type: ignore[no-untyped-def]
    _stopped_at.append(time.time())


@events.quitting.add_listener
def write_run_info(environment, **_kwargs) -> None:  # type: ignore[no-untyped-def]
    path = environment.parsed_options.run_info
    if path:
        errors = {e.to_name(): e.occurrences for e in environment.stats.errors.values()}
        stopped_at = _stopped_at[0] if _stopped_at else time.time()
        Path(path).write_text(json.dumps({"stopped_at": stopped_at, "errors": errors}, indent=2))


class ImageClient(FastHttpUser):
    """One client: posts a request, waits for the answer, posts the next."""

    wait_time = constant(0)
    # The default 60 s would cut off queued requests of a saturated ViT-L/16 server with
    # 32 images per request; a request still waiting after 5 minutes is a failure.
    network_timeout = 300.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        self.expected = self.environment.parsed_options.images_per_request
        self.max_requests = self.environment.parsed_options.max_requests
        # Each user walks the bodies in its own order, so the images in flight differ.
        self.next_body = itertools.cycle(random.sample(_bodies, len(_bodies)))

    @task
    def predict(self) -> None:
        body, content_type = next(self.next_body)
        with self.client.post("/predict", data=body, headers={"Content-Type": content_type},
                              catch_response=True) as response:
            problem = answer_problem(response.status_code, response.text, self.expected)
            if problem:
                response.failure(problem)
            else:
                response.success()
        if self.max_requests and next(_sent) == self.max_requests:
            # quit() kills every user greenlet, this one included: run it from another.
            gevent.spawn(self.environment.runner.quit)
