"""Issue 14 item 6: a DCP ``.metadata`` is read without running code from it."""

from __future__ import annotations

import builtins
import dataclasses
import io
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from bagelverify import safetensors_io
from bagelverify.distributed import hf_to_dcp
from bagelverify.errors import CorruptCheckpointError
from bagelverify.safe_pickle import load_dcp_metadata
from bagelverify.synthetic import SyntheticCheckpoint

DTYPES = [
    *(spec.torch_dtype for spec in safetensors_io.DTYPES.values()),
    torch.complex64,
    torch.float8_e4m3fnuz,
]


def torch_metadata(folder: Path) -> object:
    """What torch's own (unrestricted) reader makes of the folder's .metadata."""
    metadata = FileSystemReader(str(folder)).read_metadata()
    metadata.storage_meta.load_id = None  # the reader stamps its own load id
    return metadata


def test_genuine_hf_to_dcp_metadata_loads_equal_to_torch(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    hf_to_dcp(synthetic_checkpoint.path, tmp_path / "dcp")
    ours = load_dcp_metadata(tmp_path / "dcp" / ".metadata")
    assert ours == torch_metadata(tmp_path / "dcp")
    assert len(ours.state_dict_metadata) > 100


def test_genuine_metadata_of_every_kind_of_entry_loads_equal_to_torch(tmp_path: Path) -> None:
    """Every dtype, bytes, nested containers, a 0-d, a channels-last and a transposed tensor."""
    state: dict[str, object] = {
        f"t{index}": torch.zeros(2, 3, dtype=dtype) for index, dtype in enumerate(DTYPES)
    }
    state.update(
        nested={"x": torch.zeros(2), "list": [torch.ones(1), 3], "s": "text"},
        blob=io.BytesIO(b"abc"),
        scalar=torch.tensor(1.0),
        channels_last=torch.zeros(1, 2, 3, 4).to(memory_format=torch.channels_last),
        transposed=torch.zeros(4, 5).t(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    ours = load_dcp_metadata(tmp_path / "dcp" / ".metadata")
    assert ours == torch_metadata(tmp_path / "dcp")


class _Payload:
    """Pickles as a call of ``function(*args)``: what an attacker's .metadata does."""

    def __init__(self, function: object, *args: object) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.function, self.args


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "inside a genuine Metadata"])
def test_payload_is_refused_and_never_runs(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, kind: str
) -> None:
    """A .metadata whose pickle calls os.system or exec is a CorruptCheckpointError naming the
    file and the global; the marker file the payload would write never appears."""
    marker = tmp_path / "marker"
    if kind == "os.system":
        payload: object = _Payload(os.system, f"touch {marker}")
        refused = f"{os.system.__module__}.system"
    elif kind == "builtins.exec":
        payload = _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()")
        refused = "builtins.exec"
    else:
        hf_to_dcp(synthetic_checkpoint.path, tmp_path / "genuine")
        genuine = load_dcp_metadata(tmp_path / "genuine" / ".metadata")
        payload = dataclasses.replace(
            genuine, planner_data={"x": _Payload(os.system, f"touch {marker}")}
        )
        refused = f"{os.system.__module__}.system"
    path = tmp_path / ".metadata"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CorruptCheckpointError) as info:
        load_dcp_metadata(path)
    assert str(info.value).startswith(f"{path}: the DCP metadata pickle names {refused}")
    assert not marker.exists()


def test_torch_globals_outside_the_list_are_refused(tmp_path: Path) -> None:
    """Only dtypes are admitted from the torch namespace besides torch.Size."""
    path = tmp_path / ".metadata"
    path.write_bytes(pickle.dumps(_Payload(torch.load, "/nonexistent")))
    with pytest.raises(CorruptCheckpointError, match=r"names torch\.(serialization\.)?load"):
        load_dcp_metadata(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (pickle.dumps({"state_dict_metadata": {}}), "the DCP metadata pickle holds a dict, not"),
        (pickle.dumps(torch.Size([1]))[:-3], "not a readable DCP metadata pickle (Unpickling"),
        (b"", "not a readable DCP metadata pickle (EOFError"),
    ],
    ids=["not Metadata", "truncated", "empty"],
)
def test_malformed_metadata_is_corrupt(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / ".metadata"
    path.write_bytes(content)
    with pytest.raises(CorruptCheckpointError) as info:
        load_dcp_metadata(path)
    assert str(info.value).startswith(f"{path}: {message}")


def test_convert_from_dcp_refuses_a_payload_before_running_it(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    """The end-to-end path of the defect: `bagelverify convert --from dcp` (dcp_to_hf) on a
    folder whose .metadata calls os.system is a CorruptCheckpointError; nothing runs."""
    import subprocess
    import sys

    folder = tmp_path / "dcp"
    hf_to_dcp(synthetic_checkpoint.path, folder, stage=1)
    marker = tmp_path / "marker"
    genuine = load_dcp_metadata(folder / ".metadata")
    crafted = dataclasses.replace(
        genuine, planner_data={"x": _Payload(os.system, f"touch {marker}")}
    )
    (folder / ".metadata").write_bytes(pickle.dumps(crafted))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bagelverify",
            "convert",
            str(folder),
            str(tmp_path / "out"),
            "--from",
            "dcp",
            "--stage",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and not marker.exists()
    assert f"{folder / '.metadata'}: the DCP metadata pickle names" in done.stderr
