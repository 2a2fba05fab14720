"""The tensors of the Open Inference Protocol (KServe v2): the specs derived from a worker's
declaration, and the wire format of their values (JSON data or binary chunks). No routes here:
those are in ``app.protocols.v2``, which documents the mapping."""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel

from ..serving.declaration import Declaration
from ..serving.errors import ServingError

HEADER_LENGTH = "inference-header-content-length"
# numpy dtypes of the protocol's numeric datatypes (BYTES is handled apart).
DTYPES = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
          "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
          "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
# Request parameters of the protocol itself, never a field of the worker's request.
RESERVED_PARAMETERS = frozenset({"binary_data_output", "priority", "timeout", "sequence_id",
                                 "sequence_start", "sequence_end", "headers"})


# ---- tensor specs from the declaration -----------------------------------------------------

@dataclass(frozen=True)
class Tensor:
    """One input or output of the model's metadata.

    Attributes:
        kind: how values map: ``upload``, ``list`` (a list field), ``scalar``, ``json``
            (BYTES holding JSON), ``flat`` (``field.attribute`` of a list of objects).
        path: the entry's field, and the attribute for ``flat``.
    """

    name: str
    datatype: str
    shape: list[int]
    kind: str
    path: tuple[str, ...] = ()

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


def _unwrap(annotation: Any) -> Any:
    """``Annotated[X, ...]`` -> X, ``X | None`` -> X."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    args = typing.get_args(annotation)
    if type(None) in args and len(args) == 2:
        return _unwrap(next(a for a in args if a is not type(None)))
    return annotation


def scalar_datatype(annotation: Any) -> str | None:
    annotation = _unwrap(annotation)
    return {str: "BYTES", bool: "BOOL", int: "INT64", float: "FP32"}.get(annotation)


def _list_item(annotation: Any) -> Any:
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) is list and typing.get_args(annotation):
        return _unwrap(typing.get_args(annotation)[0])
    return None


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def input_tensors(decl: Declaration) -> list[Tensor]:
    if decl.uploads:
        return [Tensor(name, "BYTES", [-1] if many else [1], "upload")
                for name, many in decl.uploads.items()]
    if not _is_model(decl.request_type):
        return [Tensor("request", "BYTES", [1], "json")]
    tensors = []
    for name, info in decl.request_type.model_fields.items():
        item = _list_item(info.annotation)
        if item is not None and scalar_datatype(item):
            tensors.append(Tensor(name, scalar_datatype(item) or "", [-1], "list"))
        elif scalar_datatype(info.annotation):
            tensors.append(Tensor(name, scalar_datatype(info.annotation) or "", [1], "scalar"))
        else:
            tensors.append(Tensor(name, "BYTES", [1], "json"))
    return tensors


def per_item_field(answer_type: Any) -> tuple[str, type[BaseModel]] | None:
    """The answer's first ``list[Model]`` field: one entry per item."""
    if not _is_model(answer_type):
        return None
    for name, info in answer_type.model_fields.items():
        item = _list_item(info.annotation)
        if _is_model(item):
            return name, item
    return None


def output_tensors(decl: Declaration) -> list[Tensor]:
    found = per_item_field(decl.answer_type)
    if found is None:
        return [Tensor("answer", "BYTES", [1], "json")]
    tensors = []
    for name, info in found[1].model_fields.items():
        item = _list_item(info.annotation)
        if scalar_datatype(info.annotation):
            tensors.append(Tensor(name, scalar_datatype(info.annotation) or "", [-1],
                                  "scalar", (name,)))
        elif item is not None and scalar_datatype(item) and item is not str:
            tensors.append(Tensor(name, scalar_datatype(item) or "", [-1, -1], "list",
                                  (name,)))
        elif _is_model(item) and all(scalar_datatype(sub.annotation)
                                     for sub in item.model_fields.values()):
            tensors += [Tensor(f"{name}.{sub}", scalar_datatype(info2.annotation) or "",
                               [-1, -1], "flat", (name, sub))
                        for sub, info2 in item.model_fields.items()]
        else:
            tensors.append(Tensor(name, "BYTES", [-1], "json", (name,)))
    return tensors


# ---- decoding a request ---------------------------------------------------------------------

def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON inference header and the binary tensor data behind it."""
    if header_length is None:
        header, rest = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ServingError(400, f"Inference-Header-Content-Length {header_length!r} does not "
                               f"fit a body of {len(body)} bytes")
        header, rest = body[:int(header_length)], body[int(header_length):]
    parsed = load_json(header, "the inference request")
    if not isinstance(parsed, dict) or not isinstance(parsed.get("inputs"), list):
        raise ServingError(400, "the inference request must be a JSON object with an 'inputs' list")
    return parsed, rest


def load_json(text: str | bytes, what: str) -> Any:
    """Parse JSON from a client.

    Raises:
        ServingError: 400 for text that is not JSON, or nested too deeply to parse (the
            parser recurses once per level: thousands of ``[`` would exhaust the stack).
    """
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServingError(400, f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ServingError(400, f"{what} is nested too deeply to parse") from None


def unpack_bytes(raw: bytes, name: str) -> list[bytes]:
    """BYTES binary data: each element is a 4-byte little-endian length, then the bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ServingError(400, f"input {name!r}: truncated BYTES element length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ServingError(400, f"input {name!r}: a BYTES element runs past the data")
        elements.append(raw[offset:offset + length])
        offset += length
    return elements


def pack_bytes(elements: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def flatten(data: Any) -> list[Any]:
    """The elements of nested lists, in order; a loop, not a recursion, so no nesting a
    client sends can exhaust the stack."""
    flat: list[Any] = []
    stack = [iter([data])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def input_elements(tensor: dict[str, Any], binary: bytes, offset: int
                   ) -> tuple[str, list[Any], int]:
    """``(name, flat elements, new offset into binary)`` of one request input."""
    name = tensor.get("name")
    datatype = tensor.get("datatype")
    shape = tensor.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str) or not (
            isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ServingError(400, "each input needs a name, a datatype and a shape of "
                           "non-negative integers")
    if datatype != "BYTES" and datatype not in DTYPES:
        raise ServingError(400, f"input {name!r}: unknown datatype {datatype!r}")
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise ServingError(400, f"input {name!r}: binary_data_size {size!r} runs past the "
                               "body")
        raw = binary[offset:offset + size]
        offset += size
        if datatype == "BYTES":
            elements: list[Any] = unpack_bytes(raw, name)
        else:
            width = np.dtype(DTYPES[datatype]).itemsize
            if len(raw) % width:
                raise ServingError(400, f"input {name!r}: {len(raw)} bytes is not a whole number "
                                   f"of {datatype} elements")
            elements = np.frombuffer(raw, DTYPES[datatype]).tolist()
    elif "data" in tensor:
        elements = flatten(tensor["data"])
    else:
        raise ServingError(400, f"input {name!r} has neither data nor binary_data_size")
    if len(elements) != math.prod(shape):
        raise ServingError(400, f"input {name!r}: shape {shape} holds {math.prod(shape)} "
                           f"elements, got {len(elements)}")
    return name, elements, offset


def as_text(element: Any, name: str) -> str:
    if isinstance(element, bytes):
        try:
            return element.decode()
        except UnicodeDecodeError:
            raise ServingError(400, f"input {name!r}: an element is not UTF-8 text") from None
    return element if isinstance(element, str) else json.dumps(element)


def as_image_bytes(element: Any, name: str) -> bytes:
    if isinstance(element, bytes):
        return element
    if isinstance(element, str):  # a JSON tensor carries an image as base64
        try:
            return base64.b64decode(element, validate=True)
        except (binascii.Error, ValueError):
            raise ServingError(400, f"input {name!r}: in a JSON tensor an image must be a base64 "
                               "string (or send binary tensor data)") from None
    raise ServingError(400, f"input {name!r}: an image must be BYTES")


def to_array(spec: Tensor, values: list[Any]) -> np.ndarray:
    if len(spec.shape) == 2 and len({len(v) for v in values}) > 1:
        raise ServingError(500, f"output {spec.name!r} differs in length between items; the "
                           "protocol needs rectangular tensors")
    if spec.datatype == "BYTES":
        if len(spec.shape) == 2:
            return np.array([[_utf8(x) for x in v] for v in values], dtype=object).reshape(
                len(values), -1)
        return np.array([_utf8(v) for v in values], dtype=object)
    array = np.array(values, dtype=DTYPES[spec.datatype])
    return array.reshape(len(values), -1) if len(spec.shape) == 2 else array


def _utf8(value: Any) -> bytes:
    return b"" if value is None else str(value).encode()
