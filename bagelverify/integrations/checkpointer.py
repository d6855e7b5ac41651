"""Automodel's checkpointer, reading BAGEL base checkpoints through bagelverify's read engine.

:func:`route_checkpointer` (called by :func:`bagelverify.integrations.automodel.install`) wraps
two methods of Automodel's ``Checkpointer``:

- ``load_model``: when the model carries bagelverify's adapter and the load is a base-checkpoint
  load (``is_init_step=True``) of a local safetensors folder, the folder and the model are
  checked first, exactly as :func:`bagelverify.load_bagel_checkpoint_state_dict` and
  :func:`bagelverify.load_into` check them (unknown keys, missing keys, the config's shapes,
  the stage, the model's key set and global shapes), on every rank, before any parameter
  changes; a failure, or ranks that disagree on the folder or the model, raises bagelverify's
  error on every rank. Then Automodel's own ``load_model`` runs unchanged (its aliases,
  ``_extra_state`` handling, tied weights, casts to the model's dtypes, installation into FSDP2
  or CPU-offloaded parameters); what fails inside its DCP load (a read error, Ctrl-C) is
  re-raised as itself, not as DCP's ``CheckpointException``;
- ``_get_storage_reader``: during such a load it hands DCP
  :class:`~bagelverify.distributed.BagelHFStorageReader`, built from the validated headers, so
  every byte is read by the engine (several threads, straight into each rank's shards, staged
  and overlapped for CUDA) instead of Automodel's memory-mapped reader.

Every other load (Automodel's own DCP training checkpoints on resume, PEFT adapters, subset
loads, models without bagelverify's adapter, pipeline-parallel parts) runs as before.
"""

from __future__ import annotations

import contextvars
import functools
import gc
import inspect
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

from ..adapter import BagelStateDictAdapter
from ..checkpoint import Cast
from ..distributed.agreement import dcp_failures_unwrapped
from ..distributed.load import validated_load
from ..distributed.reader import BagelHFStorageReader

logger = logging.getLogger(__name__)

CAST: Cast = "any"
"""Destinations take the checkpoint's values in their own dtype, as Automodel's DCP load does
(a BF16 release into F32 master weights, an F32 export into a BF16 model)."""

_ROUTED = "__bagelverify_routed__"


class _Active(NamedTuple):
    checkpointer: Any
    path: str
    reader: BagelHFStorageReader


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar(
    "bagelverify_automodel_load", default=None
)


def _adapter_of(checkpointing: Any, model: Any) -> BagelStateDictAdapter | None:
    """bagelverify's adapter on a single-part model, or None."""
    parts = model if isinstance(model, list | tuple) else [model]
    if len(parts) != 1:
        return None
    adapter = getattr(checkpointing._unwrap_ddp_model(parts[0]), "state_dict_adapter", None)
    return adapter if isinstance(adapter, BagelStateDictAdapter) else None


def _routes(checkpointer: Any, checkpointing: Any, call: inspect.BoundArguments) -> bool:
    """Whether this ``load_model`` call is a BAGEL base-checkpoint load bagelverify reads."""
    arguments = call.arguments
    path = arguments["model_path"]
    return bool(
        arguments.get("is_init_step", False)
        and not arguments.get("allow_checkpoint_key_subset", False)
        and not getattr(checkpointer.config, "is_peft", False)
        and not getattr(checkpointer.config, "dequantize_base_checkpoint", False)
        and isinstance(path, str | os.PathLike)
        and os.path.isdir(path)
        and checkpointing._is_safetensors_checkpoint(os.fspath(path))
        and _adapter_of(checkpointing, arguments["model"]) is not None
    )


def destinations_of(model: Any) -> Mapping[str, Any]:
    """The model's state dict as Automodel's checkpointer sees it (wrapper prefixes removed,
    sharded parameters as ``DTensor`` s, no copies)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    part = model[0] if isinstance(model, list | tuple) else model
    state: Mapping[str, Any] = get_model_state_dict(part)
    return state


@contextmanager
def _checked(checkpointer: Any, checkpointing: Any, model: Any, path: str) -> Iterator[None]:
    adapter = _adapter_of(checkpointing, model)
    assert adapter is not None
    started = time.perf_counter()
    with validated_load(
        destinations_of(model),
        path,
        stage=adapter.stage,
        strict=True,
        config=adapter.config,
        cast=CAST,
        process_group=getattr(checkpointer, "process_group", None),
    ) as load:
        checked = time.perf_counter() - started
        token = _ACTIVE.set(_Active(checkpointer, os.fspath(path), load.reader))
        try:
            yield
        finally:
            _ACTIVE.reset(token)
        total = sum(job.info.nbytes for job in load.common.values())
        if load.common and load.reader.bytes_read == 0:
            logger.warning(
                "%s: Automodel's checkpointer did not read through bagelverify's storage reader "
                "(its load path changed?); the checks ran, the bytes were read by Automodel",
                path,
            )
        else:
            logger.info(
                "rank %d: Automodel loaded %d tensors from %s through bagelverify's read engine "
                "(%d of their %d bytes read by this rank; checks %.3f s, load %.3f s)",
                load.rank,
                len(load.common),
                path,
                load.reader.bytes_read,
                total,
                checked,
                time.perf_counter() - started - checked,
            )


@contextmanager
def _older_objects_frozen() -> Iterator[None]:
    """Keep the objects that exist before a routed load out of the garbage collector's
    traversals until it ends (``gc.freeze``), unless the process froze objects itself.

    Automodel's ``load_model`` ends with ``gc.collect()`` to free the load's temporaries, and
    the header parse allocates enough to trigger automatic full collections; each traverses
    every object of a process that imported Automodel and transformers (about 450,000: 0.5 s on
    a 2-core host, most of a load's fixed cost). Frozen, the older objects are skipped: what the
    load creates is still collected, and anything older is collected by the first full
    collection after the load.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _wrap_load_model(original: Callable[..., Any], checkpointing: Any) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        call = signature.bind(self, *args, **kwargs)
        if not _routes(self, checkpointing, call):
            return original(self, *args, **kwargs)
        model, path = call.arguments["model"], call.arguments["model_path"]
        with (
            _older_objects_frozen(),
            _checked(self, checkpointing, model, path),
            dcp_failures_unwrapped(),
        ):
            return original(self, *args, **kwargs)

    setattr(load_model, _ROUTED, True)
    return load_model


def _wrap_get_storage_reader(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def get_storage_reader(self: Any, model_path: Any, *args: Any, **kwargs: Any) -> Any:
        active = _ACTIVE.get()
        if active is not None and active.checkpointer is self and active.path == model_path:
            return active.reader
        return original(self, model_path, *args, **kwargs)

    setattr(get_storage_reader, _ROUTED, True)
    return get_storage_reader


def route_checkpointer(checkpointing: Any) -> None:
    """Wrap ``checkpointing.Checkpointer``'s ``load_model`` and ``_get_storage_reader`` (once)
    so BAGEL base-checkpoint loads are checked and read by bagelverify (see the module)."""
    checkpointer = checkpointing.Checkpointer
    if getattr(checkpointer.load_model, _ROUTED, False):
        return
    checkpointer.load_model = _wrap_load_model(checkpointer.load_model, checkpointing)
    checkpointer._get_storage_reader = _wrap_get_storage_reader(checkpointer._get_storage_reader)
