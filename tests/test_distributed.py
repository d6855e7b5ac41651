"""Distributed loading through torch.distributed.checkpoint: DTensors through the adapter, real
2-rank gloo runs on CPU (spawned processes, hard deadline), DCP conversion round trips."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import _dist_workers as workers
import pytest
import torch
import torch.distributed as dist
from _multiprocess import run_ranks
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

import bagelverify as bv
from bagelverify import strategies as bst
from bagelverify.buckets import Bucket
from bagelverify.stage import STAGE_BUCKETS

ADAPTER = bv.BagelStateDictAdapter()


@pytest.fixture(scope="module")
def mesh() -> Iterator[DeviceMesh]:
    """A one-rank gloo mesh in this process, torn down after the module."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def dtensors(sd: dict[str, Any], mesh: DeviceMesh) -> dict[str, DTensor]:
    """One distinct DTensor per key, alternately row-sharded and replicated."""
    placements = ([Shard(0)], [Replicate()])
    return {
        key: DTensor.from_local(torch.zeros(2, 3), mesh, placements[i % 2])
        for i, key in enumerate(sd)
    }


@settings(deadline=None)  # DTensor construction is slow on a cold start
@given(sd=bst.state_dicts(bst.any_keys(), max_size=30), stage=bst.stages)
def test_from_hf_keeps_every_retained_dtensor_as_the_same_object(
    mesh: DeviceMesh, sd: dict[str, Any], stage: object
) -> None:
    hf = dtensors(sd, mesh)
    native = ADAPTER.from_hf(hf, device_mesh=mesh, stage=stage, strict=False)
    kept = STAGE_BUCKETS[bv.normalize_stage(stage)]
    expected = [k for k in hf if bv.classify(k) in kept]
    assert list(native) == ["model." + k for k in expected]
    assert all(native["model." + k] is hf[k] for k in expected)


@settings(deadline=None)
@given(sd=bst.state_dicts(bst.keys((Bucket.UND, Bucket.GEN)), max_size=30), data=st.data())
def test_to_hf_then_from_hf_returns_the_same_dtensor_objects(
    mesh: DeviceMesh, sd: dict[str, Any], data: st.DataObject
) -> None:
    native = {"model." + k: v for k, v in dtensors(sd, mesh).items()}
    subset = data.draw(
        st.lists(st.sampled_from(sorted(native)), unique=True) if native else st.just([])
    )
    chosen = {k: native[k] for k in subset}
    hf = ADAPTER.to_hf(chosen)
    assert all(hf[k.removeprefix("model.")] is v for k, v in chosen.items())
    back = ADAPTER.from_hf(hf, device_mesh=mesh, stage=2, strict=False)
    assert back.keys() == chosen.keys()
    assert all(back[k] is v for k, v in chosen.items())


def test_adapter_keeps_sharded_dtensors_on_two_ranks() -> None:
    """On a real 2-rank mesh, from_hf and to_hf hand back each sharded DTensor unchanged."""
    results = run_ranks(workers.adapter_keeps_dtensors)
    assert [r["local_rows"] for r in results] == [3, 2]  # 5 rows split 3 + 2: really sharded
    assert all(r["same_native"] and r["same_back"] for r in results)
