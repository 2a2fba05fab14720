"""The Open Inference Protocol (KServe v2) for whatever worker is served.

NVIDIA's ``tritonclient.http`` and KServe clients work against these routes unchanged:

    GET  /v2/health/live, /v2/health/ready, /v2        server liveness, readiness, metadata
    GET  /v2/models/{name}[/versions/{v}]              model metadata (inputs, outputs)
    GET  /v2/models/{name}[/versions/{v}]/ready        model readiness
    POST /v2/models/{name}[/versions/{v}]/infer        inference, JSON or binary tensors

The model's name is its ``SERVED_MODEL_NAME`` (by default the last part of ``MODEL_NAME``, so
a hub id ``org/name`` is served as ``name``). The tensors are derived from the worker's
declaration (``app.serving.declaration``), the same one ``/predict`` is built from, and an
inference goes through the serving core: the same pool, batching, limits, deadline and errors.

The deadline: ``REQUEST_TIMEOUT_S``, shortened by the ``X-Request-Timeout`` header (seconds)
or by the request's ``timeout`` parameter (an integer of microseconds, as Triton reads it; 0
is no limit of the client's), whichever is shorter.

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

Errors are ``{"error": "..."}`` on every path under ``/v2``, whoever refused the request (the
body size limit, load shedding, the API key): 400 bad input (also what ``/predict`` answers
422), 404 unknown model, and the statuses of ``/predict`` otherwise (413, 415, 503 with
Retry-After, 504, 500).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from stateful_pool import __version__

from ..serving.core import ServedModel, ServingCore
from ..serving.declaration import problems
from ..serving.errors import ServingError
from .http import (
    DEADLINE_HEADER,
    DeadlineHeader,
    Guards,
    Protocol,
    error_docs,
    error_response,
    request_lifetime,
)
from .v2_tensors import (
    HEADER_LENGTH,
    RESERVED_PARAMETERS,
    Tensor,
    as_image_bytes,
    as_text,
    input_elements,
    input_tensors,
    load_json,
    output_tensors,
    pack_bytes,
    per_item_field,
    split_body,
    to_array,
)

PREFIX = "/v2"
TIMEOUT_PARAMETER = "timeout"


def render(error: ServingError) -> Response:
    """``{"error": message}``; a request that failed validation is a 400 naming the fields."""
    if error.status == 422:
        error = ServingError(400, f"invalid inference request: {problems(error)}",
                             error.headers)
    return error_response(error, {"error": error.message})


# ---- the model as the protocol sees it ------------------------------------------------------

@dataclass
class V2Model:
    """A served model's tensors: its inputs and outputs as the protocol describes them."""

    served: ServedModel
    inputs: list[Tensor] = field(init=False)
    outputs: list[Tensor] = field(init=False)

    def __post_init__(self) -> None:
        decl = self.served.declaration
        self.inputs = input_tensors(decl)
        self.outputs = output_tensors(decl)
        # A request type that is not a model travels whole, as one "request" input (a
        # model's own field or upload may be named "request" too).
        self.whole_request = not (isinstance(decl.request_type, type)
                                  and issubclass(decl.request_type, BaseModel))

    @property
    def name(self) -> str:
        return self.served.name

    def metadata(self, core: ServingCore) -> dict[str, Any]:
        return {"name": self.name, "versions": ["1"], "platform": "stateful-pool",
                "inputs": [t.metadata() for t in self.inputs],
                "outputs": [t.metadata() for t in self.outputs],
                "parameters": core.state_of(self.served).weights_summary()}

    def build_request(self, core: ServingCore, header: dict[str, Any], binary: bytes
                      ) -> tuple[Any, list[str]]:
        """The worker's request value, and labels naming its items in errors."""
        decl = self.served.declaration
        known = {t.name: t for t in self.inputs}
        values: dict[str, Any] = {}
        labels: list[str] = []
        offset = 0
        count = 0
        for tensor in header["inputs"]:
            if not isinstance(tensor, dict):
                raise ServingError(400, "each input must be a JSON object")
            name, elements, offset = input_elements(tensor, binary, offset)
            spec = known.get(name)
            if spec is None and decl.query_model is not None \
                    and name in decl.query_model.model_fields and len(elements) == 1:
                values[name] = elements[0]  # a query parameter sent as a [1] tensor
                continue
            if spec is None:
                raise ServingError(400, f"unknown input {name!r}; the inputs are "
                                        f"{', '.join(known)}")
            if spec.kind == "upload":
                count += len(elements)
                core.check_file_count(count)
                images = [core.check_upload(as_image_bytes(element, name), f"{name}[{index}]")
                          for index, element in enumerate(elements)]
                labels += [image.label for image in images]
                values[name] = images if decl.uploads[name] else (
                    images[0] if len(images) == 1 else images)
            elif spec.kind == "json":
                if not elements:
                    raise ServingError(400, f"input {name!r}: one BYTES element holding JSON "
                                            "expected")
                values[name] = [load_json(as_text(e, name), f"input {name!r}")
                                for e in elements][0]
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
        # Inputs are named after the fields, aliased or not; a parameter may still come under
        # its alias. A refusal is a 422, which ``render`` answers 400 naming the fields.
        return self.served.validate(values), labels

    def output_values(self, answer: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Each output as an array with first dimension N, and the answer's other fields."""
        adapter = self.served.answer_adapter
        dumped = adapter.dump_python(adapter.validate_python(answer), mode="json")
        found = per_item_field(self.served.declaration.answer_type)
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


def timeout_parameter(header: dict[str, Any]) -> float | None:
    """The request's ``timeout`` parameter in seconds (it counts microseconds), or None.

    Raises:
        ServingError: 400 for a value that is not a non-negative integer.
    """
    value = (header.get("parameters") or {}).get(TIMEOUT_PARAMETER)
    if value is None or value == 0 and not isinstance(value, bool):
        return None  # 0: no limit of the client's, as in Triton
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ServingError(400, f"parameter {TIMEOUT_PARAMETER!r} must be a non-negative "
                                f"integer of microseconds, got {value!r}")
    return value / 1_000_000


def encode_response(model: V2Model, request_id: str | None, arrays: dict[str, np.ndarray],
                    parameters: dict[str, Any], header: dict[str, Any]) -> Response:
    wanted = header.get("outputs")
    binary_default = bool((header.get("parameters") or {}).get("binary_data_output", False))
    if wanted is None:
        selected = [(name, binary_default) for name in arrays]
    else:
        if not isinstance(wanted, list) or not all(
                isinstance(o, dict) and isinstance(o.get("name"), str) for o in wanted):
            raise ServingError(400, "'outputs' must be a list of objects with a name")
        selected = []
        for o in wanted:
            if o["name"] not in arrays:
                raise ServingError(400, f"unknown output {o['name']!r}; the outputs are "
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


# ---- the routes ------------------------------------------------------------------------------

def served_model(core: ServingCore, name: str, version: str | None) -> ServedModel:
    """The model of a ``/v2/models/{name}[/versions/{version}]`` path.

    Raises:
        ServingError: 404 for a model or version this server does not serve.
    """
    model = core.model(name)
    if version not in (None, "", "1"):
        raise ServingError(404, f"unknown version {version!r} of {name!r}; it has version 1")
    return model


def mount(app: FastAPI, core: ServingCore, guards: Guards) -> None:
    app.include_router(build_v2_router(core, guards))


def build_v2_router(core: ServingCore, guards: Guards = ()) -> APIRouter:
    """The protocol's routes for the served models; ``guards`` (the API key) on the model
    routes, not on the server's health routes."""
    models = {served.name: V2Model(served) for served in core.models}
    router = APIRouter(prefix=PREFIX, tags=["open inference protocol"])
    guarded = [Depends(g) for g in guards]

    def model_named(name: str, version: str | None) -> V2Model:
        """Raises ServingError 404 for a model or version this server does not serve."""
        return models[served_model(core, name, version).name]

    @router.get("/health/live")
    async def live() -> Response:
        """Liveness: 200 while the server can serve now or recover by itself."""
        error = core.liveness()
        return render(error) if error else JSONResponse({"live": True})

    @router.get("/health/ready")
    async def ready() -> Response:
        """Readiness: 200 once a worker can take a task."""
        error = core.readiness()
        return render(error) if error else JSONResponse({"ready": True})

    # Triton's generate routes serve the models that take a JSON request (app.protocols.generate).
    extensions = ["binary_tensor_data", "model_repository"] + (
        ["generate"] if any(not m.declaration.uploads for m in core.models) else [])

    @router.get("")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "stateful-pool", "version": __version__, "extensions": extensions}

    async def model_metadata(name: str, version: str | None = None) -> Response:
        return JSONResponse(model_named(name, version).metadata(core))

    async def model_ready(name: str, version: str | None = None) -> Response:
        model = model_named(name, version)
        error = core.readiness(model.served)
        return render(error) if error else JSONResponse({"name": name, "ready": True})

    @router.post("/repository/index", dependencies=guarded, responses=error_docs_v2(401))
    async def repository_index(request: Request) -> Response:
        """Triton's model repository extension: every served model, its version and state
        (``READY``, or ``UNAVAILABLE`` with the reason). A body ``{"ready": true}`` lists
        only the ready ones."""
        only_ready = False
        body = await request.body()
        if body.strip():
            try:
                options = json.loads(body)
            except ValueError:
                raise ServingError(400, "the repository index takes a JSON object, such as "
                                        '{"ready": true}, or no body') from None
            if not isinstance(options, dict) or not isinstance(options.get("ready", False),
                                                                 bool):
                raise ServingError(400, '"ready" must be true or false')
            only_ready = options.get("ready", False)
        index = []
        for served in core.models:
            error = core.readiness(served)
            entry = {"name": served.name, "version": "1",
                     "state": "UNAVAILABLE" if error else "READY"}
            if error:
                entry["reason"] = error.message
            if not (only_ready and error):
                index.append(entry)
        return JSONResponse(index)

    async def infer(request: Request, name: str, version: str | None = None,
                    deadline_s: DeadlineHeader = None) -> Response:
        """Inference with JSON tensors, or with the binary tensor data extension."""
        model = model_named(name, version)
        header, binary = split_body(await request.body(), request.headers.get(HEADER_LENGTH))
        lifetime = request_lifetime(request, {
            DEADLINE_HEADER: deadline_s,
            f"the {TIMEOUT_PARAMETER!r} parameter": timeout_parameter(header)})
        value, labels = model.build_request(core, header, binary)
        answer = await core.infer(model.served, value, lifetime, labels)
        arrays, parameters = model.output_values(answer)
        request_id = header.get("id")
        return encode_response(model, request_id if isinstance(request_id, str) else None,
                               arrays, parameters, header)

    for suffix in ("", "/versions/{version}"):
        base = "/models/{name}" + suffix
        router.add_api_route(base, model_metadata, methods=["GET"], dependencies=guarded,
                             name=f"v2_model_metadata{suffix and '_version'}",
                             responses=error_docs_v2(401, 404))
        router.add_api_route(base + "/ready", model_ready, methods=["GET"],
                             name=f"v2_model_ready{suffix and '_version'}",
                             responses=error_docs_v2(404, 503))
        router.add_api_route(base + "/infer", infer, methods=["POST"], dependencies=guarded,
                             name=f"v2_infer{suffix and '_version'}",
                             responses=error_docs_v2(400, 401, 404, 413, 415, 500, 503, 504))
    return router


_ERROR_TEXTS = {
    400: "the request does not follow the protocol, an input is invalid, or a parameter "
         f"(or {DEADLINE_HEADER}) is out of range",
    413: "the request body is larger than MAX_UPLOAD_MB, or holds more than MAX_FILES images "
         "(or QUEUE_SIZE items)",
}
_ERROR_SCHEMA = {"content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}}}}


def error_docs_v2(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI description of the error answers: the protocol's ``{"error": "..."}``."""
    return error_docs(statuses, _ERROR_SCHEMA, _ERROR_TEXTS)


PROTOCOL = Protocol("kserve-v2", mount, render, prefixes=(PREFIX,))
