"""Checkpoint keys as strings: the ``model.`` root of native keys and the ``str`` check.

A leaf: it imports nothing of bagelverify, so every layer above may use it.
"""

from __future__ import annotations

ROOT = "model."
"""Prefix of every native key."""


def to_native_key(hf_key: str) -> str:
    """``language_model.x`` -> ``model.language_model.x``."""
    return ROOT + hf_key


def strip_root(key: str) -> str:
    """Remove one leading ``model.`` if present; other keys are returned unchanged."""
    return key[len(ROOT) :] if key.startswith(ROOT) else key


def check_key(key: object) -> str:
    """Return ``key`` if it is a ``str``; raise ``TypeError`` naming it otherwise."""
    if not isinstance(key, str):
        raise TypeError(f"checkpoint keys must be str, got {type(key).__name__} {key!r}")
    return key
