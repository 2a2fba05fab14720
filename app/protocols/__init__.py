"""The protocols: each parses its wire format, calls the serving core and renders answers
and errors in its own shape.

``http`` (what they share: the ``Protocol`` record, the deadline header, the API key),
``probes`` (``/healthz``, ``/readyz``, ``/metrics``, ``/v1/model``), ``predict``
(``POST /predict``: uploads or a JSON body, errors ``{"detail"}``), ``v2`` and ``v2_tensors``
(KServe v2 / Open Inference Protocol, errors ``{"error"}``), ``generate`` (Triton's generate
extension), ``openai`` (the OpenAI API), ``admin`` (reloading a model under load), ``sse``
(server-sent events for streamed answers), ``schemas`` (response bodies).

Adding a protocol is a module that defines ``PROTOCOL`` and one line in ``PROTOCOLS``.
"""

from __future__ import annotations

from collections.abc import Callable

from . import admin, generate, openai, predict, probes, v2
from .http import Protocol, Renderer, detail_response

PROTOCOLS: tuple[Protocol, ...] = (
    predict.PROTOCOL,
    probes.PROTOCOL,
    v2.PROTOCOL,
    generate.PROTOCOL,
    openai.PROTOCOL,
    admin.PROTOCOL,
)


def renderer_for(protocols: tuple[Protocol, ...] = PROTOCOLS) -> Callable[[str], Renderer]:
    """``path -> render``: the protocol with the longest prefix of the path renders its
    errors; a path no protocol claims gets FastAPI's ``{"detail"}``."""
    owners = sorted(((prefix, p.render) for p in protocols for prefix in p.prefixes),
                    key=lambda owner: -len(owner[0]))

    def render_for(path: str) -> Renderer:
        for prefix, render in owners:
            if path == prefix or path.startswith(prefix + "/"):
                return render
        return detail_response

    return render_for


__all__ = ["PROTOCOLS", "Protocol", "renderer_for"]
