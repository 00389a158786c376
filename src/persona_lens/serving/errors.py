"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``.

:class:`APIError` carries an HTTP status with the four fields; :func:`from_validation` turns
pydantic/FastAPI validation errors into one 400 that names the offending field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class APIError(Exception):
    """A request the server answers with ``status`` and an OpenAI-shaped error body."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


_CODES = {
    "extra_forbidden": "unknown_parameter",
    "missing": "missing_required_parameter",
    "json_invalid": "invalid_json",
    "unsupported": "unsupported_parameter",
}


_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _is_tag(part: str) -> bool:
    """A union member's tag in a pydantic error location (``list[str]``, ``literal[...]``)."""
    return part in _TAGS or "[" in part or part.startswith(("function-", "constrained-"))


def _location(loc: Sequence[Any]) -> str | None:
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and _is_tag(p))]
    dotted = ""
    for part in parts:
        dotted += f"[{part}]" if part.isdigit() else (f".{part}" if dotted else part)
    return dotted or None


def _rank(error: Any) -> int:
    """Which error to report first: an unknown key (likely a typo, the cause of the rest),
    then a broken constraint, then a wrong type (a union reports one per member)."""
    kind = str(error.get("type", "")) if isinstance(error, dict) else ""
    if kind == "extra_forbidden":
        return 0
    return 2 if kind.endswith("_type") or kind in ("literal_error", "union_tag_invalid") else 1


def from_validation(errors: Sequence[Any]) -> APIError:
    """The first validation error as a 400 (``param`` is the dotted field path)."""
    if not errors:
        return bad_request("invalid request")
    ranked = sorted(errors, key=_rank)
    first = ranked[0] if isinstance(ranked[0], dict) else {"msg": str(ranked[0])}
    param = _location(first.get("loc", ()))
    kind = str(first.get("type", ""))
    message = str(first.get("msg", "invalid value"))
    if kind == "extra_forbidden":
        message = f"unrecognized request argument supplied: {param}"
    elif kind == "json_invalid":
        context = first.get("ctx") or {}
        detail = context.get("error", "") if isinstance(context, dict) else ""
        message = f"the request body is not valid JSON ({detail})"
        param = None
    elif param:
        message = f"{param}: {message}"
    more = len(errors) - 1
    if more > 0:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return bad_request(message, param, _CODES.get(kind, "invalid_value"))
