"""Multi-process training with `torchrun`: process group set-up, rank queries, DDP wrapping, samplers.

`torchrun --nproc_per_node=N ...` starts N copies of a program and tells each its place through
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). A program calls
`init_from_env(device)` once, early: it joins the process group (NCCL on CUDA, gloo on CPU) and
returns the device this process trains on (`cuda:LOCAL_RANK` on CUDA). Without torchrun's variables
it does nothing, so the same program runs single-process unchanged.

Everything else here is a no-op, or the single-process answer, when no process group of more
than one process is initialised: `rank()` is 0, `world_size()` is 1, `is_main()` is True,
`barrier()` returns at once, `broadcast_object(x)` returns x and `all_gather_object(x)` [x].
"""
from __future__ import annotations

import atexit
import contextlib
import os
from datetime import timedelta
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

DEFAULT_TIMEOUT_S = 3 * 3600.0  # rank 0 evaluates and exports alone while the others wait
ENV_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def _env_int(name: str) -> int:
    text = os.environ[name]
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}: expected an integer (set by torchrun), "
                         f"found {text!r}") from None


def launched_by_torchrun() -> bool:
    """True when torchrun's RANK and WORLD_SIZE variables are set for this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_processes() -> int:
    """How many processes torchrun started for this run (its WORLD_SIZE), 1 without torchrun;
    known before the process group is joined."""
    return _env_int("WORLD_SIZE") if launched_by_torchrun() else 1


def init_from_env(device: str | torch.device | None = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the torchrun process group (once) and return this process's device.

    Args:
        device: "cpu", "cuda" (under torchrun: `cuda:LOCAL_RANK`), "cuda:K", or None for CUDA
            when available, else CPU.
        timeout_s: how long a collective waits for the other processes (seconds).
    Returns:
        the torch.device to train on; without torchrun's variables, `device` resolved.
    Raises:
        ValueError: malformed RANK / WORLD_SIZE / LOCAL_RANK, an explicit `cuda:K` while several
            processes share the node, or fewer GPUs than processes on the node.
    """
    resolved = parse_device(device)
    if not launched_by_torchrun():
        return resolved
    rank_, size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank_
    if not 0 <= rank_ < size:
        raise ValueError(f"environment: RANK must be in 0..WORLD_SIZE-1, found RANK={rank_}, WORLD_SIZE={size}")
    if resolved.type == "cuda":
        resolved = _local_cuda_device(resolved, local_rank)
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank_, world_size=size, timeout=timedelta(seconds=timeout_s))
        atexit.register(_destroy)
    return resolved


def parse_device(device: str | torch.device | None) -> torch.device:
    """`None`/"auto" -> CUDA when available, else CPU; otherwise the named device (not checked
    against this machine: under torchrun the local rank decides which GPU, see `init_from_env`).

    Raises ValueError for a malformed name.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device: expected e.g. cpu, cuda or cuda:1, found {device!r} ({err})") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`parse_device`, and a CUDA device only where CUDA is available (ValueError otherwise)."""
    resolved = parse_device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    return resolved


def _local_cuda_device(device: torch.device, local_rank: int) -> torch.device:
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.index is not None:
        if per_node > 1:
            raise ValueError(f"device {device}: with {per_node} processes per node each takes cuda:LOCAL_RANK; "
                             f"give the device as 'cuda' and pick GPUs with CUDA_VISIBLE_DEVICES")
        return device
    available = torch.cuda.device_count()
    if local_rank >= available:
        raise ValueError(f"LOCAL_RANK={local_rank} needs GPU {local_rank}, but this node has {available} GPU(s): "
                         f"start at most {available} processes per node (--nproc_per_node)")
    return torch.device("cuda", local_rank)


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class EveryRankError(ValueError):
    """Bad input that every rank raises alike (rank 0 looked, and broadcast what it found): the
    command line prints it once, on rank 0."""


def raise_on_every_rank(problem: str | None) -> None:
    """Broadcast rank 0's `problem` (None: none) and raise it as an `EveryRankError` on every rank.
    Every rank must call it at the same point."""
    problem = broadcast_object(problem)
    if problem is not None:
        raise EveryRankError(problem)


@contextlib.contextmanager
def checked_on_every_rank():
    """Run the checks in the block on every rank and stop every rank on the first bad input any
    rank found (a ValueError or OSError): said once, by rank 0, naming the rank where not its own,
    instead of once per rank. Not distributed: the error passes through as it is. Every rank must
    reach the end of the block (a collective gathers what each found)."""
    problem = None
    try:
        yield
    except (ValueError, OSError) as error:
        if not is_distributed():
            raise
        problem = str(error)
    found = [(index, text) for index, text in enumerate(all_gather_object(problem)) if text is not None]
    if found:
        index, text = found[0]
        raise EveryRankError(text if index == 0 else f"{text} (on rank {index})")


def is_distributed() -> bool:
    """True when a process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes in the group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the one process that writes files and prints progress."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process got here (no-op when not distributed)."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """`value` as rank `src` has it, on every rank (any picklable object; no-op when not distributed)."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's `value` (any picklable object), in rank order, on every rank; `[value]` when not
    distributed."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of `values` (float Tensor[*], same shape on every rank) over the ranks.

    A NaN or infinity on any rank makes the result non-finite on every rank. Returns `values`
    itself when not distributed.
    """
    if not is_distributed():
        return values
    reduced = values.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / dist.get_world_size()


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Replace each gradient by its mean over the ranks, as DDP's all-reduce would have (for the
    batches that ran under `no_sync` and were not followed by a synchronised one). Every rank must
    hold gradients for the same parameters."""
    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    for grad in grads:
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
    if grads:
        torch._foreach_div_(grads, dist.get_world_size())


def shared_seed() -> int:
    """A random seed drawn from rank 0's torch generator and given to every rank."""
    return int(broadcast_object(int(torch.randint(0, 2**31 - 1, ()).item())))


def distributed_sampler(dataset: Dataset, shuffle: bool = True, seed: int | None = None,
                        drop_last: bool = False) -> DistributedSampler:
    """A `DistributedSampler` giving this rank its 1/world_size share of `dataset`.

    Every rank draws the same permutation (from `seed`, or a `shared_seed()` when None) and takes
    every world_size-th entry from its rank on, so the ranks' batch j together hold the same
    images as batch j of a single-process run over the same permutation. Without drop_last the
    permutation is padded with its first entries to a multiple of world_size. Call
    `set_epoch(epoch)` each epoch (`engine.Trainer` does) for a new permutation.
    Works single-process too (one replica: the whole permutation).
    """
    return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle,
                              seed=shared_seed() if seed is None else seed, drop_last=drop_last)


def local_device(device: torch.device) -> torch.device:
    """Under a process group, a bare "cuda" means this process's GPU (`torch.cuda.current_device()`)."""
    if is_distributed() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def wrap_model(model: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """`model` (already on `device`) in DistributedDataParallel, which averages gradients across
    the ranks during backward and copies rank 0's parameters and buffers to every rank now."""
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)
