"""The Open Inference Protocol (KServe v2) for whatever worker is served.

NVIDIA's ``tritonclient.http`` and KServe clients work against these routes unchanged:

    GET  /v2/health/live, /v2/health/ready, /v2        server liveness, readiness, metadata
    GET  /v2/models/{name}[/versions/{v}]              model metadata (inputs, outputs)
    GET  /v2/models/{name}[/versions/{v}]/ready        model readiness
    POST /v2/models/{name}[/versions/{v}]/infer        inference, JSON or binary tensors

The tensors are derived from the worker's declaration (``app.endpoint.Declaration``), the
same one ``/predict`` is built from, and an inference goes through ``run_request``: the same
pool, batching, limits and errors.

Inputs, from the request type:
    an upload field (``ImageFile`` / ``list[ImageFile]``)  BYTES ``[N]`` of encoded images
        (binary tensors as they are; JSON tensors as base64 strings)
    the other fields of an upload request                  request ``parameters`` (``top_k``)
    a field of a JSON request: ``list[str|int|float|bool]`` a tensor ``[N]``; a plain value:
        a tensor ``[1]``; anything else: BYTES ``[1]`` holding its JSON
Outputs, from the answer type: its first ``list[Model]`` field has one entry per item (``N``);
each field of that entry becomes an output with first dimension ``N``: a plain value
``[N]``, a list of numbers ``[N, D]``, a list of flat objects one ``[N, K]`` output per
attribute (``top_k.label``), anything else BYTES ``[N]`` holding each item's JSON. The
answer's other fields travel in the response ``parameters``.

Errors are ``{"error": "..."}``: 400 bad input, 404 unknown model, and the statuses of
``/predict`` otherwise (413, 415, 503 with Retry-After, 504, 500).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError

from stateful_pool import __version__

from .contract import ImageFile
from .endpoint import Declaration, run_request
from .images import ImageRejected, inspect_image
from .state import server_state
from .tensors import (
    HEADER_LENGTH,
    RESERVED_PARAMETERS,
    Tensor,
    V2Error,
    as_image_bytes,
    as_text,
    input_elements,
    input_tensors,
    output_tensors,
    pack_bytes,
    per_item_field,
    split_body,
    to_array,
)


def v2_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# ---- the router -----------------------------------------------------------------------------

@dataclass
class V2Model:
    """What the protocol routes need of the served model; one per app."""

    decl: Declaration
    name: str
    inputs: list[Tensor] = field(init=False)
    outputs: list[Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.inputs = input_tensors(self.decl)
        self.outputs = output_tensors(self.decl)
        request_type = self.decl.request_type
        self.request_adapter: TypeAdapter[Any] = TypeAdapter(request_type)
        # A request type that is not a model travels whole, as one "request" input (a
        # model's own field or upload may be named "request" too).
        self.whole_request = not (isinstance(request_type, type)
                                  and issubclass(request_type, BaseModel))
        self.answer_adapter: TypeAdapter[Any] = TypeAdapter(self.decl.answer_type)

    def check_name(self, name: str, version: str | None = None) -> None:
        if name != self.name:
            raise V2Error(404, f"unknown model {name!r}; this server serves {self.name!r}")
        if version not in (None, "", "1"):
            raise V2Error(404, f"unknown version {version!r} of {name!r}; it has version 1")

    def metadata(self, request: Request) -> dict[str, Any]:
        state = server_state(request)
        return {"name": self.name, "versions": ["1"], "platform": "stateful-pool",
                "inputs": [t.metadata() for t in self.inputs],
                "outputs": [t.metadata() for t in self.outputs],
                "parameters": state.weights_summary()}

    def build_request(self, request: Request, header: dict[str, Any], binary: bytes
                      ) -> tuple[Any, list[str]]:
        """The worker's request value, and labels naming its items in errors."""
        settings = server_state(request).settings
        known = {t.name: t for t in self.inputs}
        values: dict[str, Any] = {}
        labels: list[str] = []
        offset = 0
        count = 0
        for tensor in header["inputs"]:
            if not isinstance(tensor, dict):
                raise V2Error(400, "each input must be a JSON object")
            name, elements, offset = input_elements(tensor, binary, offset)
            spec = known.get(name)
            if spec is None and self.decl.query_model is not None \
                    and name in self.decl.query_model.model_fields and len(elements) == 1:
                values[name] = elements[0]  # a query parameter sent as a [1] tensor
                continue
            if spec is None:
                raise V2Error(400, f"unknown input {name!r}; the inputs are "
                                   f"{', '.join(known)}")
            if spec.kind == "upload":
                count += len(elements)
                if count > settings.max_files:
                    raise ImageRejected(413, f"{count} images in one request; the limit is "
                                             f"{settings.max_files} (MAX_FILES)")
                images = []
                for index, element in enumerate(elements):
                    label = f"{name}[{index}]"
                    data = as_image_bytes(element, name)
                    head = inspect_image(data, max_pixels=settings.max_image_pixels,
                                         name=label)
                    images.append(ImageFile(data, head.format, head.width, head.height,
                                            None, label))
                labels += [image.label for image in images]
                values[name] = images if self.decl.uploads[name] else (
                    images[0] if len(images) == 1 else images)
            elif spec.kind == "json":
                try:
                    values[name] = [json.loads(as_text(e, name)) for e in elements][0]
                except (ValueError, IndexError):
                    raise V2Error(400, f"input {name!r}: one BYTES element holding JSON "
                                       "expected") from None
            else:
                if spec.datatype == "BYTES":
                    elements = [as_text(e, name) for e in elements]
                values[name] = elements if spec.kind == "list" else (
                    elements[0] if len(elements) == 1 else elements)
        for key, value in (header.get("parameters") or {}).items():
            if key not in RESERVED_PARAMETERS:
                values.setdefault(key, value)
        if self.whole_request:
            values = values.get("request", {})
        try:
            # by_name: inputs are named after the fields, aliased or not; a parameter may
            # still come under its alias.
            return self.request_adapter.validate_python(values, by_name=True), labels
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}"
                for e in exc.errors(include_url=False))
            raise V2Error(400, f"invalid inference request: {problems}") from None

    def output_values(self, answer: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Each output as an array with first dimension N, and the answer's other fields."""
        dumped = self.answer_adapter.dump_python(
            self.answer_adapter.validate_python(answer), mode="json")
        found = per_item_field(self.decl.answer_type)
        if found is None:
            return {"answer": np.array([json.dumps(dumped).encode()], dtype=object)}, {}
        entries = dumped[found[0]]
        rest = {k: v for k, v in dumped.items() if k != found[0]}
        arrays = {}
        for spec in self.outputs:
            if spec.kind == "flat":
                field_name, attribute = spec.path
                values: list[Any] = [[sub[attribute] for sub in e[field_name]] for e in entries]
            elif spec.kind == "json":
                values = [json.dumps(e[spec.path[0]]) for e in entries]
            else:
                values = [e[spec.path[0]] for e in entries]
            arrays[spec.name] = to_array(spec, values)
        return arrays, rest


def encode_response(model: V2Model, request_id: str | None, arrays: dict[str, np.ndarray],
                    parameters: dict[str, Any], header: dict[str, Any]) -> Response:
    wanted = header.get("outputs")
    binary_default = bool((header.get("parameters") or {}).get("binary_data_output", False))
    if wanted is None:
        selected = [(name, binary_default) for name in arrays]
    else:
        if not isinstance(wanted, list) or not all(
                isinstance(o, dict) and isinstance(o.get("name"), str) for o in wanted):
            raise V2Error(400, "'outputs' must be a list of objects with a name")
        selected = []
        for o in wanted:
            if o["name"] not in arrays:
                raise V2Error(400, f"unknown output {o['name']!r}; the outputs are "
                                   f"{', '.join(arrays)}")
            selected.append((o["name"], bool((o.get("parameters") or {}).get(
                "binary_data", binary_default))))
    specs = {t.name: t for t in model.outputs}
    outputs, chunks = [], []
    for name, binary in selected:
        array = arrays[name]
        datatype = specs[name].datatype if name in specs else "BYTES"
        entry: dict[str, Any] = {"name": name, "datatype": datatype,
                                 "shape": list(array.shape)}
        if binary:
            raw = (pack_bytes(array.reshape(-1).tolist()) if datatype == "BYTES"
                   else array.tobytes())
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif datatype == "BYTES":
            entry["data"] = [b.decode() for b in array.reshape(-1).tolist()]
        else:
            entry["data"] = array.reshape(-1).tolist()
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": model.name, "model_version": "1", "outputs": outputs}
    if request_id is not None:
        body["id"] = request_id
    if parameters:
        body["parameters"] = parameters
    head = json.dumps(body).encode()
    if not chunks:
        return Response(head, media_type="application/json")
    return Response(head + b"".join(chunks), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


async def as_v2_error(request: Request, exc: Exception) -> Response:
    """Any error of an inference, answered as ``/predict`` would but in the v2 shape."""
    if isinstance(exc, V2Error):
        return v2_error(exc.status, exc.message)
    handler = None
    for cls in type(exc).__mro__:
        handler = request.app.exception_handlers.get(cls)
        if handler is not None:
            break
    if handler is None:
        raise exc
    response = await handler(request, exc)
    detail = json.loads(response.body).get("detail")
    headers = {k: v for k, v in response.headers.items()
               if k.lower() not in ("content-length", "content-type")}
    return v2_error(response.status_code, str(detail), headers)


class V2Route(APIRoute):
    """A route whose HTTP errors raised before the endpoint runs (the API-key guard's 401)
    are answered in the protocol's ``{"error": "..."}`` shape too."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_in_v2_shape(request: Request) -> Response:
            try:
                return await handle(request)
            except HTTPException as exc:
                return v2_error(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))

        return handle_in_v2_shape


def build_v2_router(decl: Declaration, model_name: str,
                    guards: Sequence[Callable[..., Any]] = ()) -> APIRouter:
    """The protocol's routes for the served model; ``guards`` (the API key) on the model
    routes, not on the server's health routes."""
    model = V2Model(decl, model_name)
    router = APIRouter(prefix="/v2", tags=["open inference protocol"], route_class=V2Route)
    guarded = [Depends(g) for g in guards]

    @router.get("/health/live")
    async def live(request: Request) -> Response:
        """Liveness: 200 while the server can serve now or recover by itself."""
        reason = server_state(request).unrecoverable_reason()
        return v2_error(503, reason) if reason else JSONResponse({"live": True})

    @router.get("/health/ready")
    async def ready(request: Request) -> Response:
        """Readiness: 200 once a worker can take a task."""
        state = server_state(request)
        if not state.worker_counts()[0]:
            return v2_error(503, state.not_ready_reason())
        return JSONResponse({"ready": True})

    @router.get("")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "stateful-pool", "version": __version__,
                "extensions": ["binary_tensor_data"]}

    def unknown(name: str, version: str | None) -> Response | None:
        """The 404 for a model name or version this server does not serve."""
        try:
            model.check_name(name, version)
        except V2Error as exc:
            return v2_error(exc.status, exc.message)
        return None

    async def model_metadata(request: Request, name: str, version: str | None = None
                             ) -> Response:
        return unknown(name, version) or JSONResponse(model.metadata(request))

    async def model_ready(request: Request, name: str, version: str | None = None
                          ) -> Response:
        if (not_served := unknown(name, version)) is not None:
            return not_served
        state = server_state(request)
        if not state.worker_counts()[0]:
            return v2_error(503, state.not_ready_reason())
        return JSONResponse({"name": name, "ready": True})

    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        """Inference with JSON tensors, or with the binary tensor data extension."""
        try:
            model.check_name(name, version)
            header, binary = split_body(await request.body(), request.headers.get(HEADER_LENGTH))
            value, labels = model.build_request(request, header, binary)
            answer = await run_request(request, decl, value, labels)
            arrays, parameters = model.output_values(answer)
            request_id = header.get("id")
            return encode_response(model, request_id if isinstance(request_id, str) else None,
                                   arrays, parameters, header)
        except Exception as exc:  # every error in the protocol's shape
            return await as_v2_error(request, exc)

    for suffix in ("", "/versions/{version}"):
        base = "/models/{name}" + suffix
        router.add_api_route(base, model_metadata, methods=["GET"], dependencies=guarded,
                             name=f"v2_model_metadata{suffix and '_version'}",
                             responses=_errors(401, 404))
        router.add_api_route(base + "/ready", model_ready, methods=["GET"],
                             name=f"v2_model_ready{suffix and '_version'}",
                             responses=_errors(404, 503))
        router.add_api_route(base + "/infer", infer, methods=["POST"], dependencies=guarded,
                             name=f"v2_infer{suffix and '_version'}",
                             responses=_errors(400, 401, 404, 413, 500, 503, 504))
    return router


_ERROR_MEANINGS = {
    400: "the request does not follow the protocol or an input is invalid",
    401: "API_KEY is set and the bearer token is missing or wrong",
    404: "no such model (this server serves one model, under its MODEL_NAME)",
    413: "the request body is larger than MAX_UPLOAD_MB",
    500: "the model worker crashed while handling this request (it is restarted)",
    503: "the queue is full or no worker is ready (Retry-After says when to retry)",
    504: "the model did not answer within the request's deadline",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI description of the error answers: the protocol's ``{"error": "..."}``."""
    body = {"type": "object", "properties": {"error": {"type": "string"}},
            "required": ["error"]}
    return {status: {"description": _ERROR_MEANINGS[status], "content": {
                "application/json": {"schema": body}}}
            for status in statuses}
