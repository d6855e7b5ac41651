"""``bagelverify convert``: rewrite a checkpoint for a stage, with HF or native keys, or as DCP.

Safetensors -> safetensors streams one tensor at a time
(:func:`bagelverify.checkpoint.convert_checkpoint`): peak memory is about the largest tensor.
To DCP (:func:`bagelverify.hf_to_dcp`) and from DCP (:func:`bagelverify.dcp_to_hf`) one tensor
at a time.
The output is written into a hidden staging folder (``.DST.partial-<token>``) on ``DST``'s own file
system and published by the one rule every writer follows (:mod:`bagelverify.publish`): at every
instant, a SIGKILL included, ``DST`` holds its previous checkpoint or the complete new one, and
the next run finishes or removes what a killed one left. An existing checkpoint in ``DST`` is
replaced only with ``--force`` (its other files stay); ``DST`` may not be ``SRC`` or ``--config``
by any name (symlink, bind mount, hard links). ``ae.safetensors`` (the VAE) is carried over from
``SRC`` when it has one.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoint import (
    INDEX_FILE,
    choose_weights,
    convert_checkpoint,
    inspect_checkpoint,
    open_weights,
    require_directory,
)
from ..cli import UsageError, add_stage_argument, one_line
from ..config import CONFIG_FILES, BagelConfig
from ..dtypes import parse_dtype
from ..errors import BagelError, counted
from ..manifest import MODEL_FILE, VAE_FILE
from ..plan import held_stage, without_prefix
from ..publish import publishing, refuse_aliasing, visible_entries
from ..safetensors_io import DTYPES, TensorInfo, read_header
from ..stage import Stage
from .arguments import (
    DCP_METADATA,
    NOT_WRITABLE,
    add_strip_prefix_argument,
    add_weights_argument,
    checkpoint_folder,
    config_folder,
    not_writable,
    shard_size,
)
from .render import Printer, activity, byte_progress, human_bytes, print_json

EXAMPLE = "bagelverify convert /ckpt/BAGEL-7B-MoT /ckpt/bagel-stage1 --stage 1 --to native"


class NotCleanError(BagelError, ValueError):
    """The source checkpoint would not load strictly for the stage (see ``inspect``)."""


def is_checkpoint_file(name: str) -> bool:
    """Whether a file named ``name`` belongs to a checkpoint (a conversion replaces it)."""
    return (
        name in {MODEL_FILE, INDEX_FILE, DCP_METADATA, VAE_FILE, *CONFIG_FILES}
        or name.endswith(".distcp")
        or (name.startswith("model-") and name.endswith(".safetensors"))
    )


def checkpoint_files(folder: Path) -> list[Path]:
    """Files in ``folder`` that belong to a checkpoint and that a conversion would replace."""
    if not folder.is_dir():
        return []
    return [folder / name for name in visible_entries(folder) if is_checkpoint_file(name)]


def _check_paths(args: argparse.Namespace) -> tuple[Path, Path, list[Path]]:
    source, weights = checkpoint_folder(args.src, "SRC")
    if weights == "model" and args.weights is None and (source / MODEL_FILE).is_file():
        args.weights = weights  # the folder's default would be its ema.safetensors
    elif weights is not None and args.weights not in (None, weights):
        raise UsageError(f"SRC {args.src} is the {weights} weights, but --weights {args.weights}")
    target = Path(args.dst)
    require_directory(source, DCP_METADATA if args.from_format == "dcp" else MODEL_FILE)
    if args.from_format != "dcp" and (source / DCP_METADATA).is_file():
        raise UsageError(f"{source} is a DCP checkpoint (it has {DCP_METADATA}); add --from dcp")
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} exists and is not a folder")
    # by identity: a DST that is SRC through a symlink or a bind mount, or holds hard links to
    # its files, is refused with --force too
    refuse_aliasing(target, [source, config_folder(args.config)], is_checkpoint_file)
    existing = checkpoint_files(target)
    if existing and not args.force:
        raise FileExistsError(_holds_checkpoint(target, [p.name for p in existing]))
    return source, target, existing


def _holds_checkpoint(target: Path, names: list[str]) -> str:
    shown = ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
    return f"{target} already holds a checkpoint ({shown}); pass --force to replace it"


def _guard(target: Path, force: bool) -> Callable[[list[str]], None]:
    """The ``--force`` check, run again just before publishing (another process may have
    written a checkpoint into ``DST`` meanwhile)."""

    def guard(entries: list[str]) -> None:
        found = [name for name in entries if is_checkpoint_file(name)]
        if found and not force:
            raise FileExistsError(_holds_checkpoint(target, found))

    return guard


def _check_formats(args: argparse.Namespace) -> None:
    if args.from_format == "dcp" and args.to != "hf":
        raise UsageError("--from dcp writes an HF-layout folder; drop --to or use --to hf")
    if args.from_format == "dcp" and args.weights is not None:
        raise UsageError(
            "--weights picks ema.safetensors or model.safetensors in a safetensors folder; a DCP "
            "checkpoint holds one set of weights: drop --weights"
        )
    if args.to == "dcp" and args.max_shard_size is not None:
        raise UsageError("--max-shard-size applies to safetensors output, not --to dcp")


def _rewrites(args: argparse.Namespace) -> bool:
    """Whether a flag asks for a per-tensor transform (``rewrite``)."""
    return any(
        value is not None
        for value in (args.dtype, args.max_latent_size, args.vit_max_patches_per_side)
    )


def _rewrite(
    args: argparse.Namespace, source: Path, staging: Path, config: BagelConfig | None
) -> tuple[int, int, dict[str, Any]]:
    """``--dtype``, ``--max-latent-size``, ``--vit-max-patches-per-side``."""
    from ..checkpoint import build_report, open_weights
    from ..rewrite import rewrite_checkpoint

    selected = open_weights(source, args.weights)
    kept = build_report(selected.tensors, stage=args.stage).plan.native
    cast = None if args.dtype is None else DTYPES[parse_dtype(args.dtype)]

    def written(info: TensorInfo) -> int:  # the progress counts the bytes written
        if cast is None or not DTYPES[info.dtype].torch_dtype.is_floating_point:
            return info.nbytes
        return math.prod(info.shape) * cast.itemsize

    total = sum(written(selected.tensors[key]) for key in kept)
    with byte_progress(total, f"{args.stage} -> {args.to}", quiet=args.quiet) as advance:
        report = rewrite_checkpoint(
            source,
            staging,
            stage=args.stage,
            keys=args.to,
            dtype=args.dtype,
            allow_lossy=args.allow_lossy,
            max_latent_size=args.max_latent_size,
            vit_max_num_patch_per_side=args.vit_max_patches_per_side,
            max_shard_size=args.max_shard_size,
            strict=not args.no_strict,
            config=config,
            weights=args.weights,
            convert_conv_patch_embedding=args.convert_conv_patch_embedding,
            on_tensor=lambda _, nbytes: advance(nbytes),
        )
    return report.tensors, report.bytes_after, report.as_dict()


def _convert(
    args: argparse.Namespace, source: Path, staging: Path, config: BagelConfig | None
) -> tuple[int, int, dict[str, Any]]:
    """Write the converted checkpoint into ``staging``; return (tensors, tensor bytes, extra
    report fields)."""
    strict = not args.no_strict
    if args.strip_prefix is not None and (
        _rewrites(args) or args.from_format == "dcp" or args.to == "dcp"
    ):
        raise UsageError(
            "--strip-prefix applies to safetensors -> safetensors conversions without --dtype, "
            "--max-latent-size or --vit-max-patches-per-side: strip the prefix in a first "
            "convert, then run this one on its output"
        )
    if _rewrites(args):
        if args.from_format == "dcp" or args.to == "dcp":
            raise UsageError(
                "--dtype, --max-latent-size and --vit-max-patches-per-side apply to "
                "safetensors -> safetensors conversions"
            )
        return _rewrite(args, source, staging, config)
    if args.from_format == "dcp" or args.to == "dcp":
        from ..distributed import dcp_to_hf, hf_to_dcp

        what = f"{args.stage}: {args.from_format} -> {args.to}"
        with activity(what, quiet=args.quiet):  # these report no progress of their own
            if args.to == "dcp":
                count = hf_to_dcp(
                    source,
                    staging,
                    stage=args.stage,
                    strict=strict,
                    config=config,
                    weights=args.weights,
                )
            else:
                count = dcp_to_hf(
                    source,
                    staging,
                    stage=args.stage,
                    strict=strict,
                    config=config,
                    max_shard_size=args.max_shard_size,
                )
        return count, -1, {}
    report = inspect_checkpoint(
        source,
        stage=args.stage,
        config=config,
        weights=args.weights,
        strip_prefix=args.strip_prefix,
    )
    problems = report.problems(strict=strict, convert_conv=args.convert_conv_patch_embedding)
    if problems:  # the first problem's message carries its own remedy
        kinds = ", ".join(type(p).__name__ for p in problems)
        prefix = "" if args.strip_prefix is None else f" --strip-prefix {args.strip_prefix}"
        raise NotCleanError(
            f"{source} is not clean for {args.stage} ({kinds}); nothing was written. First: "
            f"{one_line(problems[0])} Run `bagelverify inspect {source} --stage "
            f"{args.stage[-1]}{prefix}` for the full report."
        )
    total = sum(info.nbytes for info in report.retained.values())
    done = [0, 0]
    with byte_progress(total, f"{args.stage} -> {args.to}", quiet=args.quiet) as advance:

        def on_tensor(_: str, nbytes: int) -> None:
            done[0] += 1
            done[1] += nbytes
            advance(nbytes)

        convert_checkpoint(
            source,
            staging,
            stage=args.stage,
            keys=args.to,
            max_shard_size=args.max_shard_size,
            strict=strict,
            config=config,
            convert_conv_patch_embedding=args.convert_conv_patch_embedding,
            on_tensor=on_tensor,
            weights=args.weights,
            strip_prefix=args.strip_prefix,
        )
    return done[0], done[1], {}


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``bagelverify convert``."""
    parser.add_argument("src", metavar="SRC", help="checkpoint folder to read")
    parser.add_argument("dst", metavar="DST", help="folder to write (created if needed)")
    add_stage_argument(parser)
    parser.add_argument(
        "--to",
        choices=("hf", "native", "dcp"),
        default="hf",
        help="hf: HF keys (the release layout, default); native: the same keys under 'model.'; "
        "dcp: a torch.distributed.checkpoint folder with native keys (about one tensor in "
        "process memory at a time)",
    )
    parser.add_argument(
        "--from",
        dest="from_format",
        choices=("safetensors", "dcp"),
        default="safetensors",
        help="safetensors: a folder with ema.safetensors, model.safetensors or a sharded index, "
        "HF or native keys (default); dcp: a native-layout DCP folder (written with HF keys)",
    )
    parser.add_argument(
        "--max-shard-size",
        type=shard_size,
        metavar="SIZE",
        help="write model-0000i-of-0000n.safetensors shards of at most SIZE (e.g. 5GB, 500MiB) "
        "plus model.safetensors.index.json, instead of one ema.safetensors",
    )
    parser.add_argument(
        "--config", metavar="DIR", help="config folder to validate against (default: SRC's)"
    )
    parser.add_argument("--force", action="store_true", help="replace a checkpoint in DST")
    parser.add_argument(
        "--no-strict",
        action="store_true",
        help="drop unknown keys and accept missing ones (with warnings) instead of failing",
    )
    add_strip_prefix_argument(parser)
    parser.add_argument(
        "--convert-conv-patch-embedding",
        action="store_true",
        help="store a Conv2d (out, C, P, P) patch-embedding weight as BAGEL's Linear layout",
    )
    parser.add_argument(
        "--dtype",
        type=str.lower,
        choices=("bf16", "f16", "f32"),
        help="cast every floating tensor; a cast that loses precision or range needs "
        "--allow-lossy (the output reports the size before and after)",
    )
    parser.add_argument(
        "--allow-lossy", action="store_true", help="allow narrowing --dtype casts (F32 -> BF16)"
    )
    parser.add_argument(
        "--max-latent-size",
        type=int,
        metavar="N",
        help="regenerate latent_pos_embed for an N x N latent grid and write max_latent_size N",
    )
    parser.add_argument(
        "--vit-max-patches-per-side",
        type=int,
        metavar="N",
        help="regenerate vit_pos_embed for N x N patches and write vit_max_num_patch_per_side N",
    )
    add_weights_argument(parser)


def _held_stage(source: Path, args: argparse.Namespace) -> Stage:
    """The stage ``SRC`` holds (no ``--stage``), from its headers or DCP metadata alone."""
    if args.from_format == "dcp":
        from ..safe_pickle import load_dcp_metadata

        return held_stage(load_dcp_metadata(source / DCP_METADATA).state_dict_metadata)
    with open_weights(source, args.weights) as files:
        return held_stage(without_prefix(files.tensors, args.strip_prefix))


def _make_parent(target: Path) -> None:
    """Create ``DST``'s parent folders, or say which one cannot be written."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if error.errno not in NOT_WRITABLE:
            raise
        raise not_writable(
            Path(error.filename or target.parent),
            error,
            "choose a DST under a folder you can write to",
        ) from error


def _carry_vae(source: Path, staging: Path) -> Path | None:
    """Copy ``SRC/ae.safetensors`` (header checked first) into the output, if there is one."""
    vae = source / VAE_FILE
    if not vae.is_file():
        return None
    read_header(vae)
    shutil.copyfile(vae, staging / VAE_FILE)
    return vae


def _file_list(files: list[Path]) -> str:
    """The written files for the text output, many alike summarised: more than three shards
    (``N shards first .. last``) or DCP data files (``N .distcp files``, one per tensor)."""
    groups = {
        "shard": [p for p in files if p.name.startswith("model-") and p.suffix == ".safetensors"],
        ".distcp file": [p for p in files if p.suffix == ".distcp"],
    }
    grouped = {p for paths in groups.values() for p in paths}
    out = [f"{p.name} ({human_bytes(p.stat().st_size)})" for p in files if p not in grouped]
    for noun, paths in groups.items():
        if len(paths) > 3:
            total = sum(p.stat().st_size for p in paths)
            out.append(
                f"{counted(len(paths), noun)} {paths[0].name} .. {paths[-1].name} "
                f"({human_bytes(total)} in all)"
            )
        else:
            out += [f"{p.name} ({human_bytes(p.stat().st_size)})" for p in paths]
    return ", ".join(out)


def run(args: argparse.Namespace) -> int:
    """Convert; print what was written."""
    _check_formats(args)
    source, target, replaced = _check_paths(args)
    config_dir = config_folder(args.config)
    config = BagelConfig.from_pretrained(config_dir) if config_dir is not None else None
    weights = None if args.from_format == "dcp" else choose_weights(source, args.weights)[1]
    if args.stage is None:
        args.stage = _held_stage(source, args)
    _make_parent(target)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        try:
            staging = stack.enter_context(
                publishing(
                    target,
                    replaces=is_checkpoint_file,
                    guard=_guard(target, args.force),
                    reads=[source, config_dir],
                    last=(INDEX_FILE, DCP_METADATA),
                )
            )
        except OSError as error:
            if error.errno not in NOT_WRITABLE:
                raise
            where = Path(error.filename or target.parent)
            raise not_writable(where, error, "choose another DST") from error
        count, nbytes, extra = _convert(args, source, staging, config)
        vae = _carry_vae(source, staging)
        written = sorted(p.name for p in staging.iterdir())
    seconds = time.perf_counter() - started
    files = [target / name for name in written]
    document: dict[str, Any] = {
        "command": "convert",
        "source": str(source),
        "weights": weights,
        "destination": str(target),
        "stage": args.stage,
        "from": args.from_format,
        "to": args.to,
        "tensors": count,
        "bytes": nbytes if nbytes >= 0 else None,
        "replaced": [p.name for p in replaced],
        "files": [{"path": str(p), "bytes": p.stat().st_size} for p in files if p.is_file()],
        "vae_from": None if vae is None else str(vae),
        **extra,
    }
    if args.json:
        print_json(document)
        return 0
    printer = Printer(quiet=args.quiet)
    size = f" ({human_bytes(nbytes)})" if nbytes >= 0 else ""
    printer.line(
        f"wrote {counted(count, 'tensor')}{size} for {args.stage} to {target} in {seconds:.1f}s "
        f"({args.from_format} -> {args.to})",
        style="green",
    )
    printer.line("  " + _file_list([p for p in files if p.is_file()]))
    if weights is not None:
        printer.line(f"  read {weights}")
        if not weights.startswith(MODEL_FILE) and args.to != "dcp" and not args.max_shard_size:
            printer.line(
                f"  wrote those weights as {MODEL_FILE}: the one file name BAGEL loaders read "
                "(the release's layout)"
            )
    if extra:
        printer.line(
            f"  tensor bytes {human_bytes(extra['bytes_before'])} -> "
            f"{human_bytes(extra['bytes_after'])}"
            + (f" ({extra['dtype']})" if extra["dtype"] else "")
            + "".join(f"; regenerated {key}" for key in extra["tables_regenerated"])
        )
    if replaced:
        printer.line(f"  replaced the previous checkpoint ({counted(len(replaced), 'file')})")
    return 0
