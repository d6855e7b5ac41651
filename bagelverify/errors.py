"""Every error bagelverify raises on bad input: one base class, one subclass per kind of fault.

Each subclass also derives from the builtin that callers of the reference adapter catch
(``KeyError`` for key problems, ``ValueError`` for bad values), so drop-in code keeps working.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

EXAMPLES_SHOWN = 5
"""How many offending keys an error message lists before it says how many more there are."""


def format_examples(
    items: Sequence[object], limit: int = EXAMPLES_SHOWN, show: Callable[[object], str] = repr
) -> str:
    """``'a', 'b' (and 3 more)``: the first ``limit`` items, each written by ``show`` (``repr``
    unless told), and the count of the rest."""
    shown = ", ".join(show(item) for item in items[:limit])
    rest = len(items) - limit
    return f"{shown} (and {rest:,} more)" if rest > 0 else shown


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``1 key``, ``1,223 keys``: the count with thousands separators and the noun agreeing."""
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


def agree(count: int, singular: str, plural: str) -> str:
    """``singular`` for a count of one, else ``plural``: the verb after :func:`counted`."""
    return singular if count == 1 else plural


class BagelError(Exception):
    """Base class of every bagelverify error."""

    def __str__(self) -> str:
        # KeyError would repr() its message; every subclass prints it as written.
        return str(self.args[0]) if self.args else ""


class UnknownKeysError(BagelError, KeyError):
    """Keys that belong to no known family."""

    def __init__(self, message: str, keys: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.keys = list(keys)


class KeyCollisionError(BagelError, ValueError):
    """Two input keys that name the same tensor (``X`` and ``model.X``)."""

    def __init__(self, message: str, pairs: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.pairs = list(pairs)


class RootError(BagelError, KeyError):
    """A native key outside the ``model.`` root."""

    def __init__(self, message: str, keys: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.keys = list(keys)


class MissingKeysError(BagelError, KeyError):
    """Expected keys that the input lacks (including a GEN key's absent UND twin).

    ``keys`` holds the missing keys only; when a destination state dict and a checkpoint are
    compared, ``unexpected`` holds the checkpoint's keys that have no destination.
    """

    def __init__(
        self, message: str, keys: Sequence[str] = (), unexpected: Sequence[str] = ()
    ) -> None:
        super().__init__(message)
        self.keys = list(keys)
        self.unexpected = list(unexpected)


class ShapeMismatchError(BagelError, ValueError):
    """Tensors whose shape differs from what the config (or the destination) implies.

    ``mismatches`` holds every ``(key, expected, found)`` when the message summarises them.
    """

    def __init__(
        self,
        message: str,
        mismatches: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
    ) -> None:
        super().__init__(message)
        self.mismatches = list(mismatches)


class DestinationError(ShapeMismatchError):
    """Destination tensors of the right shape that cannot take their checkpoint tensor by a
    plain copy: a dtype cast the ``cast`` policy refuses, a meta-device tensor, or a layout
    whose elements overlap (an expanded, stride-0 view). A :class:`ShapeMismatchError`, as
    these were reported before the class existed."""


class AllocationError(BagelError, MemoryError):
    """Memory for the tensors to load could not be allocated (a checkpoint too large for the
    host or device); the message names the tensor, its file and the sizes."""


class CorruptCheckpointError(BagelError, ValueError):
    """A checkpoint file that cannot be trusted (bad header, offsets, sizes)."""


class UnsupportedTensorError(BagelError, TypeError, ValueError):
    """A state-dict entry no safetensors file can hold: a value that is not a plain tensor with
    memory (a meta, sparse or wrapper-subclass tensor, or no tensor at all), a dtype safetensors
    lacks, or a name the format reserves or cannot encode. Nothing is written."""


class ArgumentError(BagelError, ValueError):
    """A function argument outside what it accepts (``weights=``, ``dtype=``, ``scale=``, ...);
    the message names the argument, what it got and what it accepts."""


class ArgumentTypeError(ArgumentError, TypeError):
    """A function argument of a type it does not take (a single key where keys are expected, a
    config that is neither a :class:`~bagelverify.BagelConfig` nor a folder, ...)."""


class ShardSizeError(BagelError, ValueError):
    """A ``max_shard_size`` that is not a positive byte count or a size such as ``"5GB"``."""


class StageError(BagelError, ValueError):
    """A stage value that is not one of the accepted spellings."""


class StageTypeError(StageError, TypeError):
    """A stage of a type that cannot name a stage (``bool``, ``float``, ``None``, ...)."""


class UnsupportedPlatformError(BagelError, RuntimeError):
    """The host cannot do what was asked (for example a big-endian machine reading raw bytes)."""


class ConfigError(BagelError, ValueError):
    """A config file that is missing a field or holds an invalid value."""


class PatternError(BagelError, ValueError):
    """A user-supplied key pattern that is not a valid regex string."""


class UnsupportedPattern(PatternError):
    """A pattern with a construct the automaton engine cannot translate exactly (it never
    approximates): a lookaround, a backreference, a word boundary."""


class DistributedMismatchError(BagelError, ValueError):
    """Ranks of one distributed load that pass different state dicts (keys, shapes, dtypes)."""


class ReadError(BagelError, OSError):
    """Reading a checkpoint file's data failed (an I/O error, a file that cannot be opened)."""


class LossyCastError(BagelError, ValueError):
    """A requested dtype cast that would lose precision or range, without permission to."""


class LoraError(BagelError, ValueError):
    """A LoRA adapter that does not fit BAGEL: a bad ``adapter_config.json``, factor shapes
    that disagree with the rank or the base, a target that binds no module."""


class WeightsMismatchError(BagelError, ValueError):
    """Two sets of weights of one training run (the model and its EMA) that disagree in keys or
    shapes."""

    def __init__(self, message: str, keys: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.keys = list(keys)


class IntegrationError(BagelError, ImportError):
    """A training framework bagelverify plugs into is missing, or is a version whose interface
    it cannot serve completely."""


class PatternTooComplexError(PatternError):
    """A user-supplied key pattern whose automaton would exceed the construction budget (for
    example ``(?:a|b)*a(?:a|b){15}``, whose minimal DFA has 2**16 states)."""


class QuantizedCheckpointError(BagelError, ValueError):
    """A quantized checkpoint (FP8 weight codes, scale tensors such as ``weight_scale``) where
    a BF16/F16/F32 one is needed: the codes are not weights without their scales. ``keys``
    holds the FP8 tensors and the quantization tensors."""

    def __init__(self, message: str, keys: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.keys = list(keys)


class AliasError(BagelError, ValueError):
    """A write whose output is one of its inputs (the same folder or file, through a symlink, a
    bind mount or a hard link): it would replace what it reads. Nothing is written. ``source``
    is the input, ``destination`` the output that is the same file."""

    def __init__(self, message: str, source: str = "", destination: str = "") -> None:
        super().__init__(message)
        self.source = source
        self.destination = destination
