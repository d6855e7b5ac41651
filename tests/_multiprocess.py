"""Run a function on N spawned CPU ranks joined by a gloo process group, with a hard deadline.

Rendezvous goes through a file store in a fresh temporary folder, so no TCP port has to be
picked (and none can be taken by a concurrent run). Each rank returns a picklable value or the
text of its exception; the parent kills every rank still alive at the deadline, so a rank that
hangs in a collective fails the test instead of hanging CI.
"""

from __future__ import annotations

import os
import queue
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 45.0
"""Gloo's own timeout for one collective: a rank stuck waiting for a dead peer gives up."""


FAILURE_GRACE_S = 10.0
"""How long the other ranks may still run once one rank has failed."""


class RankFailure(AssertionError):
    """A rank raised, died or missed the deadline."""


def _rank_main(
    rank: int,
    world_size: int,
    store_path: str,
    results: Any,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        value = fn(rank, world_size, *args)
        dist.barrier()  # leave together: gloo aborts when a peer disappears mid-teardown
        dist.destroy_process_group()
        results.put((rank, True, value))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_ranks(
    fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout: float = 120.0
) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, each call in its own spawned process.

    ``fn`` must be importable by name (a module-level function). Raises :class:`RankFailure`
    with every failing rank's traceback when a rank raises, exits without a result or is still
    running after ``timeout`` seconds.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory(prefix="bagelverify-ranks-") as tmp:
        store_path = os.path.join(tmp, "store")
        processes = [
            context.Process(
                target=_rank_main,
                args=(rank, world_size, store_path, results, fn, args),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout
        got: dict[int, tuple[bool, Any]] = {}
        try:
            while len(got) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    rank, ok, value = results.get(timeout=min(remaining, 1.0))
                except queue.Empty:
                    dead = [r for r, p in enumerate(processes) if not p.is_alive() and r not in got]
                    if dead and all(r in got or r in dead for r in range(world_size)):
                        time.sleep(0.5)  # a result may still be in flight in the pipe
                        if results.empty():
                            break
                    continue
                got[rank] = (ok, value)
                if not ok:  # the others may now wait forever on the failed rank: stop soon
                    deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
        finally:
            for process in processes:
                process.join(timeout=5.0)
                if process.is_alive():
                    process.kill()
                    process.join()
    failures = [f"rank {r}:\n{v}" for r, (ok, v) in sorted(got.items()) if not ok]
    silent = [r for r in range(world_size) if r not in got]
    if silent:
        failures.append(
            f"ranks {silent} returned nothing within {timeout:.0f} s "
            f"(exit codes {[processes[r].exitcode for r in silent]})"
        )
    if failures:
        raise RankFailure("\n".join(failures))
    return [got[r][1] for r in range(world_size)]
