"""Operations: what an operator reads and what guards the API process.

``logs`` (text or JSON lines, request ids in the workers too), ``metrics`` (Prometheus),
``tracing`` (OpenTelemetry, opt-in), ``middleware`` (request ids, access log, body limit).
"""
