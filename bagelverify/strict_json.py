"""Strict JSON for the files bagelverify reads (safetensors headers, the shard index, configs)
and for the documents it prints.

``json.loads`` silently keeps the last of two equal keys, accepts lone UTF-16 surrogate escapes
that no UTF-8 file can hold, and fails with ``RecursionError`` or a plain ``ValueError`` (too
many digits) on some inputs. :func:`parse_json` turns every one of those into the caller's own
error, naming where in the document the fault is.

``json.dumps`` writes bare ``NaN``/``Infinity`` (not JSON) and passes through the lone
surrogates that stand for a path's undecodable bytes (``os.fsdecode``, Python's
``surrogateescape``), which a strict UTF-8 stream refuses and a lenient one writes as invalid
bytes. :func:`dumps_json` writes valid JSON in any encoding instead.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from typing import Any

from .errors import BagelError

MAX_INDEX_BYTES = 100 * 1024 * 1024
"""Largest shard index (``model.safetensors.index.json``) accepted: the same cap as a safetensors
header (an index of the real 1,223 tensors is about 100 KB)."""
MAX_CONFIG_BYTES = 16 * 1024 * 1024
"""Largest config file accepted (the release's are about 1 KB each)."""


class _Object(dict[str, Any]):
    """A parsed JSON object that named a key twice (only such objects are of this class)."""

    repeated: str | None = None


def _object_from_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) == len(pairs):
        return out
    marked = _Object()
    for key, value in pairs:
        if key in marked and marked.repeated is None:
            marked.repeated = key
        marked[key] = value
    return marked


# A lone surrogate can only come from a \uD800-\uDFFF escape: decoded UTF-8 holds none.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


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


_Where = tuple[str, "_Where"] | None
"""A location as a linked list (innermost key first), so that the walk is linear in the size."""


def _location(where: _Where) -> str:
    parts: list[str] = []
    while where is not None:
        key, where = where
        parts.append(key)
    return describe_location(tuple(reversed(parts)))


def _first_fault(document: object) -> str | None:
    """Walk the document (iteratively: nesting depth is the parser's, not ours to recurse).

    Time and memory are linear in the document: each container is visited once and a location
    costs one small tuple per container, turned into text only for the fault reported.
    """
    stack: list[tuple[object, _Where]] = [(document, None)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if not is_unicode(value):
                return f"a string at {_location(where)} is not valid Unicode ({short_repr(value)})"
        elif isinstance(value, dict):
            if isinstance(value, _Object) and value.repeated is not None:
                return (
                    f"the object at {_location(where)} names {short_repr(value.repeated)} "
                    "twice (a JSON reader would silently keep only the last one)"
                )
            for key, item in value.items():
                if not is_unicode(key):
                    return f"a key at {_location(where)} is not valid Unicode ({short_repr(key)})"
                if isinstance(item, (str, dict, list)):
                    stack.append((item, (key, where)))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, (str, dict, list)):
                    stack.append((item, (str(index), where)))
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
    repeated: list[bool] = []

    def object_from_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = _object_from_pairs(pairs)
        if isinstance(out, _Object) and not repeated:
            repeated.append(True)
        return out

    try:
        document = json.loads(text, object_pairs_hook=object_from_pairs)
    except RecursionError:
        raise error("JSON nested too deeply to parse") from None
    except ValueError as failure:  # JSONDecodeError, or an integer with too many digits
        raise error(f"not valid JSON ({failure})") from None
    if not repeated and _SURROGATE_ESCAPE.search(text) is None:
        return document  # nothing the walk could find: skip it
    fault = _first_fault(document)
    if fault is not None:
        raise error(fault)
    return document


def read_json_file(
    path: str | os.PathLike[str], limit: int, error: Callable[[str], BagelError]
) -> Any:
    """Read and :func:`parse_json` the file at ``path``, or raise ``error(what is wrong)`` if it
    holds more than ``limit`` bytes (checked before reading; at most ``limit + 1`` bytes are read,
    so a file that grows meanwhile is caught too). ``OSError`` s of the open propagate."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        raw = b"" if size > limit else handle.read(limit + 1)
    if size > limit or len(raw) > limit:
        found = size if size > limit else f"more than {limit}"
        raise error(
            f"the file is {found} bytes, above the {limit}-byte cap for this kind of file "
            "(a genuine one is far smaller)"
        )
    return parse_json(raw, error)


_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def _finite(value: object) -> object:
    """``value`` with every non-finite float as its ``str`` (``"nan"``, ``"inf"``, ``"-inf"``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _escape(character: str) -> str:
    """JSON's ``\\u`` escape of one character (a surrogate pair beyond the BMP)."""
    code = ord(character)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def dumps_json(document: object, *, encoding: str = "utf-8", ascii_only: bool = False) -> str:
    """``document`` as indented JSON that is valid and encodable in ``encoding``, for any
    content: a non-finite number is written as the string ``"nan"``, ``"inf"`` or ``"-inf"``
    (``float()`` reads each back), and a character ``encoding`` cannot encode (every one with
    ``ascii_only``) as a ``\\u`` escape. A lone surrogate, which is how Python's
    ``surrogateescape`` holds a path's byte that is not UTF-8 (``\\udcff`` for ``0xff``), is
    never encodable, so it is always escaped: ``json.loads`` gives back the same string, and
    ``text.encode("utf-8", "surrogateescape")`` the original bytes."""
    text = json.dumps(_finite(document), indent=2, ensure_ascii=ascii_only, allow_nan=False)

    def escaped(match: re.Match[str]) -> str:
        character = match.group()
        try:
            character.encode(encoding)
        except UnicodeEncodeError:
            return _escape(character)
        return character

    # outside strings JSON is ASCII, so every non-ASCII character is inside a string
    return _NON_ASCII.sub(escaped, text)
