"""The error taxonomy: one BagelError base, each subclass also the builtin that drop-in callers
catch, messages printed as written; each fault raises its exact class."""

from __future__ import annotations

import pytest
import torch

import bagelverify as bv
from bagelverify import errors
from bagelverify.patch_embedding import conv_patch_weight_to_linear, linear_patch_weight_to_conv

BUILTIN_PARENTS: dict[type[errors.BagelError], tuple[type[Exception], ...]] = {
    errors.UnknownKeysError: (KeyError,),
    errors.RootError: (KeyError,),
    errors.MissingKeysError: (KeyError,),
    errors.KeyCollisionError: (ValueError,),
    errors.ShapeMismatchError: (ValueError,),
    errors.DestinationError: (ValueError,),
    errors.CorruptCheckpointError: (ValueError,),
    errors.AllocationError: (MemoryError,),
    errors.StageError: (ValueError,),
    errors.ShardSizeError: (ValueError,),
    errors.StageTypeError: (ValueError, TypeError),
    errors.ConfigError: (ValueError,),
    errors.PatternError: (ValueError,),
    errors.PatternTooComplexError: (ValueError,),
    errors.UnsupportedPattern: (ValueError,),
    errors.UnsupportedTensorError: (TypeError, ValueError),
    errors.UnsupportedPlatformError: (RuntimeError,),
    errors.DistributedMismatchError: (ValueError,),
    errors.ReadError: (OSError,),
    errors.LossyCastError: (ValueError,),
    errors.QuantizedCheckpointError: (ValueError,),
    errors.IntegrationError: (ImportError,),
    errors.AliasError: (ValueError,),
    errors.LoraError: (ValueError,),
    errors.ArgumentError: (ValueError,),
    errors.ArgumentTypeError: (ValueError, TypeError),
    errors.WeightsMismatchError: (ValueError,),
}


def test_every_error_class_is_listed_with_its_builtin_parents() -> None:
    found = {
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, errors.BagelError)
    }
    assert found - {errors.BagelError} == set(BUILTIN_PARENTS)
    for error_class, parents in BUILTIN_PARENTS.items():
        assert all(issubclass(error_class, parent) for parent in parents), error_class


@pytest.mark.parametrize("error_class", list(BUILTIN_PARENTS))
def test_messages_print_as_written(error_class: type[errors.BagelError]) -> None:
    """str() is the message itself, even for KeyError subclasses (which would repr it)."""
    assert str(error_class("a 'quoted' message\nline two")) == "a 'quoted' message\nline two"


def exact(error_class: type[Exception], call: object, match: str) -> None:
    with pytest.raises(Exception, match=match) as info:
        call()  # type: ignore[operator]
    assert type(info.value) is error_class, f"{type(info.value).__name__}: {info.value}"


def test_key_only_faults_raise_their_exact_class() -> None:
    adapter = bv.BagelStateDictAdapter()
    key = "language_model.model.norm.weight"
    exact(errors.KeyCollisionError, lambda: adapter.from_hf({key: 1, "model." + key: 2}), key)
    exact(errors.UnknownKeysError, lambda: adapter.from_hf({"nope": 1}), "'nope'")
    exact(errors.RootError, lambda: adapter.to_hf({key: 1}), "not under the 'model.' root")
    exact(
        errors.MissingKeysError,
        lambda: adapter.from_hf({"language_model.model.norm_moe_gen.weight": 1}, stage=2),
        "lack their UND twin",
    )
    exact(errors.StageError, lambda: bv.normalize_stage("stage3"), "unknown stage 'stage3'")
    exact(errors.StageTypeError, lambda: bv.normalize_stage(True), "got bool True")
    exact(
        errors.PatternError,
        lambda: adapter.to_hf({}, exclude_key_regex="("),
        r"exclude_key_regex '\(' is not a valid regex.*fix the pattern",
    )


def test_patch_embedding_shape_faults_are_shape_mismatches() -> None:
    exact(
        errors.ShapeMismatchError,
        lambda: conv_patch_weight_to_linear(torch.ones(2, 3, 4, 5)),
        r"patch_embedding\.weight: expected a Conv2d weight .* got \(2, 3, 4, 5\)",
    )
    exact(
        errors.ShapeMismatchError,
        lambda: linear_patch_weight_to_conv(torch.ones(2, 10), patch_size=2, channels=3),
        r"patch_embedding\.weight: expected a Linear weight \(out, 12\)",
    )


def test_counts_in_messages_have_thousands_separators_and_agreeing_verbs() -> None:
    from bagelverify.errors import agree, counted, format_examples

    assert format_examples(list(range(1006))).endswith("4 (and 1,001 more)")
    assert f"{counted(1, 'key')} {agree(1, 'is', 'are')}" == "1 key is"
    assert f"{counted(1223, 'key')} {agree(1223, 'is', 'are')}" == "1,223 keys are"
    assert agree(0, "is", "are") == "are"
