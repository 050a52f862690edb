"""Process-group setup for one process or many (torchrun), and the few collectives the trainer needs.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `python main.py` has none of them and runs as a
world of one without any process group. GPUs talk over nccl, CPU processes over gloo.
"""

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The World torchrun describes in the environment (a world of one without torchrun)."""
    return World(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def init_distributed(world: World, device: torch.device):
    """Join the process group (nccl on CUDA, gloo on CPU) when there is more than one process."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world.is_distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size, **kwargs)


def shutdown_distributed():
    """Leave the process group. The model's reference cycles (FSDP's hooks and states hold tensors and
    communication handles) are collected first, while the group and the interpreter are still whole: left
    to the interpreter's exit, gloo's objects are freed during its teardown, which can abort the process."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum `tensor` over all processes in place (a no-op for a world of one); returns it."""
    if world.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor, world: World) -> torch.Tensor:
    return all_reduce_sum(tensor, world).div_(world.size)


def all_gather_objects(obj, world: World) -> list:
    """Every process's `obj` (picklable), indexed by rank."""
    if not world.is_distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World):
    if world.is_distributed:
        dist.barrier()


def broadcast_object(obj, world: World):
    """Rank 0's `obj` on every process."""
    if not world.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
