"""The decoder layers of a CPU step as concurrent chains on worker threads, with no barrier per layer.

torch's intra-op threads split every operation evenly and wait for each other at its end. On a quiet box that
is efficient; when another process keeps one of the cores busy, the thread sharing that core gets about half of
it and every operation waits for it, so a step on two threads is slower than on one (the thread policy then
chooses one thread, and the shared core's other half goes unused). Here the decoder layers' work is cut into
items that wait for nothing but their own inputs, taken by ``workers`` single-threaded workers, each pinned to
one of the process's cores (on larger boxes, a few workers of several threads each): a worker on a shared core
simply takes fewer items.

* A *chain* ``(p, c)`` is pass ``p``'s hidden state of row chunk ``c`` of the batch (rows are independent
  through a decoder layer). Its item at layer ``j`` runs layer ``j`` on it.
* ``prep(j)`` makes layer ``j`` resident: the visitor's ``on_resident`` (the lazy update, the noise draw) and
  ``pass_tensors`` for every pass, each pass's weights formed into its own buffers.
* ``done(j)`` runs after the last chain has left layer ``j``: the visitor's ``on_passes_done``.

A free worker takes, in this order: a ``done`` that is due, the next ``prep`` (layer ``j`` may be prepared once
layer ``j - SLOTS`` is done: at most :data:`SLOTS` layers are resident, each in its own set of workspaces), the
chain furthest behind among those whose next layer is prepared. ``prep`` and ``done`` run one at a time, in
layer order (the visitor's hooks never run concurrently with each other, only with forward passes); the chains
are independent. The caller's thread only waits.

Results are the sequential loop's: every chain sees the same weights, and a decoder layer computes each row of
the batch from that row alone. Only the rounding of the matrix kernels may differ, since they run on fewer rows
at a time, by a unit in the last place where they do (the demo's losses were bit-identical on this project's
box). ``tests/test_pipeline.py`` checks the closeness, and that a concurrent run repeats itself bit for bit.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import torch

#: layers resident at once (prepared and not yet done): each has its own workspaces
SLOTS = 3
#: row chunks a pass's batch is cut into (more chains balance better, smaller items run less efficiently)
ROW_CHUNKS = 2

Tensors = Mapping[str, torch.Tensor]


def row_ranges(rows: int, chunks: int = ROW_CHUNKS) -> list[tuple[int, int]]:
    """``chunks`` contiguous row ranges covering ``rows`` rows (fewer when there are fewer rows)."""
    n = max(1, min(chunks, rows))
    return [(k * rows // n, (k + 1) * rows // n) for k in range(n)]


class LayerPipeline:
    """Runs ``layers`` layers over ``len(states)`` chains (see the module docstring).

    Args:
        layers: decoder layers to run, in order (indices 0..layers-1 here).
        states: each chain's input state.
        pass_of: each chain's pass (which of ``prep``'s mappings it runs with).
        prep: ``prep(j, slot)`` makes layer ``j`` resident in workspace set ``slot`` and returns the weights of
            every pass.
        step: ``step(worker, j, chain, weights, state)`` runs layer ``j`` on a chain's state, returns the new one.
        done: ``done(j)`` after every chain has run layer ``j``.
        workers: worker threads.
        worker_threads: each worker's intra-op threads (1: single-threaded workers, each pinned to one of ``cpus``
            when there is one core per worker; otherwise the OS places them).
        cpus: the cores this process may use (default its affinity).
    """

    def __init__(self, layers: int, states: Sequence[torch.Tensor], pass_of: Sequence[int],
                 prep: Callable[[int, int], Sequence[Tensors]],
                 step: Callable[[int, int, int, Tensors, torch.Tensor], torch.Tensor],
                 done: Callable[[int], None], workers: int, worker_threads: int = 1,
                 cpus: Sequence[int] | None = None) -> None:
        self.layers, self.states, self.pass_of = layers, list(states), list(pass_of)
        self.prep, self.step, self.done = prep, step, done
        self.workers, self.worker_threads = max(1, workers), max(1, worker_threads)
        if cpus is None:
            try:
                cpus = sorted(os.sched_getaffinity(0))
            except (AttributeError, OSError):
                cpus = []
        # pin only single-threaded workers, one per core: a pinned worker's intra-op threads would share its core,
        # and with fewer workers than cores (e.g. ranks sharing a box) every process would pin to the same ones
        self.cpus = list(cpus) if self.worker_threads == 1 and len(cpus) == self.workers else []
        self._cond = threading.Condition()
        self._progress = [0] * len(self.states)   # layers each chain has run
        self._held = [False] * len(self.states)   # a worker is running the chain's next layer
        self._prepared = 0                        # layers whose prep finished
        self._done = 0                            # layers whose done finished
        self._hook = False                        # a prep or done is running
        self._weights: dict[int, Sequence[Tensors]] = {}
        self._error: BaseException | None = None
        #: after :meth:`run`: seconds the workers spent in each kind of item (summed over workers), ``idle`` the
        #: rest of workers × ``wall`` (waiting for an item), ``wall`` the run's own duration
        self.seconds = {"prep": 0.0, "chain": 0.0, "done": 0.0, "idle": 0.0, "wall": 0.0}

    def run(self) -> list[torch.Tensor]:
        """Run every layer on every chain; the chains' final states. Raises what a worker raised."""
        if self.layers == 0:
            return self.states
        threads = [threading.Thread(target=self._work, args=(w,), name=f"zoedge-layers-{w}", daemon=True)
                   for w in range(self.workers)]
        own = torch.get_num_threads()
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException as e:  # e.g. Ctrl-C: stop the workers after their current item before it propagates
            with self._cond:
                self._error = self._error or e
                self._cond.notify_all()
            for t in threads:
                t.join()
            raise
        finally:
            torch.set_num_threads(own)  # the workers set their own count; the caller keeps what it had
        wall = self.seconds["wall"] = time.perf_counter() - t0
        self.seconds["idle"] = max(0.0, self.workers * wall - sum(self.seconds[k] for k in ("prep", "chain", "done")))
        if self._error is not None:
            raise self._error
        return self.states

    # ------------------------------------------------------------------ workers
    def _work(self, w: int) -> None:
        torch.set_num_threads(self.worker_threads)  # this thread's intra-op threads: the caller keeps its own
        if self.cpus:
            os.sched_setaffinity(0, {self.cpus[w]})  # this thread only (0: the calling thread)
        with torch.no_grad():
            while (item := self._take()) is not None:
                t0 = time.perf_counter()
                try:
                    self._run(w, item)
                except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                    with self._cond:
                        self._error = self._error or e
                        self._cond.notify_all()
                    return
                self._finish(item, time.perf_counter() - t0)

    def _take(self) -> tuple[str, int] | None:
        """The next item (see the module docstring), waiting until one is ready; None when all is done or failed."""
        with self._cond:
            while True:
                if self._error is not None or self._done == self.layers:
                    return None
                if not self._hook:
                    if self._done < min(self._progress):
                        self._hook = True
                        return ("done", self._done)
                    if self._prepared < min(self.layers, self._done + SLOTS):
                        self._hook = True
                        return ("prep", self._prepared)
                ready = [k for k, n in enumerate(self._progress) if not self._held[k] and n < self._prepared]
                if ready:
                    k = min(ready, key=self._progress.__getitem__)
                    self._held[k] = True
                    return ("chain", k)
                self._cond.wait()

    def _run(self, w: int, item: tuple[str, int]) -> None:
        kind, x = item
        if kind == "prep":
            self._weights[x] = self.prep(x, x % SLOTS)
        elif kind == "done":
            self.done(x)
            del self._weights[x]
        else:
            j = self._progress[x]
            self.states[x] = self.step(w, j, x, self._weights[j][self.pass_of[x]], self.states[x])

    def _finish(self, item: tuple[str, int], seconds: float) -> None:
        kind, x = item
        with self._cond:
            self.seconds[kind] += seconds
            if kind == "prep":
                self._prepared += 1
                self._hook = False
            elif kind == "done":
                self._done += 1
                self._hook = False
            else:
                self._progress[x] += 1
                self._held[x] = False
            self._cond.notify_all()
