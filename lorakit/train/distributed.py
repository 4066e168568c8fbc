"""Data-parallel training on ``torch.distributed``: what ``train`` does when it runs in several processes.

Launch ``lorakit train`` (or a script calling ``lorakit.train.loop.train``) under ``torchrun``::

    torchrun --nproc-per-node 2 -m lorakit.cli train --max-steps 40

Every process holds the whole model and reads the whole dataset; the processes differ only in which
examples they run. The run is defined as the single-process run with ``--batch-size`` times the
number of processes: each micro-batch of that run is cut into one share per process, each process
computes the gradient of its share of the loss (summed over its labels, divided by the label count
of the *whole* micro-batch), and one all-reduce (a sum) per optimizer step gives every process the
gradient the single process would have computed, up to the order of the additions. The processes
then take the same AdamW step and stay identical without ever sending weights.

Why no ``DistributedDataParallel``: with LoRA the gradients to exchange are the adapters' (2.4M
numbers on the embedded model, 1.8% of the base), one flat buffer summed once per step costs a few
milliseconds, and doing it by hand keeps the loop readable and the exchange visible. Full
fine-tuning exchanges every weight's gradient in buckets of ``BUCKET_NUMEL`` numbers.

The first process (rank 0) writes everything: the run directory, the log, checkpoints, the adapter.
Evaluations are shared: each process scores and generates for every ``world``-th held-out example,
and the sums (loss, answer tokens, correct answers) are combined (``lorakit.train.loop``). A resume needs the same
number of processes (the data order depends on the global batch). Ctrl-C in any process stops all
of them after the same step: the stop request travels with the gradients.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch

#: The most gradient numbers summed in one all-reduce (64 MB of fp32): full fine-tuning's 135M
#: gradients go in a few buckets instead of one buffer as big as the model.
BUCKET_NUMEL = 16 * 1024 * 1024


@dataclass
class Dist:
    """Where this process stands: ``world`` processes, this one is ``rank``. World 1 is a plain run,
    where every method does nothing (so the training loop reads the same in both cases)."""

    world: int = 1
    rank: int = 0

    @property
    def main(self) -> bool:
        """The process that writes files and speaks (logs, progress bar, tables)."""
        return self.rank == 0

    def share(self, items: list[Any]) -> list[Any]:
        """This process's share of a global micro-batch or of the held-out examples (every
        ``world``-th item from ``rank``): a batch's items are sorted by length, so the shares get
        similar lengths."""
        return items[self.rank :: self.world]

    def sum_gradients(self, params: list[torch.Tensor], extras: list[float]) -> list[float]:
        """Sum every parameter's ``.grad`` (a missing one counts as zeros) and the numbers in
        ``extras`` over all processes, in place; returns the summed extras."""
        if self.world == 1:
            return list(extras)
        import torch.distributed as dist

        for p in params:
            if p.grad is None:  # a process whose share was empty: it still takes part with zeros
                p.grad = torch.zeros_like(p)
        for bucket in _buckets(params):
            grads = [p.grad for p in bucket]
            alone = len(grads) == 1 and grads[0].is_contiguous()  # summed where it lies
            flat = grads[0] if alone else torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            if not alone:
                offset = 0
                for g in grads:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
        return self.sum(extras)

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed over all processes (in float64: token counts and losses exactly)."""
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        summed = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(summed)
        return summed.tolist()

    def broadcast_parameters(self, params: list[torch.Tensor]) -> None:
        """Copy rank 0's values of ``params`` to every process (the start of a run: the adapters are
        initialised from the same seed everywhere; this makes sure of it)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process (a picklable object)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (on every process)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _buckets(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``params`` in order, cut into runs of at most ``BUCKET_NUMEL`` numbers of one dtype (a larger
    tensor gets a bucket of its own)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for p in params:
        if buckets and size + p.numel() <= BUCKET_NUMEL and buckets[-1][0].grad.dtype == p.grad.dtype:
            buckets[-1].append(p)
            size += p.numel()
        else:
            buckets.append([p])
            size = p.numel()
    return buckets


def setup() -> Dist:
    """The process group this process belongs to.

    Already initialised (by the caller, or by an earlier ``train`` in this process): use it.
    Otherwise started from torchrun's environment (``WORLD_SIZE`` > 1, with ``RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``), with the gloo backend (CPU tensors; lorakit trains on the
    CPU), and kept until the process exits: a second ``train`` in the same script uses it again
    (starting a group anew from the same address raced with the old one's teardown and could hang).
    Neither: a single process.

    Raises:
        RuntimeError: ``WORLD_SIZE`` says several processes but the rest of the environment is
            missing (started by hand instead of by torchrun).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Dist(world=dist.get_world_size(), rank=dist.get_rank())
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None
    if world <= 1:
        return Dist()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the processes with "
                           "torchrun (e.g. torchrun --nproc-per-node 2 -m lorakit.cli train ...)")
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed: run in a single process")
    init_gloo()
    atexit.register(close_group)  # while the interpreter is still whole (see init_gloo)
    return Dist(world=dist.get_world_size(), rank=dist.get_rank())


def init_gloo(**kwargs: Any) -> None:
    """``init_process_group("gloo", **kwargs)``, such that destroying the group really ends it.

    ``torch.distributed.nn.functional`` takes the default group (``group=group.WORLD``) as a default
    argument of its functions when it is first imported; transformers imports it while it loads a
    model. Imported after the group starts, those defaults keep the group alive through
    ``destroy_process_group``, and gloo's threads then run on into interpreter shutdown, where one of
    them freeing a tensor aborts the process ("terminate called without an active exception",
    SIGABRT; seen in 5 of 13 torchrun runs stopped by a second Ctrl-C). Imported first (it costs ~2
    ms), the defaults are None and nothing but the group's own handle holds it.
    """
    import importlib

    import torch.distributed as dist

    importlib.import_module("torch.distributed.nn")
    dist.init_process_group(backend="gloo", **kwargs)


def close_group() -> None:
    """Destroy the default process group, if one is up, such that its gloo threads end now.

    ``destroy_process_group`` drops torch's own references to the group; gloo's threads end when
    the last one goes. A reference held by a garbage cycle (a frame kept by a caught exception's
    traceback, say) keeps them running until the collector next runs, which at interpreter exit
    may be too late (see ``init_gloo``): the collector runs here, so they end with the call."""
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()
