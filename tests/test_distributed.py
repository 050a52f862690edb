"""The collectives the trainer uses and the per-rank checkpoint gather/restore, on 2 in-process gloo ranks."""

import torch
from helpers import make_synthetic_corpus, run_on_ranks

from languini.dataset_lib.languini_books import LanguiniDatasetIterator, stream_indices
from languini.train_lib.distributed import (
    all_gather_objects,
    all_reduce_mean,
    all_reduce_sum,
    broadcast_object,
)


def collectives(world):
    total = all_reduce_sum(torch.tensor([world.rank + 1.0]), world).item()
    mean = all_reduce_mean(torch.tensor([world.rank * 4.0]), world).item()
    gathered = all_gather_objects({"rank": world.rank}, world)
    shared = broadcast_object(f"from rank {world.rank}", world)
    return total, mean, gathered, shared


def test_collectives_on_two_ranks():
    for total, mean, gathered, shared in run_on_ranks(collectives):
        assert (total, mean) == (3.0, 2.0)
        assert gathered == [{"rank": 0}, {"rank": 1}]
        assert shared == "from rank 0"


def loader(world, dataset_path):
    return LanguiniDatasetIterator(
        dataset_path, "train", global_batch_size=4, batch_idxs=stream_indices(world.rank, world.size, 4),
        micro_batches=1, sequence_length=8, device="cpu", repeat=True,
    )  # fmt: skip


def gather_then_restore(world, dataset_path):
    """Advance this rank's loader, gather every rank's state as a checkpoint does, restore a fresh loader
    from this rank's entry: the next batches must continue exactly."""
    original = loader(world, dataset_path)
    for _ in range(5):
        next(original)
    saved = all_gather_objects({"loader": original.state_dict()}, world)
    restored = loader(world, dataset_path)
    restored.load_state_dict(saved[world.rank]["loader"])
    return [[torch.equal(a, b) for a, b in zip(next(original), next(restored))] for _ in range(3)]


def test_checkpoint_gather_restores_each_rank_exactly(tmp_path):
    dataset_path = make_synthetic_corpus(str(tmp_path / "data"))
    for rank_result in run_on_ranks(gather_then_restore, dataset_path):
        assert rank_result and all(all(equal) for equal in rank_result)
