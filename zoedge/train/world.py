"""Data-parallel training on ``torch.distributed``: the ranks of one run and the few scalars they exchange.

ZO training parallelises over the batch almost for free: every rank streams its
own copy of the model, evaluates the *same* perturbations (same seeds) on its
shard of the global batch, and the ranks all-reduce only each pass's
``(loss · count, count)``, so the loss is the mean over the global batch (exact
for uneven shards). Every rank then applies the identical update; weights are
never exchanged. First-order blocks (LoHO, HZO) all-reduce their gradients,
flattened into one bucket after their backward.

The launcher owns the processes and the rendezvous: ``torchrun`` or
``accelerate launch`` set ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``, and :meth:`World.from_env` joins the
process group (``nccl`` when training on CUDA, ``gloo`` otherwise). With no
such variables (or a world of one) nothing is initialised and every method is
the identity, so single-process runs are unchanged bit for bit.

With ``--dp-mode directions`` (plugins with q > 1 independent directions per
step, such as MeZO with ``--opt q=4``) the ranks split the *directions* instead
(:class:`DirectionSplit`): rank r evaluates directions ``shard_bounds(q)[r]``
(contiguous, sizes differing by at most one) on the whole batch, the ranks
all-gather their passes' losses (one padded float64 vector each), and every
rank hands all the losses to the plugin, which regenerates every direction's
noise in ``apply``: each rank computes exactly what one process computes, bit
for bit.

Only rank 0 writes (checkpoints, metrics, summary, exported model); every rank
reads the same checkpoint on resume. Every ``check_every`` steps the ranks
compare an exact integer checksum of the trained state (:func:`state_checksum`)
and stop with a :class:`~zoedge.errors.TrainingError` naming the step if they
diverged. A collective that fails (a rank died) or times out (``timeout_s``)
becomes a :class:`~zoedge.errors.TrainingError` naming the lost rank(s) when the
rendezvous store can tell (each rank marks itself alive there).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch

from zoedge.errors import ConfigError, TrainingError

T = TypeVar("T")
RESUME_HINT = "check the lost rank's log, then relaunch the same command on every rank with --resume"


class World:
    """The ranks of a data-parallel run (a world of one when not launched by a distributed launcher).

    Args:
        rank, size: this process's rank and the number of ranks.
        device: where collectives' tensors live (CUDA for ``nccl``, CPU for ``gloo``).
        check_every: compare the state checksum every this many steps (0: only after a resume).
        group: whether a process group was initialised by :meth:`from_env` (closed by :meth:`close`).
    """

    def __init__(self, rank: int = 0, size: int = 1, device: torch.device | str = "cpu", check_every: int = 50,
                 group: bool = False) -> None:
        self.rank, self.size = rank, size
        self.device = torch.device(device)
        self.check_every = check_every
        self._group = group
        self.bytes_reduced = 0  # payload bytes of this rank's collectives so far (benchmarks read it)
        self.step = 0           # the step in progress, for error messages (set by the trainer)

    # ------------------------------------------------------------------ setup
    @classmethod
    def from_env(cls, device: str = "cpu", timeout_s: float = 1800.0, check_every: int = 50) -> World:
        """Join the process group a launcher described in the environment (a world of one if none).

        Args:
            device: the training device: ``cuda`` becomes ``cuda:LOCAL_RANK`` and the backend ``nccl`` (other
                accelerators: torch's default backend for them).
            timeout_s: how long a collective waits for a silent rank before failing.
            check_every: see the class.

        Raises:
            ConfigError: a malformed ``WORLD_SIZE`` / ``RANK``.
        """
        try:
            size = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
        except ValueError as e:
            raise ConfigError("WORLD_SIZE / RANK", f"not integers ({e})",
                              "launch with torchrun or accelerate launch, or unset them") from e
        if size <= 1:
            return cls(check_every=check_every)
        if not 0 <= rank < size:
            raise ConfigError("RANK", f"{rank} is outside 0..{size - 1}", "let the launcher set RANK and WORLD_SIZE")
        import torch.distributed as dist
        comm = torch.device("cpu")
        kind = torch.device(device).type
        if kind != "cpu":  # each rank on its own accelerator: the launcher's LOCAL_RANK
            comm = torch.device(kind, int(os.environ.get("LOCAL_RANK", "0")))
            torch.accelerator.set_device_index(comm.index)
        backend = dist.Backend.default_device_backend_map.get(comm.type, "gloo")  # gloo on CPU, nccl on CUDA
        if not dist.is_initialized():
            dist.init_process_group(backend, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
        world = cls(rank, size, comm, check_every, group=True)
        world._mark_alive()
        return world

    def train_device(self, device: str) -> str:
        """The device this rank trains on: ``cuda`` (no index) becomes this rank's GPU."""
        if self.size > 1 and device == self.device.type != "cpu":
            return str(self.device)
        return device

    def close(self) -> None:
        if self._group:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
            self._group = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that writes files and logs."""
        return self.rank == 0

    # ------------------------------------------------------------------ data
    def shard_bounds(self, n: int) -> list[tuple[int, int]]:
        """``[start, stop)`` of every rank's contiguous share of ``n`` items (sizes differ by at most one)."""
        q, r = divmod(n, self.size)
        starts = [k * q + min(k, r) for k in range(self.size + 1)]
        return list(zip(starts[:-1], starts[1:]))

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of ``items``."""
        a, b = self.shard_bounds(len(items))[self.rank]
        return list(items[a:b])

    # ----------------------------------------------------------- collectives
    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over ranks of a float64 CPU vector (the identity in a world of one)."""
        if self.size == 1:
            return values
        buf = values.to(self.device, torch.float64)
        self._collective("all_reduce", lambda d: d.all_reduce(buf))
        self.bytes_reduced += buf.numel() * buf.element_size()
        return buf.cpu()

    def mean_losses(self, losses: Sequence[torch.Tensor], count: int, extra: Sequence[float] = ()
                    ) -> tuple[torch.Tensor, float, list[float]]:
        """Global-batch means of per-pass losses that are means over this rank's ``count`` items.

        One all-reduce of ``[loss_p · count ..., count, extra ...]`` in float64.

        Returns:
            (fp32 CPU tensor of one mean per pass, global count, ``extra`` summed over ranks).
        """
        local = torch.stack([x.detach() for x in losses]).float().cpu()
        if self.size == 1:
            return local, float(count), list(extra)
        vec = torch.cat([local.double() * count, torch.tensor([float(count), *extra], dtype=torch.float64)])
        out = self.all_reduce_sum(vec)
        n = len(losses)
        total = float(out[n])
        return (out[:n] / total).float(), total, out[n + 1:].tolist()

    def all_reduce_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Sum the gradients of ``params`` over ranks, as one flattened bucket."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.size == 1 or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._collective("all_reduce of first-order gradients", lambda d: d.all_reduce(flat))
        self.bytes_reduced += flat.numel() * flat.element_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def all_gather(self, values: torch.Tensor, length: int) -> list[torch.Tensor]:
        """Every rank's float64 CPU vector (each at most ``length`` long; padded for the collective), in rank order.

        Returns:
            one float64 CPU vector per rank (the identity in a world of one), each as long as the rank's own.
        """
        if self.size == 1:
            return [values.double()]
        buf = torch.full((length + 1,), float("nan"), dtype=torch.float64)
        buf[0] = values.numel()
        buf[1:1 + values.numel()] = values.double()
        mine = buf.to(self.device)
        got = [torch.empty_like(mine) for _ in range(self.size)]
        self._collective("all_gather of pass losses", lambda d: d.all_gather(got, mine))
        self.bytes_reduced += mine.numel() * mine.element_size() * self.size
        return [g.cpu()[1:1 + int(g[0])] for g in got]

    def barrier(self) -> None:
        if self.size > 1:
            self._collective("barrier", lambda d: d.barrier())

    def check_consistent(self, checksum: int, when: str) -> None:
        """Stop unless every rank has the same ``checksum`` of its trained state.

        Raises:
            TrainingError: the ranks' checksums differ (on every rank).
        """
        if self.size == 1:
            return
        mine = torch.tensor([checksum], dtype=torch.int64, device=self.device)
        got = [torch.zeros_like(mine) for _ in range(self.size)]
        self._collective("checksum all_gather", lambda d: d.all_gather(got, mine))
        self.bytes_reduced += 8 * self.size
        sums = [int(g.item()) for g in got]
        if len(set(sums)) > 1:
            odd = [r for r, s in enumerate(sums) if s != sums[0]]
            raise TrainingError(f"rank {self.rank}, {when}", f"the ranks' trained states diverged (ranks {odd} differ "
                                f"from rank 0; checksums {sums})",
                                "every rank must run the same zoedge version, data, options and seed on the same "
                                "kind of device; resume from the last checkpoint")

    # -------------------------------------------------------------- failures
    def _store(self) -> Any:
        from torch.distributed import distributed_c10d as c10d
        return c10d._get_default_store()

    def _mark_alive(self) -> None:
        """Leave a key in the rendezvous store that a dead rank cannot renew (see :meth:`_lost_ranks`)."""
        try:
            self._store().set(f"zoedge/alive/{self.rank}", str(os.getpid()))
        except Exception:  # noqa: BLE001 - the liveness probe is best effort
            pass

    def _lost_ranks(self) -> list[int] | None:
        """After a failed collective: the ranks that did not answer a fresh roll call (None if the store is gone)."""
        import time
        try:
            store = self._store()
            key = f"zoedge/rollcall/{self.step}"
            store.set(f"{key}/{self.rank}", "1")
            deadline = time.monotonic() + 5.0
            missing = list(range(self.size))
            while time.monotonic() < deadline:
                missing = [r for r in range(self.size) if not store.check([f"{key}/{r}"])]
                if not missing:
                    break
                time.sleep(0.1)
            return missing
        except Exception:  # noqa: BLE001 - the store lives in a process that may be gone too
            return None

    def _collective(self, what: str, fn: Callable[[Any], Any]) -> None:
        import torch.distributed as dist
        try:
            fn(dist)
        except (RuntimeError, dist.DistError) as e:
            lost = self._lost_ranks()
            who = (f"rank(s) {lost} stopped answering" if lost else
                   "the rendezvous store is gone too (its host, rank 0 or the launcher, probably died)")
            raise TrainingError(f"rank {self.rank}, step {self.step}", f"{what} failed: {who} "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                                RESUME_HINT) from e


class DirectionSplit:
    """Direction-split data parallelism: each rank evaluates its share of a step's directions on the whole batch.

    Rank r takes directions ``world.shard_bounds(q)[r]`` of the plugin's ``direction_passes()`` (uneven q / N
    splits differ by one direction) and streams :meth:`ZOOptimizer.only_directions`'s view: those directions'
    passes, plus the passes of no direction (every rank runs them). :meth:`gather` puts every rank's pass losses
    back in the plugin's pass order, so ``end_step`` sees exactly the losses of one process.

    Args:
        optimizer: a built plugin (:class:`~zoedge.optim.base.ZOOptimizer`).
        world: the ranks.

    Raises:
        ConfigError: the plugin cannot split its passes, trains first-order blocks, or has fewer directions than
            there are ranks; each message names ``--dp-mode`` and the fix.
    """

    def __init__(self, optimizer: Any, world: World) -> None:
        from zoedge.errors import PluginError
        who = f"--dp-mode directions with optimizer '{optimizer.name or type(optimizer).__name__}'"
        groups = optimizer.direction_passes()
        if groups is None:
            raise ConfigError(who, "the plugin cannot split its passes by direction (it declares no "
                              "direction_passes())", "use --dp-mode batch (the default) with this optimizer")
        if world.size > len(groups):
            raise ConfigError(who, f"{len(groups)} direction(s) per step cannot be split across {world.size} ranks",
                              f"use --opt q={world.size} or more, fewer ranks, or --dp-mode batch")
        self.world, self.passes, self.groups = world, optimizer.passes, groups
        a, b = world.shard_bounds(len(groups))[world.rank]
        try:
            self.visitor, self.order = optimizer.only_directions(range(a, b))
        except PluginError as e:
            raise ConfigError(who, str(e), "use --dp-mode batch with this optimizer") from e
        self.directions = range(a, b)
        # the longest share of passes: the most directions' passes plus the passes of no direction
        shared = self.passes - sum(len(g) for g in groups)
        self.longest = max(sum(len(g) for g in groups[x:y]) for x, y in world.shard_bounds(len(groups))) + shared

    def gather(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        """This rank's pass losses (means over the whole batch) → every pass's loss, fp32, in the plugin's order.

        Each rank sends ``(pass, loss)`` pairs (float64: exact for both); a pass every rank ran (no direction)
        takes rank 0's value, the same as the others' (same weights, same batch).
        """
        local = torch.stack([x.detach() for x in losses]).float().cpu()
        pairs = torch.stack([torch.tensor(self.order, dtype=torch.float64), local.double()], 1).reshape(-1)
        out, seen = torch.zeros(self.passes), torch.zeros(self.passes, dtype=torch.bool)
        for got in reversed(self.world.all_gather(pairs, 2 * self.longest)):  # rank 0 last: its shared passes win
            index, values = got.view(-1, 2).unbind(1)
            out[index.long()], seen[index.long()] = values.float(), True
        if not seen.all():
            raise TrainingError(f"rank {self.world.rank}, step {self.world.step}",
                                f"no rank evaluated passes {(~seen).nonzero().flatten().tolist()}",
                                "every rank must run the same zoedge version, options and world size")
        return out


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 when not launched by torchrun / accelerate launch)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def state_checksum(model: Any, extra: Sequence[torch.Tensor] = ()) -> int:
    """An exact, order-independent integer checksum of the model's working copy and ``extra`` tensors.

    The bytes of each block are read as int32 words and summed in int64 (integer sums are exact, so ranks with
    bit-identical state agree whatever the reduction order), weighted by the block's position.
    """
    model.synchronize()
    total = 0
    tensors = [model._read_block(i) for i in range(len(model.blocks))] + [t.detach() for t in extra]
    for k, t in enumerate(tensors, start=1):
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        pad = (-raw.numel()) % 4
        if pad:
            raw = torch.cat([raw, raw.new_zeros(pad)])
        total += k * int(raw.view(torch.int32).to(torch.int64).sum())
    return total
