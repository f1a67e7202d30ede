"""What a dataset provides, and how the loop turns it into batches.

Small datasets live in memory as tensors and are batched by indexing with a
permutation; larger ones are any ``torch.utils.data.Dataset`` and go through
a ``DataLoader``.  Either way the order of an epoch depends only on the seed
and the epoch number, so a resumed run sees the same batches.

In a run of several processes (ranks) the training batch size is the global
batch: every rank takes its contiguous part of each batch, so all ranks take
the same steps and together see exactly what one process would.  Evaluation
gives each rank a contiguous part of the split instead: every sample once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset

from trainer_core.distributed import shard_bounds
from trainer_core.errors import UsageError
from trainer_core.loading import EpochBatchSampler, ReadErrorsNamed, SeededSamples, default_workers, ignore_stop_signals


@dataclass
class TensorSplit:
    """One split held in memory: ``N`` samples of any shape.

    :ivar inputs: ``N x ...`` samples: ``uint8`` images (``N x C x H x W``,
        scaled by 1/255 per batch), floating-point features or images (used as
        they are before normalisation), or integer token ids (passed through).
    :ivar targets: ``N x ...`` targets in the form the task expects: class
        indices (``int64``) for classification, floats for regression,
        multi-hot rows for multi-label, next-token ids for language models.
    :ivar augment: training only: called as ``augment(inputs, index,
        generator)`` with a batch's inputs and their indices in the split, on
        the training device, and a generator seeded from the run's seed, the
        epoch and the step (so a resumed run draws the same); returns the
        batch to normalise (e.g. random crops of uint8 images, as uint8).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    augment: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.targets):
            raise ValueError(f"{len(self.inputs)} inputs but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.targets)


Split = Union[TensorSplit, Dataset]


@dataclass
class DataBundle:
    """What a dataset factory returns.

    :ivar train: the training split.
    :ivar val: the validation split.
    :ivar classes: a name per model output: the class names (classification),
        the label names (multi-label), the target names (regression) or the
        vocabulary, one string per token id (language model).
    :ivar input_shape: shape of one input, e.g. ``(1, 8, 8)`` for images,
        ``(10,)`` for feature vectors, ``(128,)`` for token sequences.
    :ivar mean: per-channel (images) or per-feature (vectors) mean subtracted
        from every batch after scaling; ``None``: no normalisation.
    :ivar std: the standard deviation they are then divided by.
    :ivar task: the name of the task the dataset is for (``trainer tasks``);
        ``None`` means classification.  ``--task`` overrides it.
    """

    train: Split
    val: Split
    classes: Sequence[str]
    input_shape: tuple[int, ...]
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    task: str | None = None

    @property
    def num_classes(self) -> int:
        """The number of names in ``classes``: the model's outputs per sample for
        classification (a task may ask for another number: ``Task.output_size``)."""
        return len(self.classes)


def held_targets(split: Split) -> torch.Tensor | None:
    """All targets of an in-memory split (for checks and statistics), or ``None``
    for a ``Dataset``, whose targets are read one file at a time."""
    return split.targets if isinstance(split, TensorSplit) else None


def epoch_order(size: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled sample order of ``epoch``: a function of seed and epoch only."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(size, generator=generator)


class Batches:
    """Batches of one split on the training device, normalised.

    :param split: in-memory tensors or a ``Dataset``.
    :param shuffle: draw a new order each epoch (training) or keep the order (evaluation).
    :param rank: this process's rank in a run of ``world_size`` processes.
    :param world_size: training: ``batch_size`` (a multiple of it) is the
        global batch, and this rank takes its part of every batch;
        evaluation: this rank batches its part of the split.
    :param input_dims: dimensions of one input (3 for images): ``mean`` and
        ``std`` apply along the first.
    :param equal_steps: evaluation: every rank takes as many steps as the rank
        with the largest part (its batches are then a little smaller), as a
        sharded model needs: its forward pass is a collective.

    :ivar uneven: ``(step, loss_scale, samples)`` when this rank's part of the
        epoch's last, partial training batch is not its equal share, else
        ``None``.  The loop scales that step's loss so that averaging the ranks'
        gradients still weighs every sample of the batch once; an empty part
        (fewer samples than ranks) holds one sample with scale 0.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        device: torch.device,
        *,
        shuffle: bool,
        seed: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels_last: bool = False,
        num_workers: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        input_dims: int = 3,
        equal_steps: bool = False,
    ) -> None:
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.seed = seed
        self.channels_last = channels_last
        self.size = len(split)  # type: ignore[arg-type]
        self.rank, self.world_size = rank, world_size
        self.uneven: tuple[int, float, int] | None = None
        self.positions: torch.Tensor | None = None  # this rank's places in an epoch's order
        if shuffle:
            self.steps = math.ceil(self.size / batch_size)
            self.share = batch_size // world_size
            if world_size > 1:
                self.positions = self._training_positions()
        else:
            self.first, self.stop = shard_bounds(self.size, rank, world_size)
            part = self.stop - self.first
            self.steps = math.ceil((math.ceil(self.size / world_size) if equal_steps else part) / batch_size)
            self.share = batch_size
            if equal_steps and self.size // world_size < self.steps:  # (the smallest part: every rank says so)
                raise UsageError(f"the validation split ({self.size} samples) is too small to give each of {world_size} "
                                 "processes a batch; use fewer processes or a larger split")
            # Where each evaluation batch of this rank's part starts and ends.
            self.bounds = ([self.first + part * k // self.steps for k in range(self.steps + 1)] if equal_steps
                           else [*range(self.first, self.stop, batch_size), self.stop])
        self.loader: DataLoader | None = None
        self.generator: torch.Generator | None = None  # (of an in-memory split that augments its batches)
        if isinstance(split, TensorSplit):
            # Held on the training device once, so a batch is an index, not a copy from the host.
            self.tensors: TensorSplit | None = TensorSplit(split.inputs.to(device), split.targets.to(device),
                                                           split.augment if shuffle else None)
            if self.tensors.augment is not None:
                self.generator = torch.Generator(device=device)
        else:
            self.tensors = None
            self.sampler = EpochBatchSampler(self)
            workers = default_workers(device) if num_workers is None else num_workers
            self._loader_options = dict(
                dataset=SeededSamples(ReadErrorsNamed(split), seed),
                batch_sampler=self.sampler,
                num_workers=workers,
                pin_memory=device.type == "cuda",
                persistent_workers=workers > 0,  # workers outlive an epoch: no start-up cost per epoch
                worker_init_fn=ignore_stop_signals,
            )
            self.loader = self._new_loader()
        shape = (1, -1, *[1] * (input_dims - 1))  # per channel of an image, per feature of a vector
        self.mean = torch.tensor(mean, device=device).view(shape) if mean is not None else None
        self.std = torch.tensor(std, device=device).view(shape) if std is not None else None

    def __len__(self) -> int:
        """Steps per epoch: the same on every rank for training."""
        return self.steps

    def _new_loader(self) -> DataLoader:
        # Its own generator: drawing the workers' base seed leaves the run's random stream alone,
        # with any number of loader processes (0 draws it again every epoch).
        return DataLoader(**self._loader_options, generator=torch.Generator().manual_seed(self.seed))

    def close(self) -> None:
        """End the loader processes now (a later iteration starts new ones).  Left to the
        garbage collector (a dropped trainer sits in reference cycles), they ignore the
        SIGTERM that ends them, and each was waited for 5 s, mid-way through whatever ran then."""
        if self.loader is not None and self.loader.num_workers > 0:
            self.loader = self._new_loader()  # the old one, and with it its workers, go now

    def _training_positions(self) -> torch.Tensor:
        """Where this rank's samples sit in an epoch's order, step after step
        (the same every epoch): its part of each global batch."""
        full = self.steps - 1
        head = torch.arange(full)[:, None] * self.batch_size + self.rank * self.share + torch.arange(self.share)
        last = full * self.batch_size
        lo, hi = shard_bounds(self.size - last, self.rank, self.world_size)
        if (hi - lo) * self.world_size != self.size - last:
            self.uneven = (full, (hi - lo) * self.world_size / (self.size - last), hi - lo)
        # An empty part (a last batch smaller than the number of ranks) holds that
        # batch's first sample, weighted zero, so this rank still takes the step.
        tail = torch.arange(last + lo, last + hi) if hi > lo else torch.tensor([last])
        return torch.cat([head.flatten(), tail])

    def local_order(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for ``epoch``, in the order of its steps."""
        if not self.shuffle:
            return torch.arange(self.first, self.stop)
        order = epoch_order(self.size, self.seed, epoch)
        return order if self.positions is None else order[self.positions]

    def iterate(self, epoch: int = 0, start_batch: int = 0,
                stopping: Callable[[], bool] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(inputs, targets)`` for ``epoch``, skipping the first ``start_batch`` batches.

        ``stopping`` says whether the run was asked to stop: then a loader that
        fails (its worker processes got the same signal) ends the iteration
        instead of raising."""
        if self.tensors is not None:  # (the generators themselves: no extra layer per batch)
            return self._from_tensors(self.tensors, epoch, start_batch)
        return self._from_loader(epoch, start_batch, stopping)

    def _from_tensors(self, tensors: TensorSplit, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step = self.share
        if not self.shuffle:  # slices: views of the split, no copy
            for first, last in zip(self.bounds[start_batch:], self.bounds[start_batch + 1:]):
                yield self._normalise(tensors.inputs[first:last]), tensors.targets[first:last]
            return
        order = self.local_order(epoch).to(self.device)
        for first in range(start_batch * step, len(order), step):
            index = order[first : first + step]
            if tensors.augment is None:
                yield self._normalise(tensors.inputs[index]), tensors.targets[index]
            else:
                generator = self._augment_generator(epoch, first // step)
                yield self._normalise(tensors.augment(tensors.inputs[index], index, generator)), tensors.targets[index]

    def _augment_generator(self, epoch: int, step: int) -> torch.Generator:
        """The generator of one training batch's augmentation, seeded from the seed,
        epoch, step and rank alone: a resumed run draws what the first one drew."""
        assert self.generator is not None
        return self.generator.manual_seed((((self.seed * 100_003 + epoch) * 1_000_003 + step) * 1_009 + self.rank) % 2**63)

    def _from_loader(self, epoch: int, start: int,
                     stopping: Callable[[], bool] | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        assert self.loader is not None
        self.sampler.epoch, self.sampler.start = epoch, start
        batches = iter(self.loader)
        while True:
            try:
                inputs, targets = next(batches)
            except StopIteration:
                return
            except RuntimeError:  # "DataLoader worker ... is killed by signal": a stop sent to the process group
                if stopping is not None and stopping():
                    return
                raise
            yield self._normalise(inputs.to(self.device, non_blocking=True)), targets.to(self.device, non_blocking=True)

    def _normalise(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.dtype == torch.uint8:
            inputs = inputs.float().div_(255)
        if self.mean is not None:
            inputs = inputs - self.mean
        if self.std is not None:
            inputs = inputs / self.std
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs
