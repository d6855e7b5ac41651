"""Every ``--json`` document is valid JSON whatever it holds: paths with bytes that are not
UTF-8, tables holding NaN or Inf, characters stdout's encoding cannot write."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bagelverify import cli
from bagelverify.manifest import MODEL_FILE
from bagelverify.pos_embed import VIT_POS_EMBED
from bagelverify.safetensors_io import save_tensors
from bagelverify.strict_json import dumps_json
from bagelverify.synthetic import SyntheticCheckpoint


def strict_loads(text: str) -> object:
    """``json.loads`` refusing the bare ``NaN``/``Infinity`` that Python alone accepts."""

    def refuse(constant: str) -> None:
        raise ValueError(f"bare {constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("encoding", ["utf-8:strict", "ascii"])
def test_inspect_json_of_a_folder_named_with_a_non_utf8_byte(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, encoding: str
) -> None:
    """Before: under a strict stdout, "can't encode character '\\udcff'" and exit 2 (under a
    lenient one, the raw byte 0xff inside the JSON)."""
    folder = os.fsencode(tmp_path) + b"/bad\xffname"
    shutil.copytree(synthetic_checkpoint.path, os.fsdecode(folder))
    env = dict(os.environ, PYTHONIOENCODING=encoding)
    command = [sys.executable, "-m", "bagelverify", "inspect", folder]
    result = subprocess.run([*command, b"--json"], capture_output=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
    stdout = result.stdout.decode("ascii" if encoding == "ascii" else "utf-8")  # strict
    document = strict_loads(stdout)
    assert isinstance(document, dict)
    source = document["report"]["source"]
    assert source == os.fsdecode(folder + b"/" + MODEL_FILE.encode())
    assert source.encode("utf-8", "surrogateescape") == folder + b"/ema.safetensors"
    assert "\\udcff" in stdout
    if encoding == "utf-8:strict":  # and the text output prints the byte escaped
        text = subprocess.run(command, capture_output=True, env=env, check=False)
        assert text.returncode == 0, text.stderr
        assert b"/bad\\xffname/ema.safetensors  (1,223 tensors" in text.stdout


def test_a_position_table_holding_nan_gives_valid_json(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: ``"max_abs_diff": NaN``, which no JSON parser but Python's accepts."""
    shutil.copytree(synthetic_checkpoint.path, tmp_path / "nan")
    tensors = load_file(tmp_path / "nan" / MODEL_FILE)
    tensors[VIT_POS_EMBED][0, 0] = math.nan
    save_tensors(tmp_path / "nan" / MODEL_FILE, tensors)
    assert cli.main(["inspect", str(tmp_path / "nan"), "--json"]) == 0
    document = strict_loads(capsys.readouterr().out)
    assert isinstance(document, dict)
    tables = {table["key"]: table for table in document["position_tables"]}
    assert tables[VIT_POS_EMBED]["exact"] is False
    assert tables[VIT_POS_EMBED]["max_abs_diff"] == "nan"


def test_the_json_writer_spells_non_finite_numbers_and_escapes_what_cannot_be_encoded() -> None:
    document = {"a": [math.inf, -math.inf, math.nan, 1.5], "p": "/x\udcff", "s": "模型 \U0001f600"}
    utf8 = dumps_json(document)
    assert strict_loads(utf8) == {"a": ["inf", "-inf", "nan", 1.5], "p": "/x\udcff", "s": "模型 😀"}
    assert "模型" in utf8 and '"/x\\udcff"' in utf8  # only the surrogate is escaped
    utf8.encode("utf-8")  # strict
    ascii_text = dumps_json(document, encoding="ascii")
    assert ascii_text.isascii() and strict_loads(ascii_text) == strict_loads(utf8)
    assert "\\ud83d\\ude00" in ascii_text  # beyond the BMP: a surrogate pair
    assert dumps_json(document, ascii_only=True) == ascii_text
    assert float(strict_loads(dumps_json(-math.inf))) == -math.inf  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        dumps_json({"t": torch.zeros(1)})  # what JSON cannot hold is still an error
