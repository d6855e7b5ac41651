"""Sharded loading and DCP conversion through ``torch.distributed.checkpoint`` (DCP).

:func:`load_bagel_checkpoint_distributed` fills a model's (possibly ``DTensor``-sharded) state dict
in place from an HF-layout BAGEL folder. Validation is the single-process loader's own code
(:mod:`bagelverify.checkpoint`), run from the safetensors headers on every rank; the ranks then
agree on the verdict in one small collective (:mod:`.agreement`), so a bad checkpoint raises the
same error on every rank and none is left waiting in DCP. DCP then plans, per rank, the pieces of
each stored tensor that overlap the rank's local shards, and :class:`BagelHFStorageReader`
(:mod:`.reader`: DCP's :class:`~torch.distributed.checkpoint.HuggingFaceStorageReader`, fed the
validated headers) reads each piece's byte range into the shard, so a rank reads the bytes of its
own shards only.

:func:`hf_to_dcp` and :func:`dcp_to_hf` (:mod:`.convert`) convert between an HF-layout folder and
a DCP checkpoint in native (``model.``-rooted) layout, the form sharded training saves and resumes
from.

Importing this package imports ``torch.distributed`` but never initialises a process group.
"""

from __future__ import annotations

from .convert import dcp_to_hf, hf_to_dcp
from .load import DistributedLoadResult, load_bagel_checkpoint_distributed
from .reader import BagelHFStorageReader

__all__ = [
    "BagelHFStorageReader",
    "DistributedLoadResult",
    "dcp_to_hf",
    "hf_to_dcp",
    "load_bagel_checkpoint_distributed",
]

for _name in __all__:  # documented, pickled and shown under the package they are used from
    globals()[_name].__module__ = __name__
del _name
