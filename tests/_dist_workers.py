"""Functions run on every rank by tests/test_distributed.py (importable by spawned processes)."""

from __future__ import annotations

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
