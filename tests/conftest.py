"""Shared fixtures and the Hypothesis profiles: dev (default), ci (when CI is set), stress,
mutation (mutmut runs)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

from bagelverify.manifest import MODEL_FILE
from bagelverify.safetensors_io import save_tensors
from bagelverify.synthetic import SyntheticCheckpoint, make_synthetic_checkpoint

# No deadlines anywhere: this is a shared 2-core machine and timing is the benchmarks' job.
settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile(
    "ci",
    max_examples=200,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "stress",
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# Mutation runs (MUTATION.md): few, fixed examples, so each mutant sees the same inputs; no
# shrinking (a failing example is enough to kill a mutant, and shrinking slow tests took minutes).
settings.register_profile(
    "mutation",
    max_examples=25,
    derandomize=True,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
default_profile = "ci" if os.environ.get("CI") else "dev"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or default_profile)


@pytest.fixture(scope="session")
def synthetic_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCheckpoint:
    """A small BAGEL-shaped folder (scale 64, seed 0), written once per run; do not modify it."""
    return make_synthetic_checkpoint(tmp_path_factory.mktemp("synthetic"), scale=64, seed=0)


def edited_copy(
    source: SyntheticCheckpoint,
    folder: Path,
    *,
    drop: Iterable[str] = (),
    add: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """``folder`` made a copy of ``source``'s config files and model file, without the keys
    ``drop`` and with the tensors ``add``."""
    from safetensors.torch import load_file

    folder.mkdir(parents=True, exist_ok=True)
    for config in source.path.glob("*config.json"):
        shutil.copy(config, folder)
    tensors = load_file(source.path / MODEL_FILE)
    for key in drop:
        del tensors[key]
    save_tensors(folder / MODEL_FILE, {**tensors, **(add or {})})
    return folder
