"""Where a stage runs on this machine when the flow runs several at once.

- Cores: the cores this process may use are split into one group per concurrent stage, and each stage's
  command is pinned to its group, so two trainings on two cores each get one core (dlpipe sizes torch's
  thread pool to the cores it may use) instead of four threads fighting over two.
- Timing stages (evaluate, cost) run alone, on every core: the latency they measure decides promotion.
  A readers-writer lock: trainings share the machine, a timing stage waits for them and new ones wait
  for it (it goes first, so a stream of trainings cannot starve it).
- GPUs: a stage that trains on a GPU claims whole devices with an advisory file lock per device, so flow
  runs on one machine (a weekday refresh and the weekly retrain) never put two trainings on one GPU; the
  flow also holds a slot of Prefect's `dlpipe-gpu` concurrency limit, which the Prefect UI shows.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

GPU_POLL_SECONDS = 1.0  # how often a stage waiting for a GPU looks again


def core_groups(workers: int, cpus: set[int] | None = None) -> list[set[int]]:
    """`cpus` (default: this process's) dealt into `workers` groups; fewer groups when there are fewer cpus."""
    available = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    count = max(1, min(workers, len(available)))
    return [set(available[i::count]) for i in range(count)]


class StageSlots:
    """Cores for concurrent stages and exclusive runs for the ones that time things (see the module doc)."""

    def __init__(self, workers: int, cpus: set[int] | None = None):
        self._groups: queue.Queue[set[int]] = queue.Queue()
        for group in core_groups(workers, cpus):
            self._groups.put(group)
        self._state = threading.Condition()
        self._sharing = 0  # stages running side by side
        self._alone = False  # a timing stage is running
        self._waiting_alone = 0  # timing stages waiting for the machine

    @contextlib.contextmanager
    def shared(self) -> Iterator[set[int]]:
        """A group of cores for a stage that may run beside others (yields the cpus to pin it to)."""
        with self._state:
            self._state.wait_for(lambda: not self._alone and not self._waiting_alone)
            self._sharing += 1
        group = self._groups.get()
        try:
            yield group
        finally:
            self._groups.put(group)
            with self._state:
                self._sharing -= 1
                self._state.notify_all()

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        """The whole machine, once every running stage has finished."""
        with self._state:
            self._waiting_alone += 1
            self._state.wait_for(lambda: not self._alone and self._sharing == 0)
            self._waiting_alone -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._state:
                self._alone = False
                self._state.notify_all()


def gpu_lock_dir() -> Path:
    """One lock file per GPU, shared by every flow run of this user on this machine."""
    return Path(tempfile.gettempdir()) / f"dlpipe-gpus-{os.getuid()}"


@contextlib.contextmanager
def gpu_devices(count: int, total: int, lock_dir: Path | None = None) -> Iterator[list[int]]:
    """Claim `count` of this machine's `total` GPUs, waiting while others hold them; yields their indices
    (for CUDA_VISIBLE_DEVICES). The locks are released when the block ends or the process dies."""
    if count > total:
        raise ValueError(f"a stage needs {count} GPUs and this machine has {total}")
    lock_dir = lock_dir or gpu_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    held: dict[int, int] = {}  # device -> open lock file descriptor
    try:
        while True:
            for device in range(total):
                if len(held) == count:
                    break
                fd = os.open(lock_dir / f"gpu{device}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held[device] = fd
                except BlockingIOError:
                    os.close(fd)
            if len(held) == count:
                break
            _release(held)  # all or nothing: two stages each holding one of two GPUs would wait forever
            time.sleep(GPU_POLL_SECONDS)
        yield sorted(held)
    finally:
        _release(held)


def _release(held: dict[int, int]) -> None:
    for fd in held.values():
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    held.clear()
