"""Issue 26, parts A and B: one folder-atomic publishing rule for every writer of a checkpoint
folder, and outputs that alias inputs.

Part A. A writer killed (SIGKILL, in a subprocess: ``tests/_publish_crash.py``) at each instant of
publishing leaves the destination holding the complete old checkpoint or the complete new one,
and the next command touching the folder (a load, ``inspect``, another save, ``convert``) rolls
the killed run forward or back and removes its leftovers; the user's own files in the folder are
never lost. Also: the in-place fallback where folders cannot be exchanged, a retried ``repair``
after a kill, temporaries of killed sharded saves with another shard count, and
``hf_to_dcp``'s existing-checkpoint guard.

Part B. A write whose output is one of its inputs -- the same path, a symlink, a hard link, a
bind mount -- is refused, naming both paths, in the library and on the command line. A real bind
mount needs ``unshare -rm`` (an unprivileged user namespace); where the machine has none, that
test is skipped and the symlink tests stand in for it (both are the same folder by identity).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import bagelverify as bv
from bagelverify import atomic, cli, publish
from bagelverify.config import CONFIG_FILES
from bagelverify.errors import AliasError
from bagelverify.manifest import MODEL_FILE, VAE_FILE
from bagelverify.repair import repair_checkpoint
from bagelverify.rewrite import rewrite_checkpoint
from bagelverify.safetensors_io import save_tensors
from bagelverify.synthetic import SyntheticCheckpoint, make_synthetic_checkpoint

CHILD = Path(__file__).with_name("_publish_crash.py")
CHILD_ENV = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(
        p for p in (str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")) if p
    ),
)
TIMEOUT = 300
SAVED = {MODEL_FILE, *CONFIG_FILES}
"""What a save with a config replaces in the folder."""


def tree(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``folder`` (hidden ones included)."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def part(files: dict[str, bytes], names: set[str] = SAVED) -> dict[str, bytes]:
    return {name: data for name, data in files.items() if name in names}


def leftovers(*folders: Path) -> list[str]:
    """Names of interrupted writes' leftovers (staging, record, trash, temporary) in folders."""
    return [
        str(folder / name)
        for folder in folders
        if folder.is_dir()
        for name in os.listdir(folder)
        if publish.is_leftover_name(name)
    ]


def run_child(*args: object) -> subprocess.CompletedProcess[str]:
    return _run(sys.executable, CHILD, *args)


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    """``python -m bagelverify ARGS`` in a child process."""
    return _run(sys.executable, "-m", "bagelverify", *args)


def _run(*command: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        env=CHILD_ENV,
        timeout=TIMEOUT,
        check=False,
    )


def killed(*args: object) -> None:
    """Run the child; it must have killed itself with SIGKILL at its point."""
    done = run_child(*args)
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr[-3000:])


def with_user_files(folder: Path) -> None:
    """What a user keeps beside a checkpoint: a note and a folder of their own."""
    (folder / "notes.txt").write_text("mine")
    (folder / "runs").mkdir()
    (folder / "runs" / "log.txt").write_text("step 1\n")


@pytest.fixture(scope="module")
def new_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCheckpoint:
    """The checkpoint saved over the old one: other widths (scale 128), so other bytes and other
    config files; a mix of the two is told apart from either."""
    return make_synthetic_checkpoint(tmp_path_factory.mktemp("new"), scale=128, seed=7)


@pytest.fixture
def old(synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path) -> Path:
    """DST: the session's synthetic checkpoint (ema, ae, configs) plus the user's files."""
    folder = tmp_path / "parent" / "dst"
    shutil.copytree(synthetic_checkpoint.path, folder)
    with_user_files(folder)
    return folder


def saved_over(old: Path, new: SyntheticCheckpoint, where: Path) -> dict[str, bytes]:
    """The tree a complete save of ``new`` over a copy of ``old`` leaves (no kill)."""
    copy = where / "dst"
    shutil.copytree(old, copy)
    state = bv.load_bagel_checkpoint_state_dict(new.path, stage=2)
    bv.save_bagel_checkpoint(state, copy, stage=2, config=new.config, overwrite=True)
    return tree(copy)


def raw_tree(folder: Path) -> dict[str, bytes]:
    """``folder`` as a reader sees it before anything recovers it."""
    return {k: v for k, v in tree(folder).items() if not publish.is_leftover_name(k)}


def next_command(kind: str, dst: Path) -> None:
    """The next command touching ``dst`` after the killed one."""
    if kind == "load":
        bv.load_bagel_checkpoint_state_dict(dst, stage=1)
    elif kind == "inspect":
        assert cli.main(["inspect", str(dst), "--headers-only", "-q"]) in (0, 1)
    elif kind == "recover":
        publish.recover(dst, wait=True)
    else:
        raise AssertionError(kind)


# -- part A: kills at every instant of an exchange publish -----------------------------------------

EXCHANGE_POINTS = [
    # point, what DST holds once killed there, the next command
    ("write", "old", "load"),
    ("staged", "old", "inspect"),
    ("recorded", "old", "load"),
    ("exchanged", "new", "inspect"),
    ("carry", "new", "load"),
    ("trash", "new", "inspect"),
]


@pytest.mark.parametrize(("point", "holds", "after"), EXCHANGE_POINTS)
def test_a_save_killed_at_any_instant_leaves_old_or_new_and_is_recovered(
    old: Path,
    new_checkpoint: SyntheticCheckpoint,
    tmp_path: Path,
    point: str,
    holds: str,
    after: str,
) -> None:
    """The checkpoint files of DST (weights and configs) are all the old ones or all the new
    ones at the kill; the next load or ``inspect`` finishes the publish or undoes it, carries
    the user's files back if they were in flight, and leaves nothing hidden behind."""
    before = tree(old)
    expected = {"old": before, "new": saved_over(old, new_checkpoint, tmp_path / "scratch")}
    killed("save", point, old, new_checkpoint.path)

    assert part(raw_tree(old)) == part(expected[holds])  # never new weights with old configs
    next_command(after, old)
    assert tree(old) == expected[holds]  # the user's files too; nothing hidden left in DST
    assert leftovers(old.parent) == []


def test_a_writer_after_a_kill_recovers_first(
    old: Path, new_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    """The next writer of the folder (a save) finishes the killed publish before its own: the
    user's files that were in flight end in DST, and its own checkpoint replaces the new one."""
    killed("save", "carry", old, new_checkpoint.path)
    state = bv.load_bagel_checkpoint_state_dict(new_checkpoint.path, stage=1)
    changed = {key: value + 1 for key, value in state.items()}
    bv.save_bagel_checkpoint(changed, old, stage=1, overwrite=True)
    assert (old / "notes.txt").read_text() == "mine"
    assert (old / "runs" / "log.txt").read_text() == "step 1\n"
    loaded = bv.load_bagel_checkpoint_state_dict(old, stage=1)
    assert all(torch.equal(loaded[key], changed[key]) for key in changed)
    assert leftovers(old.parent, old) == []


@pytest.mark.parametrize(("step", "holds"), [("_write_journal", "old"), ("exchange", "new")])
def test_ctrl_c_in_the_middle_of_publishing_finishes_or_undoes_it_at_once(
    old: Path,
    new_checkpoint: SyntheticCheckpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
    holds: str,
) -> None:
    """The issue: Ctrl-C (or SIGTERM, which the command line turns into it) between removing the
    old files and moving the new ones in deleted the staging folder too: both checkpoints gone.
    Now an interrupt after the recovery record is written is handled by that record before it
    propagates: undone before the exchange, finished after it."""
    before = tree(old)
    expected = {"old": before, "new": saved_over(old, new_checkpoint, tmp_path / "scratch")}
    real = getattr(publish, step)

    def then_interrupt(*args: Any) -> None:
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(publish, step, then_interrupt)
    state = bv.load_bagel_checkpoint_state_dict(new_checkpoint.path, stage=2)
    with pytest.raises(KeyboardInterrupt):
        bv.save_bagel_checkpoint(state, old, stage=2, config=new_checkpoint.config, overwrite=True)
    assert tree(old) == expected[holds] and leftovers(old.parent) == []


@pytest.mark.parametrize(("point", "holds"), [("recorded", "old"), ("moved", None)])
def test_in_place_publishing_is_rolled_forward(
    old: Path,
    new_checkpoint: SyntheticCheckpoint,
    tmp_path: Path,
    point: str,
    holds: str | None,
) -> None:
    """Where the OS cannot exchange folders (here: ``exchange`` fails with EINVAL) the files
    move in one by one under a recovery record in DST. Killed before the first move, DST is the
    old checkpoint; killed after it, DST is a mix until the next run; either way the next run
    rolls the publish forward."""
    before = tree(old)
    expected = saved_over(old, new_checkpoint, tmp_path / "scratch")
    killed("save-inplace", point, old, new_checkpoint.path)
    if holds == "old":
        assert part(raw_tree(old)) == part(before)
    else:
        assert part(raw_tree(old)) not in (part(before), part(expected))
        assert [n for n in os.listdir(old) if publish.JOURNAL_MARKER in n]  # the record
    next_command("load", old)  # the record is written: the publish is rolled forward
    assert tree(old) == expected
    assert leftovers(old.parent) == []


def test_in_place_publishing_without_a_kill_matches_the_exchange(
    old: Path,
    new_checkpoint: SyntheticCheckpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = saved_over(old, new_checkpoint, tmp_path / "scratch")
    inode = old.stat().st_ino

    def refuse(a: Any, b: Any) -> None:
        raise OSError(errno.EINVAL, "not supported", a)

    monkeypatch.setattr(publish, "exchange", refuse)
    state = bv.load_bagel_checkpoint_state_dict(new_checkpoint.path, stage=2)
    bv.save_bagel_checkpoint(state, old, stage=2, config=new_checkpoint.config, overwrite=True)
    assert tree(old) == expected and old.stat().st_ino == inode
    assert leftovers(old.parent) == []


@pytest.mark.parametrize("point", ["exchanged", "trash"])
def test_convert_force_killed_mid_publish_is_finished_by_the_next_inspect(
    synthetic_checkpoint: SyntheticCheckpoint,
    new_checkpoint: SyntheticCheckpoint,
    tmp_path: Path,
    point: str,
) -> None:
    """``convert --force`` over an existing checkpoint (the issue: a kill between removing the
    old files and moving the new ones in left DST holding two small files)."""
    dst = tmp_path / "parent" / "dst"
    scratch = tmp_path / "scratch" / "dst"
    for folder in (dst, scratch):
        shutil.copytree(synthetic_checkpoint.path, folder)
        with_user_files(folder)
    argv = ["convert", str(new_checkpoint.path), str(scratch), "--stage", "1", "--force", "-q"]
    assert cli.main(argv) == 0
    expected = tree(scratch)
    names = {name for name in expected if "/" not in name and name not in ("notes.txt",)}
    killed("convert", point, dst, new_checkpoint.path)
    assert part(raw_tree(dst), names) == part(expected, names)
    next_command("inspect", dst)
    assert tree(dst) == expected
    assert leftovers(dst.parent) == []


# -- part A: repair retried after a kill, shard-count temporaries ----------------------------------


def test_a_repair_killed_into_an_empty_out_can_be_retried_at_once(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    """The issue: every retry refused OUT as "not empty" because of the killed run's staging
    folder. Now the retry (right away: no minute to wait) succeeds and removes it."""
    src = tmp_path / "src"
    src.mkdir()
    from safetensors.torch import load_file

    tensors = load_file(synthetic_checkpoint.path / MODEL_FILE)
    save_tensors(src / MODEL_FILE, {k: v for k, v in tensors.items() if "vit_model" not in k})
    synthetic_checkpoint.config.save_pretrained(src)
    out = tmp_path / "out"
    out.mkdir()
    killed("repair", "write", out, src, synthetic_checkpoint.path)
    assert os.listdir(out) == [] and leftovers(tmp_path)  # the killed run's staging folder
    argv = ["repair", str(src), "--base", str(synthetic_checkpoint.path), "-o", str(out), "-q"]
    assert cli.main(argv) == 0
    assert leftovers(tmp_path, out) == []
    loaded = bv.load_bagel_checkpoint_state_dict(out, stage=2)
    assert len(loaded) == 1223


def test_temporaries_of_a_killed_sharded_save_are_collected_by_a_save_of_another_count(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    """A sharded save killed mid-shard leaves shards and a partial temporary in its staging
    folder; the next save, with another shard count, removes it all (and an old layout's stray
    shard temporaries in DST too). Only the new save's files remain."""
    dst = tmp_path / "dst"
    state = bv.load_bagel_checkpoint_state_dict(synthetic_checkpoint.path, stage=2)
    bv.save_bagel_checkpoint(state, dst, stage=2, max_shard_size="1MB")
    before = tree(dst)
    killed("sharded", "write", dst, synthetic_checkpoint.path, "600kB")
    assert tree(dst) == before
    [staging] = leftovers(tmp_path)
    assert any(name.endswith(".tmp") for name in os.listdir(staging))  # the partial shard
    # what a killed save of an older bagelverify left in DST itself, an hour ago
    stray = dst / f".model-00003-of-00007.safetensors.{atomic.TEMPORARY_MARKER}{'a' * 16}.tmp"
    stray.write_bytes(b"\0" * 1000)
    hour_ago = time.time() - 3600
    os.utime(stray, (hour_ago, hour_ago))

    bv.save_bagel_checkpoint(state, dst, stage=2, max_shard_size="2MB", overwrite=True)
    assert leftovers(tmp_path, dst) == []
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert shards.isdisjoint(before)  # another shard count
    assert sorted(os.listdir(dst)) == sorted({*shards, "model.safetensors.index.json"})


# -- part A: units of the rule ---------------------------------------------------------------------


def test_replacing_keeps_the_users_files_mode_and_the_folder_a_symlink_points_to(
    tmp_path: Path,
) -> None:
    """A symlinked DST is published into the folder it points to (the link stays a link); the
    new folder keeps the old one's mode; files the checkpoint does not own are carried."""
    real = tmp_path / "real"
    bv.save_bagel_checkpoint(_state(0), real, stage=1, strict=False)
    with_user_files(real)
    real.chmod(0o750)
    link = tmp_path / "link"
    link.symlink_to(real)
    bv.save_bagel_checkpoint(_state(1), link, stage=1, strict=False, overwrite=True)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.stat().st_mode & 0o7777 == 0o750
    assert sorted(os.listdir(real)) == [MODEL_FILE, "notes.txt", "runs"]
    assert torch.equal(
        bv.load_bagel_checkpoint_state_dict(link, stage=1, strict=False)[KEY], _state(1)[KEY]
    )
    assert leftovers(tmp_path) == []


def test_a_folder_this_process_works_in_is_published_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exchanging the working folder away would leave the process (and its relative paths) in
    the removed old folder: it is published in place instead, keeping its inode."""
    folder = tmp_path / "ckpt"
    bv.save_bagel_checkpoint(_state(0), folder, stage=1, strict=False)
    inode = folder.stat().st_ino
    monkeypatch.chdir(folder)
    bv.save_bagel_checkpoint(_state(1), ".", stage=1, strict=False, overwrite=True)
    assert folder.stat().st_ino == inode
    assert torch.equal(
        bv.load_bagel_checkpoint_state_dict(folder, stage=1, strict=False)[KEY], _state(1)[KEY]
    )
    assert leftovers(tmp_path, folder) == []


def test_a_failed_write_leaves_the_folder_and_names_the_destination(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC in the staging folder: the OSError keeps its errno and names DST's file, not a
    hidden staging path; DST and its parent are as they were."""
    folder = tmp_path / "ckpt"
    bv.save_bagel_checkpoint(_state(0), folder, stage=1, strict=False)
    before = tree(folder)

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    from bagelverify import safetensors_io

    monkeypatch.setattr(safetensors_io, "_write_tensor", full)
    with pytest.raises(OSError) as info:
        bv.save_bagel_checkpoint(_state(1), folder, stage=1, strict=False, overwrite=True)
    assert info.value.errno == errno.ENOSPC
    assert f"while writing {folder / MODEL_FILE};" in str(info.value)
    assert publish.STAGING_MARKER not in str(info.value)
    assert tree(folder) == before and leftovers(tmp_path) == []


def test_recover_leaves_what_is_not_a_dead_runs(tmp_path: Path) -> None:
    """Only this module's exact names for this destination are touched, and a staging folder
    its writer holds survives however old it is."""
    dst = tmp_path / "out"
    with publish.publishing(dst, replaces=lambda name: True) as staging:
        hour_ago = time.time() - 3600
        os.utime(staging, (hour_ago, hour_ago))
        lookalikes = [
            tmp_path / ".out.partial-notes",
            tmp_path / f".other.partial-{'1' * 16}",
            tmp_path / f".out.partial-{'A' * 16}",
            tmp_path / f".out.trash-{'2' * 15}",
        ]
        for path in lookalikes:
            path.mkdir()
        assert publish.recover(dst, wait=True) == []
        assert staging.is_dir() and all(path.is_dir() for path in lookalikes)
        (staging / "x").write_bytes(b"x")
    assert (dst / "x").read_bytes() == b"x"


def test_a_live_publish_nests_writers_into_its_staging_folder(tmp_path: Path) -> None:
    """``convert`` stages, then calls the library's writers into its staging folder: those
    write there directly, and everything is published once, together."""
    dst = tmp_path / "dst"
    with publish.publishing(dst, replaces=lambda name: True) as staging:
        written = bv.save_bagel_checkpoint(_state(0), staging, stage=1, strict=False)
        assert written == [staging / MODEL_FILE] and not dst.exists()
        (staging / VAE_FILE).write_bytes(b"vae")
    assert sorted(os.listdir(dst)) == [VAE_FILE, MODEL_FILE]


KEY = "model.language_model.model.layers.0.mlp.up_proj.weight"


def _state(tag: int) -> dict[str, torch.Tensor]:
    return {KEY: torch.full((4, 4), float(tag))}


# -- part A: hf_to_dcp's guard and stale files -----------------------------------------------------


def test_hf_to_dcp_refuses_an_existing_checkpoint_and_replaces_it_whole_with_overwrite(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    """The issue: hf_to_dcp had no guard, and over a stage-2 DCP folder a stage-1 one left 402
    stale files. Now: FileExistsError without overwrite; with it, exactly a fresh stage-1
    conversion's files (and the user's own) are there."""
    dst, fresh = tmp_path / "dcp", tmp_path / "fresh"
    bv.hf_to_dcp(synthetic_checkpoint.path, dst, stage=2)
    (dst / "notes.txt").write_text("mine")
    before = sorted(os.listdir(dst))
    with pytest.raises(FileExistsError, match=r"already holds a checkpoint.*overwrite=True"):
        bv.hf_to_dcp(synthetic_checkpoint.path, dst, stage=1)
    assert sorted(os.listdir(dst)) == before
    bv.hf_to_dcp(synthetic_checkpoint.path, dst, stage=1, overwrite=True)
    bv.hf_to_dcp(synthetic_checkpoint.path, fresh, stage=1)
    assert sorted(os.listdir(dst)) == sorted([*os.listdir(fresh), "notes.txt"])
    assert len(os.listdir(fresh)) < len(before) - 1
    back = bv.dcp_to_hf(dst, tmp_path / "back", stage=1)
    assert back == 821 and leftovers(tmp_path) == []


# -- part B: outputs that alias inputs -------------------------------------------------------------


@pytest.fixture
def source(synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    shutil.copytree(synthetic_checkpoint.path, folder)
    return folder


def aliases(source: Path, how: str) -> Path:
    """A second name of ``source``: the same path, a symlink to it, or a new folder holding a
    hard link to its model file."""
    if how == "same path":
        return source
    if how == "symlink":
        link = source.parent / "link"
        link.symlink_to(source)
        return link
    folder = source.parent / "hardlinked"
    folder.mkdir()
    os.link(source / MODEL_FILE, folder / MODEL_FILE)
    return folder


ALIASES = ["same path", "symlink", "hard link"]


def assert_refused(info: pytest.ExceptionInfo[AliasError], source: Path, dst: Path) -> None:
    message = str(info.value)
    assert str(dst) in message and str(source) in message, message
    assert "Write to another folder" in message


@pytest.mark.parametrize("how", ALIASES)
def test_convert_cli_refuses_an_output_that_is_its_input_even_with_force(
    source: Path, how: str
) -> None:
    before = tree(source)
    dst = aliases(source, how)
    for extra in ([], ["--to", "dcp"], ["--dtype", "f32"]):
        argv = ["convert", str(source), str(dst), "--stage", "1", "--force", *extra]
        done = run_cli(*argv)
        assert done.returncode == 2 and done.stdout == "", done.stderr
        line = done.stderr.strip()
        assert line.startswith("bagelverify convert: error: ") and "\n" not in line, line
        assert str(dst) in line and str(source) in line
    assert tree(source) == before


def test_convert_cli_refuses_a_source_file_inside_dst(source: Path) -> None:
    argv = ["convert", str(source / MODEL_FILE), str(source), "--stage", "1", "--force"]
    done = run_cli(*argv)
    assert done.returncode == 2
    assert f"{source} is the same folder as the input {source}" in done.stderr


@pytest.mark.parametrize("how", ALIASES)
def test_the_library_writers_refuse_an_output_that_is_their_input(
    source: Path, tmp_path: Path, how: str
) -> None:
    """convert_checkpoint(S, S, overwrite=True), rewrite_checkpoint, hf_to_dcp, dcp_to_hf and
    repair_checkpoint (OUT == SRC or BASE): refused before anything is written."""
    before = tree(source)
    dst = aliases(source, how)
    calls = {
        "convert_checkpoint": lambda: bv.convert_checkpoint(source, dst, stage=1, overwrite=True),
        "rewrite_checkpoint": lambda: rewrite_checkpoint(source, dst, dtype="f32", overwrite=True),
        "repair (out=src)": lambda: repair_checkpoint(source, base=tmp_path / "base", out=dst),
        "repair (out=base)": lambda: repair_checkpoint(tmp_path / "base", base=source, out=dst),
    }
    shutil.copytree(source, tmp_path / "base")
    if how != "hard link":  # hf_to_dcp replaces DCP files only: a hard-linked model file stays
        calls["hf_to_dcp"] = lambda: bv.hf_to_dcp(source, dst, stage=1, overwrite=True)
    for name, call in calls.items():
        with pytest.raises(AliasError) as info:
            call()
        assert_refused(info, source, dst)
        assert tree(source) == before, name
    assert leftovers(tmp_path) == []


def test_dcp_to_hf_refuses_its_own_source(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    dcp = tmp_path / "dcp"
    bv.hf_to_dcp(synthetic_checkpoint.path, dcp, stage=1)
    before = tree(dcp)
    link = tmp_path / "link"
    link.symlink_to(dcp)
    for dst in (dcp, link):
        with pytest.raises(AliasError) as info:
            bv.dcp_to_hf(dcp, dst, stage=1, overwrite=True)
        assert_refused(info, dcp, dst)
    assert tree(dcp) == before


def _unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False)
    return done.returncode == 0


@pytest.mark.skipif(not _unshare(), reason="no unprivileged user namespaces (unshare -rm)")
def test_a_bind_mount_of_the_source_is_refused_and_a_bind_mounted_dst_is_published_in_place(
    source: Path, tmp_path: Path
) -> None:
    """Real bind mounts, in a private mount namespace: (1) DST bind-mounts SRC: convert --force
    is refused (paths differ, the folder is one: resolve() saw two); (2) DST is a bind mount of
    another folder (a mount point: no exchange, EBUSY): it is published in place."""
    other, mounted = tmp_path / "other", tmp_path / "mounted"
    other.mkdir()
    mounted.mkdir()
    (tmp_path / "alias").mkdir()
    before = tree(source)
    script = textwrap.dedent(
        f"""
        set -e
        mount --bind {source} {tmp_path / "alias"}
        mount --bind {other} {mounted}
        {sys.executable} -m bagelverify convert {source} {tmp_path / "alias"} --stage 1 --force \
            && exit 10 || echo "refused: $?"
        {sys.executable} -m bagelverify convert {source} {mounted} --stage 1 -q
        {sys.executable} -m bagelverify convert {source} {mounted} --stage 2 --force -q
        ls -A {mounted}
        """
    )
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=CHILD_ENV,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "refused: 2" in done.stdout
    assert "same folder as the input" in done.stderr and "a bind mount" in done.stderr
    assert tree(source) == before
    assert len(bv.load_bagel_checkpoint_state_dict(other, stage=2)) == 1223  # through the mount
    assert leftovers(other, tmp_path) == []
