"""A training loader whose batches are a fixed function of (seed, iteration): resumable exactly.

detectron2's default train loader draws its shuffle seed at start-up and seeds augmentation per
worker, so after ``--resume`` the data order restarts from scratch. Here the index stream is
detectron2's (``shuffle(range(N)) + shuffle(range(N)) + ...`` from one seeded generator, split
across ranks, grouped by aspect ratio), but batching happens on indices, so skipping the first
``start_iter`` batches is cheap; and each sample's augmentation is seeded by its position in the
stream. A run resumed at iteration k therefore sees exactly the batches an uninterrupted run sees.
With per-source weights (``DATASETS.TRAIN_WEIGHTS``, usdet.data.mixing) each stream position first
draws its source from the seeded generator, so a weighted mix keeps the same guarantees.
"""
from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.utils.data as torchdata
from detectron2.data.build import trivial_batch_collator, worker_init_reset_seed
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm

from usdet.data.image_io import ImageReadError

logger = logging.getLogger(__name__)

__all__ = ["ResumableBatchSampler", "SeededMapDataset", "build_resumable_train_loader"]


_SOURCE_CHUNK = 1024  # sources are drawn this many positions at a time (part of the stream's definition)


def sample_seed(seed: int, position: int) -> int:
    """The augmentation seed of the sample at ``position`` of the stream (a 32-bit integer)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(position) & 0xFFFFFFFF]).generate_state(1)[0])


class ResumableBatchSampler(torchdata.Sampler):
    """Infinite per-rank batches of ``(stream_position, dataset_index)`` pairs.

    The global index stream is a sequence of seeded permutations (as detectron2's
    ``TrainingSampler``); rank r takes every world_size-th element starting at r; with
    ``aspect_ratio_grouping`` indices are bucketed (w > h or not) before batching, as detectron2's
    ``AspectRatioGroupedDataset`` does. Set :attr:`start_batch` before iterating to skip batches.
    """

    def __init__(self, sizes: Sequence[Tuple[int, int]], batch_size: int, seed: int, *, shuffle: bool = True,
                 aspect_ratio_grouping: bool = True, rank: Optional[int] = None,
                 world_size: Optional[int] = None, sources: Optional[Sequence[int]] = None,
                 source_weights: Optional[Sequence[float]] = None):
        if len(sizes) == 0:
            raise ValueError("the training set is empty: check DATASETS.TRAIN and the annotation files")
        self.num_samples = len(sizes)
        self._members: List[np.ndarray] = []
        self._weights: Optional[torch.Tensor] = None
        if source_weights is not None:
            src = np.asarray(sources if sources is not None else [0] * len(sizes))
            self._members = [np.flatnonzero(src == s) for s in range(len(source_weights))]
            empty = [s for s, m in enumerate(self._members) if len(m) == 0]
            if empty:
                raise ValueError(f"training dataset(s) number {empty} of DATASETS.TRAIN are empty but weighted")
            self._weights = torch.tensor([float(w) for w in source_weights], dtype=torch.float64)
        # bucket 0: wider than tall, 1: otherwise; unknown size -> 1 (any fixed choice is fine)
        self._bucket = np.array([0 if (w or 0) > (h or 0) else 1 for w, h in sizes], dtype=np.int8)
        if not aspect_ratio_grouping:
            self._bucket[:] = 0
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.rank = comm.get_rank() if rank is None else rank
        self.world_size = comm.get_world_size() if world_size is None else world_size
        self.start_batch = 0

    def _permutations(self, members: np.ndarray, g: torch.Generator) -> Iterator[int]:
        while True:
            order = torch.randperm(len(members), generator=g) if self.shuffle else torch.arange(len(members))
            yield from members[order.numpy()].tolist()

    def _weighted_stream(self) -> Iterator[Tuple[int, int]]:
        """Each position draws its source by weight, then the next index of that source's own
        seeded permutations: a fixed function of the seed, like the unweighted stream."""
        g = torch.Generator()
        g.manual_seed(self.seed)
        per_source = []
        for s, members in enumerate(self._members):
            gs = torch.Generator()
            gs.manual_seed(sample_seed(self.seed, -1 - s))
            per_source.append(self._permutations(members, gs))
        position = 0
        while True:
            for s in torch.multinomial(self._weights, _SOURCE_CHUNK, replacement=True, generator=g).tolist():
                yield position, next(per_source[s])
                position += 1

    def _global_stream(self) -> Iterator[Tuple[int, int]]:
        if self._weights is not None:
            yield from self._weighted_stream()
            return
        g = torch.Generator()
        g.manual_seed(self.seed)
        position = 0
        while True:
            order = torch.randperm(self.num_samples, generator=g) if self.shuffle else torch.arange(self.num_samples)
            for idx in order.tolist():
                yield position, idx
                position += 1

    def _batches(self) -> Iterator[List[Tuple[int, int]]]:
        buckets: List[List[Tuple[int, int]]] = [[], []]
        stream = itertools.islice(self._global_stream(), self.rank, None, self.world_size)
        for item in stream:
            bucket = buckets[self._bucket[item[1]]]
            bucket.append(item)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                del bucket[:]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        return itertools.islice(self._batches(), self.start_batch, None)


class SeededMapDataset(torchdata.Dataset):
    """Map ``(position, index)`` to ``mapper(dataset[index])`` with ``np.random`` seeded by position.

    The global NumPy state is saved and restored around the call, so loading in the main
    process (``NUM_WORKERS 0``) leaves the trainer's own random stream untouched. An unreadable
    image is reported once (file and reason) and replaced by the next readable one, so one bad
    frame does not stop a long run, and the replacement is still deterministic.
    """

    def __init__(self, dataset: List[Dict[str, Any]], mapper: Callable[[Dict[str, Any]], Any], seed: int):
        self._dataset = DatasetFromList(dataset, copy=False)
        self._mapper = mapper
        self.seed = int(seed)
        self._bad: set = set()

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        position, index = key
        n = len(self._dataset)
        for attempt in range(n):
            idx = (index + attempt) % n
            if idx in self._bad:
                continue
            state = np.random.get_state()
            np.random.seed(sample_seed(self.seed, position))
            try:
                out = self._mapper(self._dataset[idx])
            except ImageReadError as e:
                self._bad.add(idx)
                logger.warning("Skipping unreadable training image %s (using the next one instead)", e)
                continue
            finally:
                np.random.set_state(state)
            if out is None:
                self._bad.add(idx)
                continue
            return out
        raise RuntimeError("no training image could be read: every entry of DATASETS.TRAIN failed (see warnings)")


class ResumableTrainLoader:
    """Iterable of batches; the real ``DataLoader`` iterator (and its workers) starts on first use.

    Starting lazily means :meth:`set_start_iter` after loading a checkpoint costs nothing: no
    worker has prefetched batches from the wrong position.
    """

    def __init__(self, dataset: SeededMapDataset, batch_sampler: ResumableBatchSampler, num_workers: int):
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.num_workers = num_workers

    @property
    def seed(self) -> int:
        return self.batch_sampler.seed

    def set_seed(self, seed: int) -> None:
        self.batch_sampler.seed = int(seed)
        self.dataset.seed = int(seed)

    def set_start_iter(self, start_iter: int) -> None:
        """Skip the batches of iterations ``0 .. start_iter - 1`` (one batch per iteration per rank)."""
        self.batch_sampler.start_batch = int(start_iter)

    def __iter__(self) -> Iterator[List[Dict[str, Any]]]:
        loader = torchdata.DataLoader(
            self.dataset,
            batch_sampler=self.batch_sampler,
            num_workers=self.num_workers,
            collate_fn=trivial_batch_collator,
            worker_init_fn=worker_init_reset_seed,
            # Own generator: creating the iterator must not draw from torch's global RNG,
            # whose state is part of what a resume restores.
            generator=torch.Generator().manual_seed(self.seed),
            persistent_workers=False,
        )
        yield from loader


def build_resumable_train_loader(dataset: List[Dict[str, Any]], mapper: Callable, *, total_batch_size: int,
                                 seed: int, num_workers: int = 0, aspect_ratio_grouping: bool = True,
                                 sources: Optional[Sequence[int]] = None,
                                 source_weights: Optional[Sequence[float]] = None) -> ResumableTrainLoader:
    """The usdet training loader over detectron2 dataset dicts (see the module docstring)."""
    world = comm.get_world_size()
    if total_batch_size <= 0 or total_batch_size % world != 0:
        raise ValueError(f"SOLVER.IMS_PER_BATCH ({total_batch_size}) must be a positive multiple of the "
                         f"number of processes ({world})")
    sizes = [(d.get("width", 0), d.get("height", 0)) for d in dataset]
    sampler = ResumableBatchSampler(sizes, total_batch_size // world, seed, aspect_ratio_grouping=aspect_ratio_grouping,
                                    sources=sources, source_weights=source_weights)
    return ResumableTrainLoader(SeededMapDataset(dataset, mapper, seed), sampler, num_workers)
