"""JSON answers through orjson: numpy vectors are written straight from their float32 buffer.

Flask's default provider turns a vector into a list of Python floats first (``tolist()``: one object per
component, 384 per text with the bundled model) and then formats each as a float64, which is most of the
time of a small request once inference is fast. orjson writes a float32 array's components in their
shortest round-trip form: the same float32 values (``0.1`` where ``tolist()`` gave ``0.10000000149011612``),
valid JSON for every client, and base64 answers are unchanged. Keys keep their insertion order.
"""

from __future__ import annotations

from typing import Any

import orjson
from flask import Flask, Response
from flask.json.provider import JSONProvider

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


class OrjsonProvider(JSONProvider):
    """``jsonify`` and ``app.json`` with orjson; requests are still parsed by :mod:`app.schemas`."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return orjson.dumps(obj, option=_OPTIONS).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)

    def response(self, *args: Any, **kwargs: Any) -> Response:
        """The answer's bytes straight from orjson (no str in between)."""
        if args and kwargs:
            raise TypeError("jsonify() takes either arguments or keyword arguments, not both")
        obj = (args[0] if len(args) == 1 else args) if args else (kwargs or None)  # as Flask's jsonify reads them
        return Response(orjson.dumps(obj, option=_OPTIONS), mimetype="application/json")


def init_app(app: Flask) -> None:
    app.json = OrjsonProvider(app)
