"""How many parameter points :mod:`landscape.evaluate` pushes through the network per pass, and
in what pieces of the batch: the memory a point costs (measured by running the forward once
under a dispatch mode that counts output bytes), the default memory budget of a device, and the
CPU plan (points per pass and micro-batch size that keep the working set in cache).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ._functional import ModelLoss

_CPU_BUDGET = 256 * 2**20
#: Bytes of intermediates one forward pass may produce on a CPU before ``micro_batch="auto"``
#: cuts the batch into pieces (a few MiB per tensor: they stay near the caches, and glibc
#: reuses their memory instead of returning it to the OS and faulting it in again).
WORKING_SET = 16 * 2**20
#: Bytes of intermediates (the upper bound of :func:`bytes_per_point`, whole batch) that the
#: points of one stacked pass of a plain MLP may produce on a CPU; at most :data:`MAX_STACK`
#: points. For MLP 40-64-64-10 on 4,000 samples (4.2 MiB a point) 8 and 16 points a pass were
#: equally fast, 3 (the :data:`WORKING_SET` share) 1.25x slower, one point 1.4x slower.
STACK_BYTES = 48 * 2**20
MAX_STACK = 16
#: Smallest micro-batch the automatic plan uses (keeps matmuls large).
MIN_MICRO_BATCH = 512


class _OutputBytes(TorchDispatchMode):
    """Adds up the bytes of every tensor the operations inside the block produce."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.bytes += sum(t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, Tensor))
        return out


def _forward_bytes(model_loss: ModelLoss) -> tuple[int, int]:
    """``(bytes, n)``: bytes of every tensor that one forward pass and loss produce on the first
    batch, and that batch's size. An upper bound on its memory: it sums intermediates that a
    no-grad pass frees early."""
    inputs, targets = next(iter(model_loss.batches))
    counter = _OutputBytes()
    with torch.no_grad(), model_loss.mode(), counter:
        model_loss.batch_loss(model_loss.theta, inputs, targets)
    return counter.bytes, len(targets)


def _parameter_set_bytes(model_loss: ModelLoss) -> int:
    return 2 * model_loss.num_params * (torch.finfo(model_loss.dtype).bits // 8)


def bytes_per_point(model_loss: ModelLoss) -> int:
    """Memory (bytes) one grid point costs: its parameter set plus every intermediate tensor of
    one forward pass and loss on the first batch (an upper bound)."""
    return _forward_bytes(model_loss)[0] + _parameter_set_bytes(model_loss)


def default_memory_budget(device: torch.device) -> int:
    """Bytes a chunk of grid points may use: half the free memory of a CUDA device, 256 MiB on
    other devices."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return _CPU_BUDGET


def _check_budget(memory_budget: int | None, device: torch.device) -> int:
    budget = default_memory_budget(device) if memory_budget is None else int(memory_budget)
    if budget <= 0:
        raise ValueError(f"memory_budget: must be a positive number of bytes (got {memory_budget!r})")
    return budget


def choose_chunk_size(model_loss: ModelLoss, num_points: int, memory_budget: int | None = None) -> int:
    """How many grid points to evaluate in one vmapped pass under ``memory_budget`` bytes."""
    budget = _check_budget(memory_budget, model_loss.device)
    return int(max(1, min(num_points, budget // max(1, bytes_per_point(model_loss)))))


def _cpu_plan(per_sample: float, batch: int, stackable: bool = False) -> tuple[int, int | None]:
    """``(chunk, micro_batch)`` on a CPU: one point per pass (no vmap) and, when one forward
    pass would produce more than :data:`WORKING_SET` bytes, pieces of at least
    :data:`MIN_MICRO_BATCH` samples that stay under it. A ``stackable`` model (plain MLP, see
    :meth:`_Network.outputs_stacked`) goes uncut, as many points per pass as fit in
    :data:`STACK_BYTES` (at least one, at most :data:`MAX_STACK`): fewer, larger operations
    (the small benchmark MLP spent most of a one-point pass in per-operation overhead), and
    its intermediates live in buffers reused from pass to pass, so a whole batch no longer
    faults its memory in at every point (40-512-512-10: uncut 1.17x loss-landscapes, pieces
    of 2,000 samples 1.06x).

    On CPUs a point's forward pass is already a set of matmuls that run near peak; stacking
    points with vmap made them batched matmuls over larger intermediates, 2x slower for both
    benchmark MLPs. For the large one (40-512-512-10, 4,000 samples, 33 MiB per pass), pieces
    of 2,000 samples took 10.5 ms per point against 15 ms uncut, most of the difference page
    faults (see ``benchmarks/bench_surface.py``).
    """
    per_sample = max(per_sample, 1.0)
    if stackable:  # its intermediates live in reused buffers: no page faults to cut the batch for
        return int(max(1, min(MAX_STACK, STACK_BYTES // (per_sample * batch)))), None
    micro = int(max(MIN_MICRO_BATCH, WORKING_SET // per_sample))
    return 1, (None if micro >= batch else micro)
