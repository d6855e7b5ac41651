"""Functions run on every rank by tests/test_distributed.py (importable by spawned processes)."""

from __future__ import annotations

import functools
from typing import Any


def adapter_keeps_dtensors(rank: int, world_size: int) -> dict[str, Any]:
    """from_hf/to_hf on row-sharded DTensors of a real 2-rank mesh return the same objects."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import bagelverify as bv

    mesh = init_device_mesh("cpu", (world_size,))
    hf = {
        "language_model.model.norm.weight": distribute_tensor(torch.ones(5), mesh, [Shard(0)]),
        "language_model.model.layers.0.self_attn.q_proj.weight": distribute_tensor(
            torch.ones(4, 3), mesh, [Shard(0)]
        ),
        "language_model.model.layers.0.self_attn.q_proj_moe_gen.weight": distribute_tensor(
            torch.ones(4, 3), mesh, [Replicate()]
        ),
    }
    adapter = bv.BagelStateDictAdapter()
    native = adapter.from_hf(hf, device_mesh=mesh, stage=2)
    back = adapter.to_hf(native)
    return {
        "same_native": all(native["model." + k] is v for k, v in hf.items()),
        "same_back": all(back[k] is v for k, v in hf.items()),
        "local_rows": native["model.language_model.model.norm.weight"].to_local().shape[0],
    }


def fail_on_rank_one(rank: int, world_size: int) -> None:
    """Rank 1 raises; rank 0 waits in a collective that can never complete."""
    import torch.distributed as dist

    if rank == 1:
        raise RuntimeError("rank one broke")
    dist.barrier()


def shard_like(reference: dict[str, Any], mesh: Any, dtype: Any = None) -> dict[str, Any]:
    """NaN-filled DTensors shaped like ``reference``, placements cycling through row-sharded
    (FSDP2), column-sharded (tensor parallel) and replicated."""
    import torch
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out = {}
    for i, (key, value) in enumerate(reference.items()):
        kind = i % 3
        placement = Shard(0) if kind == 0 or value.ndim < 2 else Shard(1)
        placement = Replicate() if kind == 2 else placement
        blank = torch.full(value.shape, float("nan"), dtype=dtype or value.dtype)
        out[key] = distribute_tensor(blank, mesh, [placement], src_data_rank=None)
    return out


def expected_local(full: Any, dtensor: Any, rank: int, world_size: int) -> Any:
    """The slice of ``full`` that ``rank`` holds under ``dtensor``'s placement (torch.chunk
    semantics, as FSDP2 shards), computed without DTensor."""
    import torch
    from torch.distributed.tensor import Shard

    placement = dtensor.placements[0]
    if not isinstance(placement, Shard):
        return full
    chunks = torch.chunk(full, world_size, dim=placement.dim)
    if rank < len(chunks):
        return chunks[rank]
    return full.narrow(placement.dim, 0, 0)


def _error(call: Any) -> tuple[str, str] | None:
    try:
        call()
    except Exception as error:
        return type(error).__name__, str(error)
    return None


def load_scenarios(rank: int, world_size: int, folders: dict[str, str]) -> dict[str, Any]:
    """Every distributed-load scenario of the test module, in one 2-rank session."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    from bagelverify.checkpoint import load_bagel_checkpoint_state_dict
    from bagelverify.distributed import load_bagel_checkpoint_distributed

    mesh = init_device_mesh("cpu", (world_size,))
    ckpt = folders["checkpoint"]
    out: dict[str, Any] = {"adapter": adapter_keeps_dtensors(rank, world_size)}
    for stage, dtype in (("stage1", None), ("stage2", None), ("stage2", torch.float32)):
        reference = load_bagel_checkpoint_state_dict(ckpt, stage=stage)
        sharded = shard_like(reference, mesh, dtype)
        result = load_bagel_checkpoint_distributed(sharded, ckpt, stage=stage)
        wrong = [
            key
            for key, full in reference.items()
            if not torch.equal(
                sharded[key].to_local(),
                expected_local(full.to(dtype or full.dtype), sharded[key], rank, world_size),
            )
        ]
        out[f"{stage}-{dtype}"] = {
            "keys": len(reference),
            "wrong": wrong,
            "result": tuple(result),
            "local_bytes": sum(
                t.to_local().numel() * t.to_local().element_size() for t in sharded.values()
            ),
        }

    reference = load_bagel_checkpoint_state_dict(ckpt, stage="stage1")
    out["ranges"] = file_ranges(rank, world_size, ckpt, mesh)
    # the checkpoint lacks a key the model has: every rank must raise the same error
    out["missing"] = _error(
        lambda: load_bagel_checkpoint_distributed(
            shard_like(reference, mesh), folders["missing"], stage="stage1"
        )
    )
    # only rank 1's model disagrees with the file: rank 0 must not wait in DCP, and raises too
    target = shard_like(reference, mesh)
    if rank == 1:
        key = next(k for k, v in reference.items() if v.ndim == 2)
        target[key] = torch.zeros(reference[key].shape[0] + 1, reference[key].shape[1])
    out["one_rank_wrong"] = _error(
        lambda: load_bagel_checkpoint_distributed(target, ckpt, stage="stage1")
    )
    # the ranks pass different key sets (no rank's own checks fail): refused on every rank
    target = shard_like(reference, mesh)
    if rank == 1:
        target.pop(next(iter(target)))
    out["keys_differ"] = _error(
        lambda: load_bagel_checkpoint_distributed(target, ckpt, stage="stage1", strict=False)
    )
    # rank 1 reads another folder of the same shapes (its own checks pass): refused on both
    out["folder_differs"] = _error(
        lambda: load_bagel_checkpoint_distributed(
            shard_like(reference, mesh), folders["twin" if rank else "checkpoint"], stage=1
        )
    )
    # the ranks pass other arguments for one model: refused on every rank, before any read
    full = load_bagel_checkpoint_state_dict(ckpt, stage="stage2")
    for name, options in (
        ("stage_differs", {"stage": 1 + rank, "strict": False}),
        (
            "strict_cast_differ",
            {"stage": 2, "strict": rank == 0, "cast": ("lossless", "any")[rank]},
        ),
    ):
        target = shard_like(full, mesh)
        load = functools.partial(load_bagel_checkpoint_distributed, target, ckpt, **options)
        out[name] = _error(load)
        out[name + "_untouched"] = all(bool(v.to_local().isnan().all()) for v in target.values())
    # a sharded folder (index + shards) and a Conv2d patch embedding converted while loading
    for name, options in (("sharded", {}), ("conv", {"convert_conv_patch_embedding": True})):
        full = load_bagel_checkpoint_state_dict(folders[name], stage="stage2", **options)
        target = shard_like(full, mesh)
        load_bagel_checkpoint_distributed(target, folders[name], stage="stage2", **options)
        out[name + "_wrong"] = [
            key
            for key, value in full.items()
            if not torch.equal(
                target[key].to_local(), expected_local(value, target[key], rank, world_size)
            )
        ]
    # after the errors the ranks are still in step: a DCP checkpoint resumes sharded
    resumed = shard_like(load_bagel_checkpoint_state_dict(ckpt, stage="stage2"), mesh)
    dcp.load(resumed, checkpoint_id=folders["dcp"])
    full2 = load_bagel_checkpoint_state_dict(ckpt, stage="stage2")
    out["dcp_resume_wrong"] = [
        key
        for key, full in full2.items()
        if not torch.equal(
            resumed[key].to_local(), expected_local(full, resumed[key], rank, world_size)
        )
    ]
    return out


def file_ranges(rank: int, world_size: int, ckpt: str, mesh: Any) -> dict[str, Any]:
    """Record every byte range the loader reads from the file during a stage-1 load and compare
    it with the ranges of this rank's rows, computed from the header alone."""
    import bagelverify.distributed as distributed
    from bagelverify.checkpoint import inspect_checkpoint, load_bagel_checkpoint_state_dict
    from bagelverify.distributed import reader

    report = inspect_checkpoint(ckpt, stage="stage1")
    reference = load_bagel_checkpoint_state_dict(ckpt, stage="stage1")
    sharded = shard_like(reference, mesh)
    calls: list[tuple[int, int]] = []
    original = reader.run_engine

    def recording(transfers: Any, **kwargs: Any) -> Any:
        # the engine reads exactly its transfers' bytes (tests/test_engine.py)
        calls.extend((t.offset, t.nbytes) for t in transfers)
        return original(transfers, **kwargs)

    reader.run_engine = recording  # type: ignore[assignment]
    try:
        distributed.load_bagel_checkpoint_distributed(sharded, ckpt, stage="stage1")
    finally:
        reader.run_engine = original  # type: ignore[assignment]
    expected: list[tuple[int, int]] = []
    column_sharded_bytes = 0
    for native, info in report.retained.items():
        placement = sharded[native].placements[0]
        local = sharded[native].to_local()
        if placement.is_shard(0):
            rows = info.shape[0]
            per = -(-rows // world_size)  # torch.chunk: ceil-sized chunks, the last ones empty
            first, count = min(rank * per, rows), max(0, min(per, rows - rank * per))
            row_bytes = info.nbytes // rows
            if count:
                expected.append((info.start + first * row_bytes, count * row_bytes))
        elif placement.is_replicate():
            expected.append((info.start, info.nbytes))
        else:
            column_sharded_bytes += local.numel() * local.element_size()
    outside = [c for c in calls if c not in expected]
    return {
        "missing": sorted(set(expected) - set(calls)),
        "unexpected": outside,
        "unexpected_bytes": sum(n for _, n in outside),
        "column_sharded_bytes": column_sharded_bytes,
        "repeated": len(calls) - len(set(calls)),
    }


def automodel_fsdp_load(rank: int, world_size: int, folders: dict[str, str]) -> dict[str, Any]:
    """Automodel's checkpointer, after install(), loading a BAGEL base checkpoint into its model
    sharded by FSDP2 (``fully_shard``: ``Shard(0)`` DTensor parameters) on every rank."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from bagelverify.checkpoint import load_bagel_checkpoint_state_dict
    from bagelverify.config import BagelConfig
    from bagelverify.distributed import reader
    from bagelverify.errors import ReadError
    from bagelverify.integrations import automodel

    automodel.install()
    from nemo_automodel.components.checkpoint import checkpointing
    from nemo_automodel.components.models.bagel.model import BagelForUnifiedMultimodal

    config = BagelConfig.from_pretrained(folders["checkpoint"])
    mesh = init_device_mesh("cpu", (world_size,))
    out: dict[str, Any] = {}
    read: list[int] = []
    original = reader.run_engine

    def recording(transfers: Any, **kwargs: Any) -> Any:
        if name == "cut":  # a read that fails inside Automodel's dcp.load (a file cut short)
            raise ReadError(f"{transfers[0].path}: cut short (injected)")
        read.extend(t.nbytes for t in transfers)
        return original(transfers, **kwargs)

    reader.run_engine = recording  # type: ignore[assignment]
    for name in ("checkpoint", "unknown", "cut"):
        with torch.device("meta"):
            model = BagelForUnifiedMultimodal(automodel.automodel_config(config, stage=2))
        fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for value in model.state_dict().values():
                (value.to_local() if isinstance(value, DTensor) else value).fill_(-7.0)
        ck = checkpointing.Checkpointer(
            checkpointing.CheckpointingConfig(
                checkpoint_dir=folders["scratch"], model_save_format="safetensors"
            ),
            dp_rank=rank,
            tp_rank=0,
            pp_rank=0,
        )
        read.clear()
        path = folders["checkpoint" if name == "cut" else name]
        error = _error(functools.partial(ck.load_model, model, path, is_init_step=True))
        state = model.state_dict()
        local = {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state.items()}
        if error is not None:
            untouched = all(bool(v.eq(-7.0).all()) for v in local.values())
            out[name] = {"error": error, "untouched": untouched, "read": sum(read)}
            continue
        full = load_bagel_checkpoint_state_dict(folders[name], stage=2)
        out[name] = {
            "keys": len(state),
            "row_sharded": sum(
                isinstance(v, DTensor) and v.placements[0].is_shard(0) for v in state.values()
            ),
            "wrong": [
                k
                for k, v in state.items()
                if not torch.equal(local[k], expected_local(full[k], v, rank, world_size))
            ],
            "read": sum(read),
            "share": sum(v.numel() * v.element_size() for v in local.values()),
        }
    reader.run_engine = original  # type: ignore[assignment]
    return out


# -- Automodel training runs, saved as its recipe saves them (tests/test_export.py) ------------


def seeded_automodel(config: Any, seed: int, *, stage: int = 2, freeze_und: bool = False) -> Any:
    """Automodel's BAGEL model (F32, CPU) with every parameter drawn from ``seed`` by its
    position, so any process builds the same values; with ``freeze_und`` the UND parameters
    are frozen (``requires_grad=False``) and the config says ``freeze_und``."""
    import torch

    from bagelverify.buckets import Bucket
    from bagelverify.integrations import automodel
    from bagelverify.keys import strip_root
    from bagelverify.partition import classify

    automodel.install()
    from nemo_automodel.components.models.bagel.model import BagelForUnifiedMultimodal

    am_config = automodel.automodel_config(config, stage=stage)
    am_config.text_config.freeze_und = freeze_und
    with torch.device("meta"):
        model = BagelForUnifiedMultimodal(am_config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for index, (name, parameter) in enumerate(model.named_parameters()):
            parameter.normal_(generator=torch.Generator().manual_seed(seed * 100_003 + index))
            if freeze_und and classify(strip_root(name)) is Bucket.UND:
                parameter.requires_grad_(False)
    return model


def train_step(model: Any, ema: Any) -> None:
    """One stand-in optimizer step (every trainable parameter + 1) and the EMA update after it."""
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(1.0)
    ema.update(model)


def automodel_training_saves(
    rank: int, world_size: int, runs: list[tuple[str, dict[str, Any]]]
) -> list[int]:
    """:func:`automodel_training_save` for each ``(step, options)``; the EMAs' sizes."""
    return [automodel_training_save(rank, world_size, step, options) for step, options in runs]


def automodel_training_save(rank: int, world_size: int, step: str, options: dict[str, Any]) -> int:
    """A tiny Automodel BAGEL run saved as its recipe saves a step folder: the model by
    ``Checkpointer.save_model`` (``options["format"]``: ``torch_save`` is DCP, ``safetensors``
    Automodel's own shards), the ``EMAManager`` by ``save_distributed_state``; on 2 ranks the
    model is sharded by ``fully_shard`` (``Shard(0)`` DTensor parameters) first. Returns how
    many tensors the EMA tracks."""
    from nemo_automodel.components.checkpoint import checkpointing
    from nemo_automodel.components.training.ema import EMAManager

    model = seeded_automodel(
        options["config"],
        options["seed"],
        stage=options.get("stage", 2),
        freeze_und=options.get("freeze_und", False),
    )
    dtype = options.get("dtype")
    if dtype is not None:
        model.to(dtype)
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    ema = EMAManager(model, decay=0.75)
    train_step(model, ema)
    ck = checkpointing.Checkpointer(
        checkpointing.CheckpointingConfig(
            checkpoint_dir=str(step) + "-checkpoints", model_save_format=options["format"]
        ),
        dp_rank=rank,
        tp_rank=0,
        pp_rank=0,
    )
    ck.save_model(model, step)
    ck.save_distributed_state(ema, "ema", step)
    return len(ema)


def full_size_step_folder(
    step: str, config: Any, *, ranks: int = 2, freeze_und: bool = True
) -> None:
    """The metadata of a full-size Automodel step folder written by ``ranks`` ranks (``model/``
    F32 with HF keys, ``ema/`` F32 with the trainable tensors' ``model.`` names) and sparse data
    files of the right sizes: enough for a dry run, which reads no tensor data."""
    import math
    import os
    import pickle
    from pathlib import Path

    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    from bagelverify.buckets import Bucket
    from bagelverify.families import expected_shapes
    from bagelverify.partition import classify

    frozen = {"vit_pos_embed.pos_embed", "latent_pos_embed.pos_embed"}
    shapes = expected_shapes(config)
    for folder, names in (
        ("model", {key: key for key in shapes}),
        (
            "ema",
            {
                "model." + key: key
                for key in shapes
                if key not in frozen and not (freeze_und and classify(key) is Bucket.UND)
            },
        ),
    ):
        state, storage, ends = {}, {}, [0] * ranks
        for name, key in names.items():
            shape = shapes[key]
            per = -(-shape[0] // ranks)
            chunks = []
            for rank in range(ranks):
                first, count = rank * per, min(per, shape[0] - rank * per)
                if count <= 0:
                    continue
                offsets = torch.Size([first, *([0] * (len(shape) - 1))])
                sizes = torch.Size([count, *shape[1:]])
                chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=sizes))
                length = math.prod(sizes) * 4 + 1024  # torch.save's zip records around the data
                storage[MetadataIndex(name, offsets)] = _StorageInfo(
                    f"__{rank}_0.distcp", ends[rank], length
                )
                ends[rank] += length
            state[name] = TensorStorageMetadata(
                TensorProperties(dtype=torch.float32), torch.Size(shape), chunks
            )
        target = Path(step) / folder
        target.mkdir(parents=True)
        with open(target / ".metadata", "wb") as handle:
            pickle.dump(Metadata(state_dict_metadata=state, storage_data=storage), handle)
        for rank, end in enumerate(ends):
            with open(target / f"__{rank}_0.distcp", "wb") as handle:
                os.truncate(handle.fileno(), end)


def backbones_into_shards(rank: int, world_size: int, llm: str, vit: str, out: str) -> Any:
    """Row-sharded NaN destinations filled from backbone folders (load_backbones_into): the
    keys whose full tensors differ from the composed file's, and this rank's bytes read."""
    import safetensors.torch
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import bagelverify as bv
    from bagelverify.compose import read_origins
    from bagelverify.families import expected_shapes
    from bagelverify.integrations.backbone_loader import load_backbones_into
    from bagelverify.safetensors_io import read_header

    mesh = init_device_mesh("cpu", (world_size,))
    config = bv.BagelConfig.from_pretrained(out)
    destinations = {
        "model." + key: distribute_tensor(torch.full(shape, float("nan")), mesh, [Shard(0)])
        for key, shape in expected_shapes(config).items()
    }
    done = load_backbones_into(destinations, llm, vit, config)
    composed = safetensors.torch.load_file(f"{out}/ema.safetensors")
    origins = read_origins(read_header(f"{out}/ema.safetensors").metadata)
    filled = [k for k, o in origins.items() if o.split(":")[0] in ("llm", "vit", "twin", "ones")]
    differ = [
        key
        for key in filled
        if not torch.equal(destinations["model." + key].full_tensor(), composed[key])
    ]
    untouched = [
        key
        for key in origins
        if key not in filled and not destinations["model." + key].to_local().isnan().all()
    ]
    return {"differ": differ, "untouched_changed": untouched, "bytes_read": done.bytes_read}
