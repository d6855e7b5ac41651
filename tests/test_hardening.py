"""Issue 14, part a: hostile or unusual input costs bounded time and memory and fails with the
project's own error classes; saves honour the umask and clean up only their own leftovers."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import stat
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from bagelverify import atomic, safetensors_io
from bagelverify.automata import DFA
from bagelverify.buckets import Bucket
from bagelverify.config import FLAGS, MAX_VALUES, BagelConfig
from bagelverify.errors import (
    BagelError,
    ConfigError,
    CorruptCheckpointError,
    PatternError,
    PatternTooComplexError,
)
from bagelverify.matcher import NaiveMatcher, compile_matcher
from bagelverify.strict_json import MAX_CONFIG_BYTES, parse_json, read_json_file
from bagelverify.verify import check_patterns

# -- item 7: the umask -------------------------------------------------------------------------


@pytest.fixture
def umask_077() -> Iterator[None]:
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_files_get_0666_less_the_umask(tmp_path: Path, umask_077: None) -> None:
    """Under umask 077 a new tensor file and new config files are 0600, as open() makes them."""
    safetensors_io.save_tensors(tmp_path / "ema.safetensors", {"a": torch.zeros(2)})
    BagelConfig().save_pretrained(tmp_path)
    assert {p.name: mode_of(p) for p in tmp_path.iterdir()} == {
        "ema.safetensors": 0o600,
        "config.json": 0o600,
        "llm_config.json": 0o600,
        "vit_config.json": 0o600,
    }


def test_new_files_under_a_permissive_umask(tmp_path: Path) -> None:
    """Under umask 002 a new file is 0664 (group-writable, as the user asked)."""
    previous = os.umask(0o002)
    try:
        safetensors_io.save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)})
    finally:
        os.umask(previous)
    assert mode_of(tmp_path / "x.safetensors") == 0o664


def test_replaced_file_keeps_its_mode(tmp_path: Path, umask_077: None) -> None:
    """Re-saving over an existing file keeps that file's mode, whatever the umask."""
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"old")
    target.chmod(0o640)
    safetensors_io.save_tensors(target, {"a": torch.zeros(2)})
    assert mode_of(target) == 0o640


# -- item 8: only our own temporaries are cleaned up --------------------------------------------


def test_cleanup_removes_only_names_the_writer_makes(tmp_path: Path) -> None:
    """Hour-old files that merely look temporary (a user's notes, near-miss tokens) survive a
    save; an abandoned temporary of exactly the writer's shape is removed."""
    target = tmp_path / "ema.safetensors"
    token = "0123456789abcdef"
    ours = f".ema.safetensors.bagelverify-{token}.tmp"
    lookalikes = [
        ".ema.safetensors.my-notes.tmp",
        ".ema.safetensors.a1b2c3d4.tmp",  # mkstemp-like, no marker
        f".ema.safetensors.bagelverify-{token[:-1]}.tmp",  # token one digit short
        f".ema.safetensors.bagelverify-{token}0.tmp",  # token one digit long
        f".ema.safetensors.bagelverify-{token.upper()}.tmp",
        f".ema.safetensors.bagelverify-{token}.tmp.bak",
        f".ema.safetensors.bagelverify-{token}-copy.tmp",
    ]
    hour_ago = time.time() - 3600
    for name in [ours, *lookalikes]:
        (tmp_path / name).write_bytes(b"user data")
        os.utime(tmp_path / name, (hour_ago, hour_ago))
    safetensors_io.save_tensors(target, {"a": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*lookalikes, target.name])
    assert all((tmp_path / name).read_bytes() == b"user data" for name in lookalikes)


def test_writer_names_have_the_recognised_shape(tmp_path: Path) -> None:
    """The name the writer actually uses is one that cleanup recognises (and nothing else)."""
    target = tmp_path / "x.bin"
    with atomic.atomic_open(target) as handle:
        handle.write(b"data")
        (temporary,) = [p for p in tmp_path.iterdir() if p.name != target.name]
        assert atomic.is_temporary_name(target, temporary.name)
        assert not atomic.is_temporary_name(tmp_path / "y.bin", temporary.name)


# -- item 9: JSON validation is linear with a small constant ------------------------------------


def traced_peak(action: Callable[[], object]) -> int:
    """Peak bytes of Python allocations while ``action`` runs (deterministic, unlike RSS)."""
    tracemalloc.start()
    try:
        with contextlib.suppress(BagelError):
            action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def write_header(path: Path, body: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    return path


HOSTILE_HEADERS = {
    # a metadata value that is a huge array: the old walk made a path tuple per element
    "array": lambda n: b'{"__metadata__":{"x":[' + b",".join([b"0"] * n) + b"]}}",
    # one tensor with a shape of n dims of 2: the old check multiplied them all into a huge int
    "long shape": lambda n: (
        b'{"t":{"dtype":"U8","shape":[' + b",".join([b"2"] * n) + b'],"data_offsets":[0,0]}}'
    ),
    # many valid zero-byte tensors
    "entries": lambda n: (
        b"{"
        + b",".join(
            b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i for i in range(n // 20)
        )
        + b"}"
    ),
}


@pytest.mark.parametrize("kind", list(HOSTILE_HEADERS))
def test_header_validation_memory_is_a_small_multiple_of_json_loads(
    tmp_path: Path, kind: str
) -> None:
    """Invariant: read_header's peak memory is at most 3x a bare json.loads of the same header,
    for headers built to blow up the validation (before: about 15x for 'array')."""
    body = HOSTILE_HEADERS[kind](200_000)
    path = write_header(tmp_path / "h.safetensors", body)
    baseline = traced_peak(lambda: json.loads(body))
    assert traced_peak(lambda: safetensors_io.read_header(path)) <= 3 * baseline


def test_shape_overflow_check_stops_at_the_first_overflow() -> None:
    """The int64 element-count check reads dims only up to the one that overflows."""
    seen: list[int] = []

    class Watched(list[int]):
        def __iter__(self) -> Iterator[int]:
            for dim in super().__iter__():
                seen.append(dim)
                yield dim

    assert safetensors_io._overflows_int64(Watched([2] * 10_000))
    assert len(seen) == 63  # after 63 dims of 2 the product 2**63 exceeds int64
    assert not safetensors_io._overflows_int64([0, 2**62, 0, 1])


def test_duplicate_and_surrogate_faults_are_still_located() -> None:
    """The fast path (no walk) must not hide a fault: each is reported with its location."""

    def fault(raw: bytes) -> str:
        with pytest.raises(CorruptCheckpointError) as info:
            parse_json(raw, CorruptCheckpointError)
        return str(info.value)

    assert "'a' > '1' > 'b' names 'k' twice" in fault(b'{"a":[0,{"b":{"k":1,"k":2}}]}')
    assert "a string at 'a' > '0' is not valid Unicode" in fault(b'{"a":["\\ud800"]}')
    assert "a key at 'a' is not valid Unicode" in fault(b'{"a":{"\\uDC00":1}}')
    # an escaped backslash before "ud800" is plain text, not a surrogate
    assert parse_json(b'{"a":"\\\\ud800"}', CorruptCheckpointError) == {"a": "\\ud800"}


def test_json_files_over_their_cap_are_refused_unread(tmp_path: Path) -> None:
    """read_json_file names the size and the cap; the config reader applies MAX_CONFIG_BYTES."""
    path = tmp_path / "index.json"
    path.write_bytes(b'{"weight_map": {}}' + b" " * 100)
    with pytest.raises(CorruptCheckpointError, match="the file is 118 bytes, above the 64-byte"):
        read_json_file(path, 64, CorruptCheckpointError)
    assert read_json_file(path, 118, CorruptCheckpointError) == {"weight_map": {}}
    BagelConfig().save_pretrained(tmp_path)
    with open(tmp_path / "llm_config.json", "r+b") as handle:
        handle.truncate(MAX_CONFIG_BYTES + 1)
    with pytest.raises(ConfigError, match=r"llm_config\.json: the file is 16777217 bytes, above"):
        BagelConfig.from_pretrained(tmp_path)


# -- item 10: config values have sane bounds ------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "field", "value", "shown"),
    [
        ("llm_config.json", "num_hidden_layers", 1_000_000, "is 1000000, above"),
        ("config.json", "max_latent_size", 10**2500, "is an integer of about 2501 digits, above"),
        ("vit_config.json", "patch_size", 2**70, "is an integer of about 22 digits, above"),
    ],
)
def test_config_values_above_their_bound_are_a_config_error(
    tmp_path: Path, file: str, field: str, value: int, shown: str
) -> None:
    """A huge size is refused while reading, naming the file, field, value and bound."""
    BagelConfig().save_pretrained(tmp_path)
    document = json.loads((tmp_path / file).read_text())
    document[field] = value
    (tmp_path / file).write_text(json.dumps(document))
    with pytest.raises(ConfigError) as info:
        BagelConfig.from_pretrained(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / file}: field {field!r} {shown}")
    assert "largest accepted value" in message


def test_constructor_bounds_every_field_and_real_configs_fit() -> None:
    """Every integer field has a bound (flags are booleans); BAGEL-7B-MoT's and a
    Qwen2-72B-sized config are accepted, and each bound is at least 8x the BAGEL-7B-MoT value."""
    default = BagelConfig()
    fields = {item.name for item in dataclasses.fields(BagelConfig)}
    assert set(MAX_VALUES) == fields - FLAGS and fields >= FLAGS
    assert all(bound >= 8 * getattr(default, name) for name, bound in MAX_VALUES.items())
    dataclasses.replace(
        default,
        hidden_size=8192,
        num_hidden_layers=80,
        intermediate_size=29568,
        num_attention_heads=64,
        num_key_value_heads=8,
    )
    with pytest.raises(ConfigError, match=r"BagelConfig\.num_hidden_layers is 1025, above"):
        dataclasses.replace(default, num_hidden_layers=1025)


# -- item 11: user patterns cannot blow up the automaton ------------------------------------------

EXPONENTIAL = r"\A(?:a|b)*a(?:a|b){15}\Z"  # minimal DFA: 2**16 states


def test_determinisation_budget_names_the_pattern() -> None:
    """A pattern whose DFA needs more than MAX_DFA_STATES stops with a PatternError naming it."""
    with pytest.raises(PatternTooComplexError) as info:
        DFA.from_patterns([("und", [r"\Aok\Z", EXPONENTIAL])])
    assert isinstance(info.value, PatternError)
    assert str(info.value).startswith(f"pattern {EXPONENTIAL!r} needs more than 20000 DFA states")


def test_nfa_budget_stops_nested_repeats() -> None:
    """Nested bounded repeats (a billion NFA states) stop at MAX_NFA_STATES, naming the pattern."""
    nested = r"(?:(?:a{1000}){1000}){1000}"
    with pytest.raises(PatternTooComplexError, match=r"needs more than 200000 NFA states"):
        DFA.membership([nested])


def test_matcher_falls_back_to_the_regexes_past_the_budget() -> None:
    """compile_matcher still works (memo off); it agrees with the reference semantics."""
    matcher = compile_matcher(und=[EXPONENTIAL], gen=[], vae=[], extra=[])
    naive = NaiveMatcher({"und": [EXPONENTIAL], "gen": [], "vae": [], "extra": []})
    assert matcher.memo_stats().limit == 0  # memo off
    for key in ["a" + "b" * 15, "b" * 16, "ab" * 8, "a" * 17, "ba" + "a" * 15, ""]:
        assert matcher.classify(key) == naive.classify(key)
    assert matcher.classify("a" * 16) is Bucket.UND


def test_check_patterns_fails_cleanly_past_the_budget() -> None:
    """verify --patterns' engine raises the PatternError instead of growing without bound."""
    with pytest.raises(PatternTooComplexError, match=re.escape(repr(EXPONENTIAL))):
        check_patterns(und=[EXPONENTIAL], use_z3=False)
