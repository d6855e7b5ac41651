"""Strict JSON for the files bagelverify reads (safetensors headers, the shard index, configs).

``json.loads`` silently keeps the last of two equal keys, accepts lone UTF-16 surrogate escapes
that no UTF-8 file can hold, and fails with ``RecursionError`` or a plain ``ValueError`` (too
many digits) on some inputs. :func:`parse_json` turns every one of those into the caller's own
error, naming where in the document the fault is.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .errors import BagelError


class _Object(dict[str, Any]):
    """A parsed JSON object that remembers the first key it saw twice."""

    repeated: str | None = None


def _object_from_pairs(pairs: list[tuple[str, Any]]) -> _Object:
    out = _Object()
    for key, value in pairs:
        if key in out and out.repeated is None:
            out.repeated = key
        out[key] = value
    return out


def is_unicode(text: str) -> bool:
    """Whether ``text`` can be encoded as UTF-8 (it holds no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def short_repr(value: object, limit: int = 120) -> str:
    """``repr(value)``, cut to ``limit`` characters: messages stay readable for huge values."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type: ``object``, ``array``, ``string``, ``null``, ..."""
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), (dict, "object"), (list, "array"), (str, "string")):
        if isinstance(value, kind):
            return name
    return "number"


def describe_location(path: tuple[str, ...]) -> str:
    """``('a', 'dtype')`` -> ``"'a' > 'dtype'"``; ``()`` -> ``"the top level"``."""
    return " > ".join(short_repr(part) for part in path) if path else "the top level"


def _first_fault(document: object) -> str | None:
    """Walk the document (iteratively: nesting depth is the parser's, not ours to recurse)."""
    stack: list[tuple[object, tuple[str, ...]]] = [(document, ())]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if not is_unicode(value):
                where_text = describe_location(where)
                return f"a string at {where_text} is not valid Unicode ({short_repr(value)})"
        elif isinstance(value, dict):
            if isinstance(value, _Object) and value.repeated is not None:
                return (
                    f"the object at {describe_location(where)} names {short_repr(value.repeated)} "
                    "twice (a JSON reader would silently keep only the last one)"
                )
            for key, item in value.items():
                if not is_unicode(key):
                    where_text = describe_location(where)
                    return f"a key at {where_text} is not valid Unicode ({short_repr(key)})"
                stack.append((item, (*where, key)))
        elif isinstance(value, list):
            stack.extend((item, (*where, str(index))) for index, item in enumerate(value))
    return None


def parse_json(raw: bytes, error: Callable[[str], BagelError]) -> Any:
    """Decode ``raw`` as UTF-8 JSON, or raise ``error(what is wrong)``.

    Rejected: invalid UTF-8, invalid JSON, nesting too deep for the parser, integers too long to
    convert, a key repeated within one object, and strings or keys holding lone surrogates.
    Returned objects are ``dict`` instances.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as failure:
        raise error(f"not UTF-8 ({failure})") from None
    try:
        document = json.loads(text, object_pairs_hook=_object_from_pairs)
    except RecursionError:
        raise error("JSON nested too deeply to parse") from None
    except ValueError as failure:  # JSONDecodeError, or an integer with too many digits
        raise error(f"not valid JSON ({failure})") from None
    fault = _first_fault(document)
    if fault is not None:
        raise error(fault)
    return document
