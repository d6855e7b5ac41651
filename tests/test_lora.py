"""LoRA adapters: ``check_adapter`` (binds per family, UND/GEN twins, shapes) and
``merge_adapter`` (W + s*B@A in F32, rounded once), and the ``bagelverify lora`` command."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bagelverify as bv
from bagelverify.cli import main
from bagelverify.diff import diff_checkpoints
from bagelverify.errors import LoraError
from bagelverify.families import expected_shapes
from bagelverify.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    check_adapter,
    merge_adapter,
    read_settings,
)
from bagelverify.lora_keys import PEFT_ROOT, lora_families
from bagelverify.synthetic import SyntheticCheckpoint

LLM_LAYERS = bv.BagelConfig().num_hidden_layers


def module_names(config: bv.BagelConfig) -> list[str]:
    """Every LoRA-able HF module path of a model with ``config``."""
    return [
        key.removesuffix(".weight")
        for family in lora_families()
        for key in family.keys(config)
        if key.endswith(".weight")
    ]


def binds(target: str, module: str) -> bool:
    return module == target or module.endswith("." + target)


def write_adapter(
    folder: Path,
    config: bv.BagelConfig,
    targets: list[str],
    *,
    r: int = 4,
    alpha: float = 8,
    rslora: bool = False,
    zero_b: bool = False,
    seed: int = 0,
    root: str = PEFT_ROOT,
    settings: dict[str, Any] | None = None,
) -> Path:
    """A PEFT adapter folder (Hugging Face ``peft``'s layout) for the modules ``targets`` bind,
    with random F32 factors; ``settings`` overrides fields of its adapter_config.json."""
    generator = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(config)
    tensors = {}
    for module in module_names(config):
        if not any(binds(t, module) for t in targets):
            continue
        out, inner = shapes[module + ".weight"]
        b = torch.zeros(out, r) if zero_b else torch.randn(out, r, generator=generator)
        tensors[f"{root}{module}.lora_A.weight"] = torch.randn(r, inner, generator=generator)
        tensors[f"{root}{module}.lora_B.weight"] = b
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    document = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora}
    document["target_modules"] = targets
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**document, **(settings or {})}))
    return folder


# -- check -------------------------------------------------------------------------------------


def test_check_counts_binds_per_family_and_warns_naming_the_gen_twins_left_out(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    config = synthetic_checkpoint.config
    adapter = write_adapter(tmp_path / "a", config, ["q_proj", "v_proj"])
    report = check_adapter(adapter, synthetic_checkpoint.path)
    assert report.ok, report.errors
    assert report.total.summary() == [
        f"q_proj: {LLM_LAYERS} UND, 0 GEN twins",
        f"v_proj: {LLM_LAYERS} UND, 0 GEN twins",
        f"vit.q_proj: {config.vit_layers_used} UND",
        f"vit.v_proj: {config.vit_layers_used} UND",
    ]
    [warning] = report.warnings
    assert f"{2 * LLM_LAYERS} UND modules" in warning
    assert "language_model.model.layers.0.self_attn.q_proj_moe_gen" in warning


def test_twins_adapted_together_give_no_warning(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    targets = ["q_proj", "q_proj_moe_gen"]
    adapter = write_adapter(tmp_path / "a", synthetic_checkpoint.config, targets)
    report = check_adapter(adapter, synthetic_checkpoint.path)
    assert (report.errors, report.warnings) == ([], [])
    assert f"q_proj: {LLM_LAYERS} UND, {LLM_LAYERS} GEN twins" in report.total.summary()


def test_a_gen_only_adapter_warns_naming_the_und_modules_left_out(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    # the MLP's GEN twin is mlp_moe_gen.up_proj: "up_proj" binds both, "up_proj_moe_gen" neither
    config = synthetic_checkpoint.config
    both = check_adapter(write_adapter(tmp_path / "b", config, ["up_proj"]))
    assert both.total.summary() == [f"up_proj: {LLM_LAYERS} UND, {LLM_LAYERS} GEN twins"]
    assert both.warnings == []
    adapter = write_adapter(tmp_path / "a", config, ["mlp_moe_gen.up_proj"])
    report = check_adapter(adapter)
    assert report.total.summary() == [f"up_proj: 0 UND twins, {LLM_LAYERS} GEN"]
    [warning] = report.warnings
    assert "GEN twin" in warning and "language_model.model.layers.0.mlp.up_proj" in warning


@given(typo=st.sampled_from(["q_porj", "self_attn.qproj", "up_proj_moe_gen", "lm_head_moe_gen"]))
@settings(max_examples=4, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_target_that_binds_nothing_is_an_error_naming_it(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path_factory: pytest.TempPathFactory, typo: str
) -> None:
    """Invariant: any target_modules entry binding no BAGEL module fails the check, by name."""
    folder = tmp_path_factory.mktemp("typo")
    adapter = write_adapter(folder, synthetic_checkpoint.config, ["q_proj", typo])
    report = check_adapter(adapter)
    assert not report.ok
    assert any(repr(typo) in error and "binds no BAGEL module" in error for error in report.errors)


def test_factors_that_do_not_fit_the_base_are_errors(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    bigger = bv.BagelConfig()  # full-size shapes against the scaled base
    adapter = write_adapter(tmp_path / "a", synthetic_checkpoint.config, ["o_proj"])
    wrong = {
        k: torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v
        for k, v in safetensors.torch.load_file(str(adapter / ADAPTER_WEIGHTS)).items()
    }
    safetensors.torch.save_file(wrong, str(adapter / ADAPTER_WEIGHTS))
    report = check_adapter(adapter, synthetic_checkpoint.path)
    assert any("o_proj.lora_A.weight" in e and "expected" in e for e in report.errors)
    assert any("does not have the shape of B@A" in e or "do not" in e for e in report.errors)
    assert bigger.hidden_size != synthetic_checkpoint.config.hidden_size


@pytest.mark.parametrize(
    ("edit", "error", "named"),
    [
        ({"r": 0}, bv.LoraError, "r is 0"),
        ({"r": 3}, bv.LoraError, "r=3"),
        ({"use_dora": True}, bv.LoraError, "DoRA"),
        ({"rank_pattern": {"q_proj": 8}}, bv.LoraError, "rank_pattern"),
        ({"lora_alpha": "8"}, bv.LoraError, "'lora_alpha' must be"),
    ],
)
def test_a_bad_adapter_config_is_refused_naming_the_field(
    synthetic_checkpoint: SyntheticCheckpoint,
    tmp_path: Path,
    edit: dict[str, Any],
    error: type,
    named: str,
) -> None:
    adapter = write_adapter(tmp_path / "a", synthetic_checkpoint.config, ["q_proj"], settings=edit)
    with pytest.raises(error, match=named):
        check_adapter(adapter)


def test_foreign_keys_and_unpaired_factors_are_refused(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    adapter = write_adapter(tmp_path / "a", synthetic_checkpoint.config, ["connector.fc1"])
    tensors = safetensors.torch.load_file(str(adapter / ADAPTER_WEIGHTS))
    foreign = {**tensors, PEFT_ROOT + "model.layers.0.attn.q.lora_A.weight": torch.zeros(4, 4)}
    safetensors.torch.save_file(foreign, str(adapter / ADAPTER_WEIGHTS))
    with pytest.raises(bv.UnknownKeysError, match=r"model\.layers\.0\.attn\.q\.lora_A"):
        check_adapter(adapter)
    alone = {k: v for k, v in tensors.items() if "lora_B" not in k}
    safetensors.torch.save_file(alone, str(adapter / ADAPTER_WEIGHTS))
    with pytest.raises(bv.MissingKeysError) as info:
        check_adapter(adapter)
    assert str(info.value) == (
        f"{adapter / ADAPTER_WEIGHTS}: 1 module lacks a factor: 'connector.fc1.weight has only "
        "lora_A'. Each adapted module needs lora_A and lora_B."
    )


# -- merge -------------------------------------------------------------------------------------


def reference_merge(base: Path, adapter: Path, scale: float) -> dict[str, torch.Tensor]:
    """The merge computed by hand from the files: W + scale * B @ A in F32, rounded once."""
    weights = safetensors.torch.load_file(str(base / "ema.safetensors"))
    factors = safetensors.torch.load_file(str(adapter / ADAPTER_WEIGHTS))
    for key, a in factors.items():
        if ".lora_A." not in key:
            continue
        b = factors[key.replace(".lora_A.", ".lora_B.")]
        weight = key.removeprefix(PEFT_ROOT).replace(".lora_A.weight", ".weight")
        w = weights[weight]
        weights[weight] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return weights


@pytest.mark.parametrize(("r", "alpha", "rslora"), [(4, 8, False), (2, 3, True)])
def test_merge_equals_the_hand_computed_merge_and_loads_strictly(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, r: int, alpha: float, rslora: bool
) -> None:
    base = synthetic_checkpoint.path
    targets = ["q_proj", "mlp_moe_gen.down_proj", "connector.fc1"]
    adapter = write_adapter(
        tmp_path / "a", synthetic_checkpoint.config, targets, r=r, alpha=alpha, rslora=rslora
    )
    plan = merge_adapter(base, adapter, tmp_path / "out")
    scale = alpha / (math.sqrt(r) if rslora else r)
    assert plan.scale == scale
    merged = safetensors.torch.load_file(str(tmp_path / "out/ema.safetensors"))
    expected = reference_merge(base, adapter, scale)
    vae = [k for k in expected if bv.classify(k) is bv.Bucket.VAE]
    assert sorted(merged) == sorted(k for k in expected if k not in vae)
    unequal = [k for k in merged if not torch.equal(merged[k], expected[k])]
    assert unequal == []
    assert all(merged[k].dtype == expected[k].dtype for k in merged)
    loaded = bv.load_bagel_checkpoint_state_dict(tmp_path / "out", stage="stage2", strict=True)
    assert len(loaded) == len(merged)


@given(
    targets=st.lists(
        st.sampled_from(
            ["q_proj", "k_proj_moe_gen", "o_proj", "gate_proj", "vit.fc1", "fc2", "llm2vae"]
        ),
        min_size=1,
        max_size=3,
        unique=True,
    ),
    zero_b=st.booleans(),
)
@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_merge_then_diff_names_exactly_the_targeted_weights_and_b_zero_is_the_identity(
    synthetic_checkpoint: SyntheticCheckpoint,
    tmp_path_factory: pytest.TempPathFactory,
    targets: list[str],
    zero_b: bool,
) -> None:
    """Invariant: diff(base, merge(base, adapter)) changes exactly the weights the adapter
    adapts (none of their biases, nothing else); with B = 0 the merge is the identity."""
    targets = [t.removeprefix("vit.") if t == "vit.fc1" else t for t in targets]
    folder = tmp_path_factory.mktemp("merge")
    config = synthetic_checkpoint.config
    adapter = write_adapter(folder / "a", config, targets, zero_b=zero_b, seed=len(targets))
    merge_adapter(synthetic_checkpoint.path, adapter, folder / "out")
    diff = diff_checkpoints(synthetic_checkpoint.path, folder / "out")
    adapted = sorted(
        m + ".weight" for m in module_names(config) if any(binds(t, m) for t in targets)
    )
    assert diff.header_changes == []
    assert sorted(diff.differing_keys) == ([] if zero_b else adapted)


def test_dry_run_writes_nothing_and_a_bad_adapter_writes_nothing(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    config = synthetic_checkpoint.config
    adapter = write_adapter(tmp_path / "a", config, ["q_proj"])
    plan = merge_adapter(synthetic_checkpoint.path, adapter, tmp_path / "out", dry_run=True)
    assert len(plan.weights) == LLM_LAYERS + config.vit_layers_used and plan.files == []
    assert not (tmp_path / "out").exists()
    typo = write_adapter(tmp_path / "b", config, ["q_proj", "qproj"])
    with pytest.raises(bv.LoraError, match="'qproj' binds no BAGEL module"):
        merge_adapter(synthetic_checkpoint.path, typo, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- the command -------------------------------------------------------------------------------


def test_cli_check_json_envelope_and_exit_codes(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_adapter(tmp_path / "a", synthetic_checkpoint.config, ["v_proj"])
    base = str(synthetic_checkpoint.path)
    assert main(["lora", "check", str(good), "--base", base, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert (document["schema_version"], document["command"], document["exit_code"]) == (
        1,
        "lora check",
        0,
    )
    assert document["binds"]["v_proj"]["summary"][0] == f"v_proj: {LLM_LAYERS} UND, 0 GEN twins"
    assert document["warnings"]
    bad = write_adapter(tmp_path / "b", synthetic_checkpoint.config, ["v_prj", "v_proj"])
    assert main(["lora", "check", str(bad)]) == 1
    assert "'v_prj' binds no BAGEL module" in capsys.readouterr().out


def test_cli_merge_writes_a_checkpoint_and_dry_run_prints_the_plan(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = write_adapter(tmp_path / "a", synthetic_checkpoint.config, ["connector.fc2"])
    base, out = str(synthetic_checkpoint.path), str(tmp_path / "out")
    assert main(["lora", "merge", base, str(adapter), "-o", out, "--dry-run"]) == 0
    assert "would merge 1 weights" in capsys.readouterr().out
    assert main(["lora", "merge", base, str(adapter), "-o", out, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["merged"] == ["connector.fc2.weight"] and document["files"]
    assert diff_checkpoints(base, out).differing_keys == ["connector.fc2.weight"]


def test_regex_targets_and_exclude_modules_bind_as_peft_does(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    config = synthetic_checkpoint.config
    regex = r".*\.layers\.[0-9]+\.self_attn\.(q_proj|q_proj_moe_gen)"
    report = check_adapter(write_adapter(tmp_path / "r", config, ["q_proj", "q_proj_moe_gen"]))
    adapter = tmp_path / "r"
    document = json.loads((adapter / ADAPTER_CONFIG).read_text())
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({**document, "target_modules": regex}))
    by_regex = check_adapter(adapter)
    assert by_regex.total.families == report.total.families
    assert by_regex.total.families["q_proj_moe_gen"] == LLM_LAYERS
    assert by_regex.total.families["vit.q_proj"] == config.vit_layers_used
    assert by_regex.ok and by_regex.warnings == []
    excluded = {**document, "exclude_modules": ["vision_model.encoder.layers.0.self_attn.q_proj"]}
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(excluded))
    assert check_adapter(adapter).total.families["vit.q_proj"] == config.vit_layers_used - 1
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({**document, "target_modules": "q_proj("}))
    with pytest.raises(bv.LoraError, match=r"target_modules 'q_proj\(' is not a valid regex"):
        check_adapter(adapter)


def test_bound_modules_without_factors_warn_and_a_stage_that_drops_one_is_refused(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    config = synthetic_checkpoint.config
    adapter = write_adapter(tmp_path / "a", config, ["q_proj", "o_proj_moe_gen"])
    tensors = safetensors.torch.load_file(str(adapter / ADAPTER_WEIGHTS))
    layer0 = "language_model.model.layers.0.self_attn.q_proj"
    kept = {k: v for k, v in tensors.items() if f".{layer0}." not in k}
    safetensors.torch.save_file(kept, str(adapter / ADAPTER_WEIGHTS))
    [warning] = check_adapter(adapter).warnings[-1:]
    assert "1 bound module has no factors" in warning and layer0 in warning
    with pytest.raises(bv.LoraError, match=r"28 adapted weights are not written for stage1: 'lang"):
        merge_adapter(synthetic_checkpoint.path, adapter, tmp_path / "out", stage="stage1")


def test_the_check_report_totals_what_every_target_binds(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    adapter = write_adapter(tmp_path / "a", synthetic_checkpoint.config, ["v_proj", "fc2"])
    document = check_adapter(adapter, synthetic_checkpoint.path).as_dict()
    total = document["binds_total"]
    assert set(total) == {"families", "summary"} and total["summary"]
    for family, count in total["families"].items():
        assert count == sum(b["families"].get(family, 0) for b in document["binds"].values())


def test_an_adapter_of_another_peft_type_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "IA3", "r": 4}))
    with pytest.raises(LoraError) as info:
        read_settings(tmp_path)
    assert str(info.value) == f"{tmp_path / ADAPTER_CONFIG}: peft_type is 'IA3'; only LORA adapters"


def test_merge_replaces_an_existing_output_only_when_told(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    adapter = write_adapter(tmp_path / "a", synthetic_checkpoint.config, ["connector.fc2"])
    base, out = synthetic_checkpoint.path, tmp_path / "out"
    merge_adapter(base, adapter, out)
    with pytest.raises(FileExistsError, match="pass overwrite=True to replace it"):
        merge_adapter(base, adapter, out)
    plan = merge_adapter(base, adapter, out, overwrite=True)
    assert plan.files and diff_checkpoints(base, out).differing_keys == ["connector.fc2.weight"]
