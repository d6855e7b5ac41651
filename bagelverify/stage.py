"""Training stages and which buckets each one keeps."""

from __future__ import annotations

import operator
from typing import Literal

from .buckets import Bucket
from .errors import StageError, StageTypeError

Stage = Literal["stage1", "stage2"]
"""A stage, normalised: what :func:`normalize_stage` returns."""

StageLike = Literal[1, 2, "1", "2", "stage1", "stage2"]
"""The stage spellings a type checker accepts where a function takes a stage. At run time
:func:`normalize_stage` also takes other cases (``"Stage1"``) and surrounding spaces."""

STAGE_BUCKETS: dict[str, frozenset[Bucket]] = {
    "stage1": frozenset({Bucket.UND}),
    "stage2": frozenset({Bucket.UND, Bucket.GEN}),
}
"""Buckets whose keys a stage returns; every other bucket is dropped."""

_ACCEPTED = "1, 2, '1', '2', 'stage1' or 'stage2' (strings in any case, surrounding spaces ignored)"
_BY_TEXT: dict[str, Stage] = {"1": "stage1", "2": "stage2", "stage1": "stage1", "stage2": "stage2"}


def normalize_stage(stage: StageLike | str | int) -> Stage:
    """Return ``"stage1"`` or ``"stage2"`` for any accepted spelling of a stage.

    Raises :class:`~bagelverify.errors.StageError` (a ``ValueError``) for an unaccepted value and
    :class:`~bagelverify.errors.StageTypeError` (also a ``TypeError``) for a wrong type such as
    ``True``, ``2.0`` or ``None``.
    """
    if isinstance(stage, str):
        found = _BY_TEXT.get(stage.strip().lower())
        if found is None:
            raise StageError(f"unknown stage {stage!r}; expected {_ACCEPTED}")
        return found
    if isinstance(stage, bool) or not hasattr(stage, "__index__"):
        raise StageTypeError(
            f"stage must be an int or a str, got {type(stage).__name__} {stage!r}; "
            f"expected {_ACCEPTED}"
        )
    number = operator.index(stage)
    if number not in (1, 2):
        raise StageError(f"unknown stage {stage!r}; expected {_ACCEPTED}")
    return "stage1" if number == 1 else "stage2"
