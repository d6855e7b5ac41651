"""Validated, selective loading and atomic saving of BAGEL checkpoint folders.

Every load goes the same way: read the safetensors header(s) (:func:`open_checkpoint`), build a
:class:`CheckpointReport` from the headers alone (adapter plan, config shapes, missing keys by
family), raise if the report has problems, and only then read the bytes of the tensors the
stage keeps, each straight into its destination tensor. The bytes of dropped tensors are never
read.

One job per module: :mod:`.files` (a folder's files, index and config), :mod:`.report` (the
report), :mod:`.load` (read jobs, destination checks, loaders), :mod:`.save` (writing and
conversion). Every public name is importable from this package.
"""

from __future__ import annotations

from .files import (
    INDEX_FILE,
    MODEL_WEIGHTS_FILE,
    OPEN_ATTEMPTS,
    SAVE_ID,
    WEIGHTS_CHOICES,
    CheckpointFiles,
    Weights,
    check_weights,
    choose_weights,
    find_config,
    open_checkpoint,
    open_weights,
    require_directory,
)
from .load import (
    Cast,
    IncompatibleKeys,
    ReadJob,
    ReadJobs,
    allocate,
    check_destinations,
    fill,
    load_bagel_checkpoint_state_dict,
    load_bagel_vae_state_dict,
    load_into,
    read_jobs,
    read_tensor,
)
from .report import (
    CONVERT_FLAG,
    BucketSummary,
    CheckpointReport,
    ShapeMismatch,
    TensorLike,
    build_report,
    check_swapped_vae,
    inspect_checkpoint,
    report_files,
    state_dict_report,
)
from .save import (
    KeyLayout,
    convert_checkpoint,
    parse_size,
    save_bagel_checkpoint,
    write_bagel_checkpoint,
)

__all__ = [
    "CONVERT_FLAG",
    "INDEX_FILE",
    "MODEL_WEIGHTS_FILE",
    "OPEN_ATTEMPTS",
    "SAVE_ID",
    "WEIGHTS_CHOICES",
    "BucketSummary",
    "Cast",
    "CheckpointFiles",
    "CheckpointReport",
    "IncompatibleKeys",
    "KeyLayout",
    "ReadJob",
    "ReadJobs",
    "ShapeMismatch",
    "TensorLike",
    "Weights",
    "allocate",
    "build_report",
    "check_destinations",
    "check_swapped_vae",
    "check_weights",
    "choose_weights",
    "convert_checkpoint",
    "fill",
    "find_config",
    "inspect_checkpoint",
    "load_bagel_checkpoint_state_dict",
    "load_bagel_vae_state_dict",
    "load_into",
    "open_checkpoint",
    "open_weights",
    "parse_size",
    "read_jobs",
    "read_tensor",
    "report_files",
    "require_directory",
    "save_bagel_checkpoint",
    "state_dict_report",
    "write_bagel_checkpoint",
]
