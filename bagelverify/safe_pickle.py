"""Reading a DCP checkpoint's ``.metadata`` without running code from it.

``torch.distributed.checkpoint`` stores its metadata as a pickle, and its ``FileSystemReader``
unpickles it with ``pickle.load``: a crafted ``.metadata`` runs any code it names. The
:class:`MetadataUnpickler` here resolves only the globals that DCP itself writes into that file
(checked against files saved by torch 2.13's ``dcp.save`` and by
:func:`bagelverify.distributed.hf_to_dcp`): the metadata dataclasses, ``torch.Size``, torch dtypes,
the layout and memory-format encoders, and the path class of ``StorageMeta.checkpoint_id``. Any
other global, and any file that does not unpickle to a ``Metadata``, is a
:class:`~bagelverify.errors.CorruptCheckpointError` naming the file.

Every admitted global is harmless to call with any arguments: the dataclasses only store what
they are given, ``torch.Size`` builds a tuple, ``_get_layout`` looks a name up in a table, the
enum maps a number to a member, ``PosixPath`` builds a path.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata

from .errors import CorruptCheckpointError

_DCP_METADATA = "torch.distributed.checkpoint.metadata"

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        (_DCP_METADATA, "Metadata"),
        (_DCP_METADATA, "TensorStorageMetadata"),
        (_DCP_METADATA, "BytesStorageMetadata"),
        (_DCP_METADATA, "ChunkStorageMetadata"),
        (_DCP_METADATA, "TensorProperties"),
        (_DCP_METADATA, "MetadataIndex"),
        (_DCP_METADATA, "StorageMeta"),
        (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # how torch pickles a layout (torch.strided)
        ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id, when saved with a path
        ("pathlib", "WindowsPath"),
    }
)
"""``(module, name)`` of every class or function a DCP ``.metadata`` may name, besides dtypes."""

_DTYPE_NAMES = frozenset(
    name for name, value in vars(torch).items() if isinstance(value, torch.dtype)
)


class MetadataUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` that resolves only :data:`ALLOWED_GLOBALS` and torch dtypes
    (``torch.bfloat16``, ...); ``source`` names the file in the error for any other global."""

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        """The global ``module.name`` if DCP metadata may hold it, else the refusal."""
        if (module, name) in ALLOWED_GLOBALS or (module == "torch" and name in _DTYPE_NAMES):
            return super().find_class(module, name)
        raise CorruptCheckpointError(
            f"{self.source}: the DCP metadata pickle names {module}.{name}, which DCP never "
            "writes there; it was not loaded (unpickling it could run code from the file). "
            "Re-save the checkpoint with torch.distributed.checkpoint, or do not trust this file."
        )


def load_dcp_metadata(path: str | os.PathLike[str]) -> Metadata:
    """Unpickle the DCP ``.metadata`` file at ``path`` with :class:`MetadataUnpickler`.

    Raises ``FileNotFoundError`` for a missing file and
    :class:`~bagelverify.errors.CorruptCheckpointError` naming the file for a refused global, a
    malformed pickle, or a pickle that does not hold a ``Metadata``.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        try:
            metadata = MetadataUnpickler(handle, str(path)).load()
        except CorruptCheckpointError:
            raise
        except Exception as error:  # any malformed pickle: UnpicklingError, EOFError, TypeError
            raise CorruptCheckpointError(
                f"{path}: not a readable DCP metadata pickle ({type(error).__name__}: {error}). "
                "Re-save the checkpoint or restore the file."
            ) from None
    if not isinstance(metadata, Metadata):
        raise CorruptCheckpointError(
            f"{path}: the DCP metadata pickle holds a {type(metadata).__name__}, not a "
            "torch.distributed.checkpoint Metadata. Re-save the checkpoint or restore the file."
        )
    return metadata
