"""The predict route's own multipart split against Starlette's parser: whatever body the
route splits itself, it must read exactly as Starlette would; any other body is left to
Starlette (the split answers None)."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from python_multipart.multipart import parse_options_header
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartParser

from app.protocols.predict import _decoded, _multipart_parts, _request_head
from loadtest.images import Upload, multipart_body

BOUNDARY = "b0undary"
TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def starlette_parts(body: bytes, content_type: str) -> list[tuple[str, object]] | None:
    """What Starlette reads from the body: (name, (filename, bytes) or the field's text) per
    part; None when it refuses the body."""

    async def parse() -> list[tuple[str, object]]:
        async def chunks():  # type: ignore[no-untyped-def]
            for start in range(0, len(body), 7):  # split boundaries across chunks
                yield body[start:start + 7]
            yield b""

        form = await MultiPartParser(Headers({"content-type": content_type}), chunks()).parse()
        items: list[tuple[str, object]] = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                items.append((name, (value.filename, await value.read())))
            else:
                items.append((name, value))
        await form.close()
        return items

    try:
        return asyncio.run(parse())
    except Exception:
        return None


def our_parts(body: bytes, boundary: str = BOUNDARY) -> list[tuple[str, object]] | None:
    parts = _multipart_parts(body, boundary.encode())
    if parts is None:
        return None
    return [(_decoded(name), (_decoded(filename), data)) for name, filename, data in parts]


def part(name: str = "files", filename: str = "a.jpg", data: bytes = b"\xff\xd8data",
         headers: str = "Content-Type: image/jpeg\r\n") -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\n{headers}\r\n').encode() + data + b"\r\n"


END = f"--{BOUNDARY}--\r\n".encode()

PLAIN = [
    part() + END,
    part() + part(filename="b.png", data=b"") + END,
    part(data=b"\r\n--b0undar\r\n-b0undary") + END,  # near-boundaries inside the data
    part(headers="") + END,
    part(headers="content-type: image/jpeg\r\nX-Other: 1\r\n") + END,
    part(filename="caf\u00e9.jpg") + END,
    part() + END[:-2],  # no CRLF after the last boundary
]
# Bodies the split leaves to Starlette (each reads differently there, or is refused).
ODD = [
    b"\r\n" + part() + END,  # a blank line before the first boundary
    b"preamble\r\n" + part() + END,
    part() + END + b"epilogue",
    part(filename="") + END,
    part(filename='a\\".jpg') + END,  # a quoted-pair
    part(filename="C:\\\\dir\\\\a.jpg") + END,  # a Windows path
    part(filename="a;b.jpg") + END,
    part(headers="Content-Disposition: form-data; name=\"other\"\r\n") + END,
    (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n3\r\n').encode()
    + END,
    (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"; '
     'filename*=UTF-8\'\'b.jpg\r\n\r\nx\r\n').encode() + END,
    part().replace(b"Content-Disposition: ", b"Content-Disposition:  ") + END,
    part().replace(b"\r\nContent-Type", b"\r\n Content-Type") + END,
    part().replace(BOUNDARY.encode() + b"\r\n", BOUNDARY.encode() + b" \r\n", 1) + END,
    part(),  # no last boundary
    part(data=b"\r\n--b0undaryX") + END,  # a boundary and more: data to Starlette
    part() + f"--{BOUNDARY}-\r\n".encode(),
]


@pytest.mark.parametrize("body", PLAIN)
def test_a_plain_body_is_split_as_starlette_reads_it(body: bytes) -> None:
    ours = our_parts(body)
    assert ours is not None
    assert ours == starlette_parts(body, TYPE)


@pytest.mark.parametrize("body", ODD)
def test_an_odd_body_is_left_to_starlette(body: bytes) -> None:
    assert our_parts(body) is None


def test_the_bodies_of_httpx_and_of_the_load_generators_are_split() -> None:
    image = b"\xff\xd8\xff" + bytes(range(256)) * 4
    request = httpx.Request("POST", "http://test/predict", files=[
        ("files", ("a.jpg", image, "image/jpeg")), ("files", ("b.jpg", image[:10], "image/x"))])
    body = request.read()
    content_type = request.headers["content-type"]
    head = [(b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode())]
    _, boundary = _request_head(head)
    assert boundary is not None
    assert our_parts(body, boundary.decode()) == starlette_parts(body, content_type)
    assert our_parts(body, boundary.decode()) == [
        ("files", ("a.jpg", image)), ("files", ("b.jpg", image[:10]))]

    body, content_type = multipart_body([Upload("bench.jpg", image, "image/jpeg")] * 3)
    _, boundary = _request_head([(b"content-type", content_type.encode()),
                                 (b"content-length", str(len(body)).encode())])
    assert boundary is not None and our_parts(body, boundary.decode()) is not None


def test_mutated_bodies_are_split_as_starlette_reads_them_or_left_to_it() -> None:
    rng = random.Random(7)
    bodies = PLAIN + ODD
    split = 0
    for _ in range(3000):
        body = bytearray(rng.choice(bodies))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(body) + 1)
            action = rng.randrange(4)
            if action == 0 and at < len(body):
                del body[at]
            elif action == 1:
                body[at:at] = bytes([rng.choice(b'\r\n-";= \\abBx:')])
            elif action == 2 and at < len(body):
                body[at] = rng.randrange(256)
            else:
                body[at:at] = rng.choice([b"\r\n", b"--", BOUNDARY.encode(), b'"'])
        ours = our_parts(bytes(body))
        if ours is not None:
            split += 1
            assert ours == starlette_parts(bytes(body), TYPE), bytes(body)
    assert split > 50  # the mutations that keep a body plain are still split


@pytest.mark.parametrize("content_type", [
    TYPE, f'multipart/form-data; boundary="{BOUNDARY}"',
    f"Multipart/Form-Data; boundary={BOUNDARY}",
    "multipart/form-data; boundary=a'()+_,./:=?-Z9",
])
def test_the_boundary_is_read_as_starlette_reads_it(content_type: str) -> None:
    _, boundary = _request_head([(b"content-type", content_type.encode()),
                                 (b"content-length", b"100")])
    kind, params = parse_options_header(content_type)
    assert kind == b"multipart/form-data"
    assert boundary == params[b"boundary"]


@pytest.mark.parametrize("head", [
    [(b"content-type", f"multipart/form-data; boundary={BOUNDARY}; charset=latin-1".encode()),
     (b"content-length", b"100")],
    [(b"content-type", f"multipart/form-data;boundary={BOUNDARY}".encode()),
     (b"content-length", b"100")],
    [(b"content-type", f"multipart/form-data; Boundary={BOUNDARY}".encode()),
     (b"content-length", b"100")],
    [(b"content-type", b"application/x-www-form-urlencoded"), (b"content-length", b"100")],
    [(b"content-type", TYPE.encode())],  # chunked
    [(b"content-type", TYPE.encode()), (b"content-length", str(2 * 2**20).encode())],
])
def test_other_bodies_are_not_split(head: list[tuple[bytes, bytes]]) -> None:
    assert _request_head(head)[1] is None


@pytest.mark.parametrize(("value", "seconds"), [
    (b"2.5", 2.5), (b"10", 10.0), (b"0.001", 0.001),
    (b"0.0001", False), (b"0", False), (b"1e3", False), (b" 1", False), (b"inf", False),
])
def test_a_plain_deadline_header_is_read_and_any_other_left_to_fastapi(
        value: bytes, seconds: float | bool) -> None:
    assert _request_head([(b"x-request-timeout", value)])[0] == seconds
    assert _request_head([])[0] is None
