"""One JSON envelope for every command, success and error alike (issue 32): each document is
validated against the one JSON Schema (docs/schema/bagelverify.schema.json) and against the
command's table in docs/json.md."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from bagelverify import cli
from bagelverify.cli import COMMANDS, ENVELOPE_FIELDS
from bagelverify.synthetic import SyntheticCheckpoint

jsonschema = pytest.importorskip("jsonschema")

DOCS = Path(__file__).resolve().parents[1] / "docs"
SCHEMA = json.loads((DOCS / "schema" / "bagelverify.schema.json").read_text())


def documented_fields(command: str) -> tuple[set[str], set[str]]:
    """(every field, the fields always present) of docs/json.md's table for ``COMMAND --json``."""
    text = (DOCS / "json.md").read_text()
    start = text.index(f"`{command} --json`")
    table = text[text.index("| field |", start) :]
    rows = []
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        rows.append((cells[0].strip("`"), cells[-1]))
    return {name for name, _ in rows}, {n for n, meaning in rows if not meaning.startswith("only")}


def assert_valid(document: dict[str, Any], command: str, *, failed: bool = False) -> None:
    """The schema, the envelope's order, then (on success) exactly docs/json.md's fields."""
    jsonschema.validate(document, SCHEMA)
    assert tuple(document)[: len(ENVELOPE_FIELDS)] == ENVELOPE_FIELDS
    assert document["command"] == command
    if failed:
        assert set(document) == {*ENVELOPE_FIELDS, "error"}
        return
    every, always = documented_fields(command)
    fields = set(document) - set(ENVELOPE_FIELDS)
    assert always <= fields <= every, (always - fields, fields - every)


def run_json(capsys: pytest.CaptureFixture[str], *words: object) -> tuple[int, dict[str, Any]]:
    code = cli.main([*map(str, words), "--json"])
    document = json.loads(capsys.readouterr().out)
    assert isinstance(document, dict)
    assert document["exit_code"] == code and document["ok"] is (code == 0)
    return code, document


def test_the_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_the_schema_refuses_what_the_envelope_rules_out() -> None:
    """The schema is not vacuous: each rule of the envelope has a document it refuses."""
    good = {"schema_version": 1, "command": "x", "ok": True, "exit_code": 0, "seconds": 0.1}
    jsonschema.validate(good, SCHEMA)
    bad = [
        {k: v for k, v in good.items() if k != "seconds"},
        {**good, "ok": True, "exit_code": 1},
        {**good, "ok": False, "exit_code": 0},
        {**good, "ok": False, "exit_code": 2, "error": {"type": "E"}},
        {**good, "ok": False, "exit_code": 2, "error": {"type": "E", "message": "m"}, "x": 1},
        {**good, "schema_version": 2},
    ]
    for document in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(document, SCHEMA)


ERRORS: dict[str, tuple[list[str], int]] = {
    "inspect": (["inspect", "{tmp}/missing"], 2),
    "convert": (["convert", "{tmp}/missing", "{tmp}/out"], 2),
    "diff": (["diff", "{tmp}/missing", "{tmp}/missing"], 2),
    "repair": (["repair", "{tmp}/missing", "--base", "{tmp}/missing", "-o", "{tmp}/r"], 2),
    "lora": (["lora", "check", "{tmp}/missing"], 2),
    "verify": (["verify", "--patterns", "{tmp}/missing.json"], 2),
    "bench": (["bench", "--stgae", "1"], 2),
    "demo": (["demo", "--scale", "0.5"], 2),
    "export": (["export", "{tmp}/missing", "-o", "{tmp}/out"], 2),
    "compose": (
        ["compose", "--llm", "{tmp}/missing", "--vit", "{tmp}/missing", "-o", "{tmp}/o"],
        2,
    ),
}


def test_every_command_is_covered() -> None:
    assert set(ERRORS) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(ERRORS))
def test_every_commands_error_is_the_envelope_with_an_error_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """Before: errors under --json were plain text on stderr only, nothing on stdout."""
    words, code = ERRORS[command]
    got, document = run_json(capsys, *(w.format(tmp=tmp_path) for w in words))
    assert got == code
    assert_valid(document, document["command"], failed=True)
    assert document["command"].split()[0] == command
    assert document["error"]["message"]


def test_an_unknown_command_and_an_argv_error_are_enveloped_too(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, document = run_json(capsys, "inspcet")
    assert code == 2 and document["command"] == "bagelverify"
    assert_valid(document, "bagelverify", failed=True)
    assert "invalid choice: 'inspcet'" in document["error"]["message"]


def test_success_documents_of_the_checkpoint_commands(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """inspect, convert, diff (identical and not), repair: the schema and the docs' tables;
    ``seconds`` and ``exit_code`` are in every one (before: in some)."""
    source = synthetic_checkpoint.path
    _, document = run_json(capsys, "inspect", source)
    assert_valid(document, "inspect")
    _, document = run_json(capsys, "convert", source, tmp_path / "s1", "--stage", "1")
    assert_valid(document, "convert")
    code, document = run_json(capsys, "diff", source, source)
    assert code == 0 and document["identical"]
    assert_valid(document, "diff")
    code, document = run_json(capsys, "diff", source, tmp_path / "s1")
    assert code == 1 and not document["ok"]
    assert_valid(document, "diff")
    lacking = tmp_path / "lacking"
    shutil.copytree(tmp_path / "s1", lacking)
    _, document = run_json(capsys, "repair", lacking, "--base", source, "-o", tmp_path / "r")
    assert_valid(document, "repair")
    assert document["vae_from"] == str(lacking / "ae.safetensors")
    assert document["stage"] == "stage2" and document["from_base"]  # the stage BASE holds
    assert [set(f) for f in document["files"]] == [{"path", "bytes"}] * len(document["files"])


def test_success_documents_of_verify_and_bench(capsys: pytest.CaptureFixture[str]) -> None:
    _, document = run_json(capsys, "verify", "--no-z3")
    assert_valid(document, "verify")
    _, document = run_json(capsys, "bench", "--quick")
    assert_valid(document, "bench")


def test_the_docs_name_every_field_of_the_envelope_once() -> None:
    text = (DOCS / "json.md").read_text()
    envelope = text[text.index("| field |") : text.index("\n\n", text.index("| field |"))]
    assert re.findall(r"^\| `(\w+)` \|", envelope, re.M) == [*ENVELOPE_FIELDS, "error"]
    assert set(SCHEMA["properties"]) == {*ENVELOPE_FIELDS, "error"}


def test_the_docs_example_is_what_the_command_prints(capsys: pytest.CaptureFixture[str]) -> None:
    text = (DOCS / "json.md").read_text()
    command = re.search(r"`bagelverify (inspect /no/such/folder --json)` prints", text)
    example = re.search(r"```json\n(.*?)```", text, re.S)
    assert command is not None and example is not None
    shown = json.loads(example.group(1))
    jsonschema.validate(shown, SCHEMA)
    code = cli.main(command.group(1).split())
    printed = json.loads(capsys.readouterr().out)
    assert code == shown["exit_code"]
    assert {**printed, "seconds": None} == {**shown, "seconds": None}
