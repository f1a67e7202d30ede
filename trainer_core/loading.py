"""Reading a file-backed dataset through a ``DataLoader``: each sample under a
random state of its own (augmentation that does not depend on the number of
loader processes), a file that cannot be read named in one line, and loader
processes that leave a stop to the trainer and end with it.  :class:`~trainer_core.data.Batches`
uses these for every split that is not a tensor in memory.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import random
import signal
import time
import weakref
from typing import TYPE_CHECKING, Iterator

import torch
from torch.utils.data import Dataset, Sampler

from trainer_core.errors import UsageError

if TYPE_CHECKING:
    from trainer_core.data import Batches


class UnreadableSample(UsageError):
    """A sample whose file cannot be read, as one line even from a loader process."""

    def __init__(self, message: str) -> None:
        # A DataLoader worker re-raises it with its traceback in front: keep our last line.
        super().__init__(message.strip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1])


class ReadErrorsNamed(Dataset):  # type: ignore[type-arg]
    """``split`` as it is, except that a sample that cannot be read (a damaged
    image file) raises :class:`UnreadableSample` naming the file."""

    def __init__(self, split: Dataset) -> None:  # type: ignore[type-arg]
        self.split = split

    def __len__(self) -> int:
        return len(self.split)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> object:
        try:
            return self.split[index]
        except OSError as exc:  # PIL's UnidentifiedImageError, a truncated or vanished file
            samples = getattr(self.split, "samples", None)  # torchvision's folders: (path, class) pairs
            where = samples[index][0] if isinstance(samples, list) else f"sample {index}"
            detail = type(exc).__name__ if str(where) in str(exc) else f"{type(exc).__name__}: {exc}"
            raise UnreadableSample(f"cannot read {where} ({detail}); replace or remove it") from None


def read_sample(split: Dataset, index: int) -> object:  # type: ignore[type-arg]
    """Sample ``index`` of ``split`` as a run reads it: a file that cannot be read
    (a damaged image) is a one-line :class:`~trainer_core.UsageError` naming it."""
    return ReadErrorsNamed(split)[index]


class SeededSamples(Dataset):  # type: ignore[type-arg]
    """``split`` read by ``(index, epoch)`` keys, each sample under a random state
    of its own, drawn from the run's seed, the epoch and its index: augmentation
    (random crops and flips) is then the same with any number of loader processes,
    any number of ranks and after a mid-epoch resume, where torch's per-process
    streams would differ.  The state of the process around a read is left as it was."""

    def __init__(self, split: Dataset, seed: int) -> None:  # type: ignore[type-arg]
        self.split, self.seed = split, seed

    def __len__(self) -> int:
        return len(self.split)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> object:
        index, epoch = key
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            sample_seed = (self.seed * 1_000_003 + epoch) * 2_147_483_647 + index
            torch.default_generator.manual_seed(sample_seed % 2**63)  # (torch.manual_seed would reseed the GPUs' too)
            random.seed(sample_seed)  # (torchvision's RandomChoice, RandomOrder draw from it)
            try:
                return self.split[index]
            finally:
                random.setstate(python_state)


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's batches of one epoch (:meth:`Batches.local_order`), from a start
    step, as ``(index, epoch)`` keys of :class:`SeededSamples`.

    The loop sets ``epoch`` and ``start`` before iterating, so one DataLoader
    (and its persistent workers) serves every epoch and a mid-epoch resume.
    """

    def __init__(self, batches: Batches) -> None:
        # Not a reference: Batches holds this sampler, and a cycle would leave a dropped Batches to the
        # garbage collector, whose finalizers close the loader's queues before its workers are told to
        # stop (they ignore SIGTERM): each join then waited its 5 s, mid-way through whatever ran next.
        self._batches = weakref.ref(batches)
        self.epoch, self.start = 0, 0

    @property
    def batches(self) -> Batches:
        batches = self._batches()
        assert batches is not None, "the sampler of a Batches that is gone"
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches, epoch = self.batches, self.epoch
        if not batches.shuffle:
            for first, last in zip(batches.bounds[self.start:], batches.bounds[self.start + 1:]):
                yield [(index, epoch) for index in range(first, last)]
            return
        order, step = batches.local_order(epoch).tolist(), batches.share
        for first in range(self.start * step, len(order), step):
            yield [(index, epoch) for index in order[first : first + step]]

    def __len__(self) -> int:
        return len(self.batches) - self.start


@atexit.register
def _end_daemonic_processes() -> None:
    """At exit, end the daemonic child processes still running, as multiprocessing
    does, but without waiting forever for loader processes (``trainer eval`` leaves
    its own), which ignore the SIGTERM that ends the others: after a second they
    are killed.  Registered after multiprocessing's exit handler (torch imports
    multiprocessing first), so it runs before it."""
    children = [child for child in multiprocessing.active_children() if child.daemon]
    for child in children:
        child.terminate()
    deadline = time.monotonic() + 1.0
    for child in children:
        child.join(timeout=max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join()


def ignore_stop_signals(worker_id: int) -> None:
    """Run in each loader process: SIGINT and SIGTERM sent to the whole process
    group (Ctrl-C, a job scheduler) are the trainer's to act on, at a step every
    rank agrees on, so the loader must keep serving batches until then.  A loader
    process still ends with the trainer: PyTorch's workers exit when their parent does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def default_workers(device: torch.device) -> int:
    """Loader processes for file-backed datasets: the cores this process may use
    that the training's threads leave free, at most 4.  On the CPU torch's
    threads already take every core (its default), so there are none: a loader
    process there only takes turns with them (the seed's program uses none;
    issue 17 measured the trainer with one 18-25 % slower than it on 2 cores).
    An accelerator leaves the host free: all cores but one for the loop."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = torch.get_num_threads() if device.type == "cpu" else 1
    return max(0, min(4, cores - busy))
