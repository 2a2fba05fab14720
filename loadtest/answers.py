"""What counts as a correct answer of ``POST /predict``, for every load generator."""

from __future__ import annotations

import json


def answer_problem(status: int, text: str | None, expected: int) -> str | None:
    """Why an answer is wrong, or None if it holds one prediction object per image."""
    if status != 200:
        return f"HTTP {status}: {(text or '')[:200]}"
    try:
        predictions = json.loads(text or "")["predictions"]
    except (ValueError, KeyError, TypeError):
        return f"not a predictions object: {(text or '')[:200]}"
    if not isinstance(predictions, list) or len(predictions) != expected:
        count = len(predictions) if isinstance(predictions, list) else "no"
        return f"{count} predictions for {expected} images"
    if not all(isinstance(p, dict) and p for p in predictions):
        return "a prediction is empty or not an object"
    return None
