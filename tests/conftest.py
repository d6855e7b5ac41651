"""Shared fixtures and the Hypothesis profiles: dev (default), ci (when CI is set), stress,
mutation (mutmut runs)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, settings

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
