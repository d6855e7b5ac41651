"""Agreement between ranks: every rank learns whether any rank's checks failed, or whether the
ranks pass different state dicts, arguments or checkpoints, in one small collective before DCP
starts; and DCP's own failures, unwrapped."""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from ..errors import BagelError, DistributedMismatchError, counted, format_examples


@contextlib.contextmanager
def dcp_failures_unwrapped() -> Iterator[None]:
    """Unwrap the ``CheckpointException`` in which DCP wraps any failure of any rank (a
    ``BaseException``, which ``except Exception`` misses) raised in the block.

    What a rank raised inside DCP is re-raised as itself, the first of these kinds found: a
    ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM under the command line, while DCP reads or writes:
    the interrupt path), a bagelverify error (a file cut short while read, say), an ``OSError``
    (a full disk), then any other exception. Every rank of a collective call gets every rank's
    failures from DCP, so every rank raises the same error.
    """
    try:
        yield
    except CheckpointException as wrapped:
        failures = [error for error, _ in wrapped.failures.values()]
        for kind in (KeyboardInterrupt, BagelError, OSError, BaseException):
            for error in failures:
                if isinstance(error, kind):
                    raise error from wrapped
        raise


def quietly(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a DCP call, its failures unwrapped (:func:`dcp_failures_unwrapped`), without its
    warning that it is not distributed when it was asked for ``no_dist``."""
    with warnings.catch_warnings(), dcp_failures_unwrapped():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return call(*args, **kwargs)


def world(process_group: dist.ProcessGroup | None) -> tuple[bool, int]:
    """(whether to coordinate with other ranks, this rank's number)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False, 0
    return True, dist.get_rank(process_group)


def _transportable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a :class:`BagelError` carrying its text."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return BagelError(f"{type(error).__name__}: {error}")
    return error


def agree(
    error: BaseException | None,
    destinations: Mapping[str, Any],
    process_group: dist.ProcessGroup | None,
    identity: Mapping[str, str] | None = None,
) -> None:
    """Raise on every rank if any rank failed its checks, requests different tensors, or loads
    another checkpoint or with other arguments.

    ``identity`` describes what this rank loads and how, field -> text (the checkpoint's files
    with their sizes and header digests, the load arguments; see
    :func:`bagelverify.distributed.load.validated_load`); it is compared along with the
    destinations' keys, global shapes and dtypes.

    One ``all_gather_object`` of (verdict, digest) that every rank reaches whatever its own
    outcome, before any DCP collective: a rank whose checks failed re-raises its own error, the
    others the first failing rank's (same class, same message), so no rank is left waiting for
    a peer that gave up. Only when the digests differ does a second gather of the descriptions
    name what differs, in one :class:`~bagelverify.errors.DistributedMismatchError` on every
    rank.
    """
    coordinated, rank = world(process_group)
    if not coordinated:
        if error is not None:
            raise error
        return
    identity = dict(identity or {})
    size = dist.get_world_size(process_group)
    verdicts: list[Any] = [None] * size
    sent = None if error is None else _transportable(error)
    state = _describe(destinations)
    dist.all_gather_object(verdicts, (sent, _fingerprint(state, identity)), group=process_group)
    if error is not None:
        raise error
    for other, (remote, _) in enumerate(verdicts):
        if remote is not None:
            if hasattr(remote, "add_note"):
                remote.add_note(f"(raised by the checks on rank {other}; this is rank {rank})")
            raise remote
    if len({remote_print for _, remote_print in verdicts}) > 1:
        # every rank sees the same fingerprints, so every rank takes this second gather
        described: list[Any] = [None] * size
        dist.all_gather_object(described, (state, identity), group=process_group)
        raise DistributedMismatchError(
            "the ranks do not load the same way: "
            + "; ".join(
                _identity_differences([load for _, load in described])
                + _differences([state for state, _ in described])
            )
            + ". Every rank must read the same checkpoint files (one path for the folder), "
            "with the same stage, strict, cast, weights, convert_conv_patch_embedding and "
            "config, into the same model's full state dict (sharded values are fine); otherwise "
            "the ranks' shards would come from different checkpoints or loads, or DCP would "
            "hang."
        )


def _describe(destinations: Mapping[str, Any]) -> dict[str, str]:
    """Key -> ``"<global shape> <dtype>"`` (the type name for non-tensors)."""
    out = {}
    for key, value in destinations.items():
        kind = getattr(value, "dtype", type(value).__name__)
        out[key] = f"{list(getattr(value, 'shape', ()))} {kind}"
    return out


def _fingerprint(*descriptions: Mapping[str, str]) -> str:
    """A digest of ``descriptions`` (field -> text each), in field order."""
    digest = hashlib.sha256()
    for description in descriptions:
        for key, text in sorted(description.items()):
            digest.update(f"{key}\0{text}\n".encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _identity_differences(identities: Sequence[Mapping[str, str]]) -> list[str]:
    """How each rank's identity differs from rank 0's, one phrase per differing rank:
    ``rank 1: stage 'stage2' (rank 0: 'stage1')``."""
    base = identities[0]
    phrases = []
    for rank, other in enumerate(identities[1:], start=1):
        fields = [*base, *(field for field in other if field not in base)]
        changed = [
            f"{field} {other.get(field, 'absent')} (rank 0: {base.get(field, 'absent')})"
            for field in fields
            if other.get(field) != base.get(field)
        ]
        if changed:
            phrases.append(f"rank {rank}: " + format_examples(changed, show=str))
    return phrases


def _differences(described: Sequence[Mapping[str, str]]) -> list[str]:
    """How each rank's state dict differs from rank 0's, one phrase per differing rank."""
    base = described[0]
    phrases = []
    for rank, other in enumerate(described[1:], start=1):
        parts = []
        if lacks := [k for k in base if k not in other]:
            parts.append(f"lacks {len(lacks):,} of rank 0's keys ({format_examples(lacks)})")
        if extra := [k for k in other if k not in base]:
            parts.append(
                f"has {counted(len(extra), 'key')} rank 0 lacks ({format_examples(extra)})"
            )
        if changed := [
            f"{k} {base[k]} vs {other[k]}" for k in base if other.get(k, base[k]) != base[k]
        ]:
            parts.append(f"{len(changed)} differ from rank 0's ({format_examples(changed)})")
        if parts:
            phrases.append(f"rank {rank} " + ", ".join(parts))
    return phrases
