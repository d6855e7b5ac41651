"""Filling a BAGEL model's tensors in place from Qwen2 + SigLIP folders, by the compose plan.

The same routing and checks as :func:`bagelverify.compose_checkpoint`
(:func:`bagelverify.compose.plan_composition`), but the destination is a model's state dict
instead of a file: each backbone tensor's bytes are read by the read engine straight into its
parameter (a ``DTensor`` parameter through DCP, each rank reading only its own rows), QK norms
are set to one and the ``*_moe_gen`` twins copied from their UND parameters in place. Nothing
holds a backbone's whole state dict. The seeded modules and position tables are left to the
framework's own initialisation (Automodel's ``initialize_bagel_non_backbone_weights``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..checkpoint import ReadJob, fill
from ..compose import plan_composition
from ..config import BagelConfig
from ..distributed.load import fill_converted
from ..errors import MissingKeysError, ShapeMismatchError, agree, counted, format_examples
from ..keys import ROOT

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneLoad:
    """What :func:`load_backbones_into` did."""

    read: int
    """Backbone tensors read into the model."""
    ones: int
    """QK-norm tensors set to one (twins included)."""
    twins: int
    """``*_moe_gen`` tensors copied from their UND tensor."""
    bytes_read: int
    """Bytes of backbone data read (on this rank; a sharded parameter's rows only)."""


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A ``DTensor``'s local shard, or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


def _is_sharded(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "placements")


def load_backbones_into(
    destinations: Mapping[str, torch.Tensor],
    llm: str | os.PathLike[str],
    vit: str | os.PathLike[str],
    config: BagelConfig,
    *,
    copy_twins: bool = True,
) -> BackboneLoad:
    """Fill a BAGEL state dict (native ``model.`` keys, e.g. ``model.state_dict()``) in place
    from a Qwen2 and a SigLIP folder.

    Every backbone key is routed and every shape checked against ``config`` and against the
    destinations before any byte is read (the errors of
    :func:`~bagelverify.compose_checkpoint`; :class:`~bagelverify.errors.MissingKeysError` for
    UND tensors the destinations lack, :class:`~bagelverify.errors.ShapeMismatchError` for
    destinations of another shape). Then the backbone tensors are read in (cast to each
    destination's dtype), the QK norms set to one, and with ``copy_twins`` every GEN twin the
    destinations hold copied from its UND tensor. Destinations of no backbone tensor, norm or
    twin (the connector, time embedder, position tables) are left as they are.
    """
    with plan_composition(llm, vit, config) as plan:
        native = {key: ROOT + key for key in plan.origins}
        gen_twins = {key for key, origin in plan.origins.items() if origin.kind == "twin"}
        absent = [
            native[key]
            for key in plan.origins
            if native[key] not in destinations and key not in gen_twins
        ]
        if absent:
            raise MissingKeysError(
                f"the model lacks {counted(len(absent), 'tensor')} the backbones fill: "
                f"{format_examples(absent)}; is it a BAGEL model with a vision tower?",
                absent,
            )
        wrong = [
            f"{native[key]}: model {list(destinations[native[key]].shape)}, backbone "
            f"{list(plan.shapes[key])}"
            for key in plan.origins
            if native[key] in destinations
            and tuple(destinations[native[key]].shape) != plan.shapes[key]
        ]
        if wrong:
            raise ShapeMismatchError(
                f"{counted(len(wrong), 'model tensor')} {agree(len(wrong), 'does', 'do')} not "
                f"have the backbones' shape: {format_examples(wrong, show=str)}. Nothing was "
                "read; build the model from the backbones' config."
            )
        direct: dict[str, ReadJob] = {}
        sharded: dict[str, ReadJob] = {}
        converted: dict[str, ReadJob] = {}
        for key in plan.origins:
            job = plan.job(key)
            if job is None:
                continue
            target = destinations[native[key]]
            group = converted if job.convert else sharded if _is_sharded(target) else direct
            group[native[key]] = job
        bytes_read = fill(direct, destinations).bytes_read if direct else 0
        if sharded:
            bytes_read += _fill_sharded(sharded, destinations)
        with torch.no_grad():
            fill_converted(converted, destinations)  # small: read whole, each rank its shard
            bytes_read += sum(job.info.nbytes for job in converted.values())
            ones = twins = 0
            for key, origin in plan.origins.items():
                if native[key] not in destinations:
                    continue
                target = destinations[native[key]]
                source = plan.source_of(key)
                if plan.origins[source].kind == "ones":
                    _local(target).fill_(1)
                    ones += 1
                elif origin.kind == "twin" and copy_twins and plan.job(source) is not None:
                    _local(target).copy_(_local(destinations[native[source]]))
                    twins += 1
    done = BackboneLoad(len(direct) + len(sharded) + len(converted), ones, twins, bytes_read)
    logger.info("backbones %s + %s: %s", llm, vit, done)
    return done


def _fill_sharded(jobs: Mapping[str, ReadJob], destinations: Mapping[str, torch.Tensor]) -> int:
    """Fill ``DTensor`` destinations through DCP: each rank reads the rows of its shard."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    from ..distributed.reader import BagelHFStorageReader

    reader = BagelHFStorageReader(
        {key: job.info for key, job in jobs.items()},
        fds={job.info.path: job.fd for job in jobs.values() if job.fd is not None},
    )
    dcp_load(
        {key: destinations[key] for key in jobs},
        storage_reader=reader,
        planner=DefaultLoadPlanner(allow_partial_load=True),
    )
    return reader.bytes_read
