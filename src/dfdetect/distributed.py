"""Data-parallel training with torch.distributed: gloo on the CPU, NCCL on GPUs, started by torchrun.

`dfdetect train --nproc N` relaunches itself under torchrun; inside, `setup()` joins the process group.
Rank 0 alone logs to MLflow and writes checkpoints; every rank keeps its own random streams, and rank 0
stores them all in the checkpoint so that a resumed run continues each rank where it stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch_dist.init_process_group(backend=backend)
    return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def teardown(d: Dist) -> None:
    if d.enabled and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def broadcast(d: Dist, value):
    """Rank 0's value on every rank (a picklable object)."""
    if not d.enabled:
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(d: Dist, value) -> list:
    """Every rank's value, in rank order, on every rank."""
    if not d.enabled:
        return [value]
    out = [None] * d.world
    torch_dist.all_gather_object(out, value)
    return out


def launch(nproc: int, args: list[str]) -> int:
    """Run `python -m dfdetect.cli ARGS` in `nproc` processes with torchrun on this machine."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "dfdetect.cli",
        *args,
    ]
    return subprocess.run(cmd).returncode
