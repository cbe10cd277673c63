"""Devices and torch.distributed: which device a process trains on, the process group that
torchrun describes, and the collectives training and refinement need (a barrier, a sum, a
broadcast of one rank's results, and leaving the group).

Outside torchrun every function is a no-op for a single process: rank 0 of 1."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys

import torch
import torch.distributed as dist

from cryosplat.errors import StageError


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (CUDA when there is one); under torchrun, CUDA means this
    process's GPU, ``cuda:LOCAL_RANK``."""
    if name not in ("cpu", "cuda", "auto"):
        raise ValueError(f"--device {name!r}: expected cpu, cuda or auto")
    if name == "cuda" and not torch.cuda.is_available():
        raise StageError("device", "--device cuda: torch finds no CUDA device (torch "
                           f"{torch.__version__}, built for CUDA {torch.version.cuda})")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device_name: str) -> tuple[int, int]:
    """Join the process group that torchrun describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``MASTER_ADDR``...) when ``WORLD_SIZE`` > 1: NCCL when the ranks train on CUDA,
    gloo on CPU. Returns (rank, world size); (0, 1) outside torchrun.

    The timeout is long (24 h) because rank 0 alone makes the validation maps while the others
    wait at a barrier."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dev = resolve_device(device_name)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=24))
    return dist.get_rank(), dist.get_world_size()


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks (0, 1 without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (nothing to do in a single process)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (nothing to do in a single process)."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int):
    """Rank ``src``'s ``obj`` (any picklable value, tensors on the CPU) on every rank; ``obj``
    is ignored on the others. In a single process, ``obj`` itself. The pickles travel only
    between this run's own processes."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def leave_group() -> None:
    """Every rank leaves the process group (each must call it); afterwards this process runs
    alone (:func:`rank_and_world` gives (0, 1))."""
    if rank_and_world()[1] > 1:
        dist.barrier()
        dist.destroy_process_group()


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run the command line ``argv`` (without the program name) again as ``nproc`` torchrun
    processes on this machine, leaving out its ``--nproc``; return their exit code."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "cryosplat", *args]
    print(f"launching {nproc} processes: {' '.join(cmd)}", file=sys.stderr)
    return subprocess.run(cmd).returncode
