"""The benchmark command runs end to end, and its synthetic key sets are what they claim to be."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bagelverify import Bucket
from bagelverify.commands.bench import (
    METHOD_NAMES,
    NEAR_MISS_EVERY,
    AlternationMatcher,
    KeySet,
    moe_patterns,
    plot,
    run_set,
    scaled_keys,
)
from bagelverify.matcher import NaiveMatcher, shipped_patterns


def test_bench_quick_json_runs_and_reports_every_method_on_every_set() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bagelverify", "bench", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(done.stdout)
    assert [s["name"] for s in report["sets"]] == ["manifest", "scaled-2k"]
    for key_set in report["sets"]:
        assert tuple(key_set["methods"]) == METHOD_NAMES
        for result in key_set["methods"].values():
            assert result["median_ns"] > 0 and result["build_ms"] >= 0
        assert key_set["methods"]["naive"]["vs_naive"] == 1.0
    assert report["sets"][0]["keys"] == 1467 and report["sets"][0]["unknown"] == 0
    assert [t["name"] for t in report["targets"]] == ["compiled vs naive, manifest"]


def test_scaled_keys_are_unique_experts_included_and_about_one_percent_near_misses() -> None:
    keys = scaled_keys(20_000, experts=8)
    assert len(keys) == len(set(keys))
    buckets = dict(zip(keys, map(NaiveMatcher(moe_patterns()).classify, keys), strict=True))
    counts = Counter(buckets.values())
    assert set(counts) == set(Bucket)
    valid_model_keys = counts[Bucket.UND] + counts[Bucket.GEN]
    assert counts[Bucket.UNKNOWN] == valid_model_keys // NEAR_MISS_EVERY
    experts = [k for k in keys if ".experts." in k and buckets[k] is not Bucket.UNKNOWN]
    assert {buckets[k] for k in experts} == {Bucket.UND, Bucket.GEN}
    shipped = NaiveMatcher(shipped_patterns())
    assert {shipped.classify(k) for k in experts} == {Bucket.UNKNOWN}  # only the MoE patterns


def test_alternation_baseline_agrees_with_naive_on_real_and_scaled_keys() -> None:
    patterns = moe_patterns()
    naive, alternation = NaiveMatcher(patterns), AlternationMatcher(patterns)
    for key in scaled_keys(3_000, experts=2):
        assert alternation.classify(key) is naive.classify(key), key


def test_plot_without_matplotlib_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'bagelverify\[bench\]'"):
        plot([], str(tmp_path / "chart.png"))


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = run_set(KeySet("tiny", ["connector.fc1.weight", "x"], shipped_patterns()), 1, 10)
    path = tmp_path / "chart.png"
    plot([result], str(path))
    assert path.read_bytes().startswith(b"\x89PNG")


def test_expert_patterns_extend_exactly_the_language_models_mlp_families() -> None:
    """Invariant: the MoE pattern set is the shipped one plus one expert-level pattern per LLM MLP
    family (UND and GEN twin), derived from the family table; the ViT MLP gets no experts."""
    shipped, moe = shipped_patterns(), moe_patterns()
    added = {bucket: moe[bucket][len(shipped[bucket]) :] for bucket in moe}
    assert all(moe[bucket][: len(shipped[bucket])] == shipped[bucket] for bucket in moe)
    assert {bucket: len(patterns) for bucket, patterns in added.items() if patterns} == {
        Bucket.UND: 3,
        Bucket.GEN: 3,
    }
    experts = NaiveMatcher(added)
    layer = "language_model.model.layers.7"
    assert experts.classify(f"{layer}.mlp.experts.12.down_proj.weight") is Bucket.UND
    assert experts.classify(f"{layer}.mlp_moe_gen.experts.0.gate_proj.weight") is Bucket.GEN
    assert experts.classify(f"{layer}.mlp.experts.x.up_proj.weight") is Bucket.UNKNOWN
    vit = "vit_model.vision_model.encoder.layers.0.mlp.experts.0.fc1.weight"
    assert experts.classify(vit) is Bucket.UNKNOWN
