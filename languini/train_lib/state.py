"""Helpers for the nested recurrent states of stateful models (tensors in lists, tuples and dicts)."""

import torch


def map_state(state, fn):
    """Apply `fn` to every tensor of a nested state, keeping its structure (None stays None)."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, (list, tuple)):
        return type(state)(map_state(s, fn) for s in state)
    if isinstance(state, dict):
        return {k: map_state(v, fn) for k, v in state.items()}
    return state


def detach_state(state):
    """Cut the autograd history so back-propagation stops at the step boundary (truncated BPTT)."""
    return map_state(state, torch.Tensor.detach)


def state_to(state, device):
    return map_state(state, lambda t: t.to(device))


def _zip_states(states: list, fn):
    """Apply `fn` to the list of corresponding tensors of states that share one structure."""
    first = states[0]
    if isinstance(first, torch.Tensor):
        return fn(states)
    if isinstance(first, (list, tuple)):
        return type(first)(_zip_states([s[i] for s in states], fn) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _zip_states([s[k] for s in states], fn) for k in first}
    return first


def relayout_states(saved: list[list], global_batch: int, rank: int, world_size: int, micro_batches: int) -> list:
    """This rank's per-micro-batch states for a new layout, from the states every rank of another saved.

    `saved[r][m]` is the state of micro-batch m of rank r of the saved run (W = len(saved) ranks, M =
    len(saved[r]) micro-batches); its rows (dim 0 of every tensor) are the global streams that rank owns
    (`stream_indices(r, W, B)`) in order, split into M consecutive micro-batches. Each global stream keeps its
    own row, whatever the new layout; with the same layout the states come back unchanged.
    """
    from languini.dataset_lib.languini_books import stream_indices

    order = [s for r in range(len(saved)) for s in stream_indices(r, len(saved), global_batch)]
    row_of = {stream: row for row, stream in enumerate(order)}
    every = _zip_states([micro for rank_states in saved for micro in rank_states], lambda ts: torch.cat(ts))
    mine = stream_indices(rank, world_size, global_batch)
    rows = len(mine) // micro_batches
    out = []
    for m in range(micro_batches):
        index = torch.tensor([row_of[s] for s in mine[m * rows : (m + 1) * rows]], dtype=torch.long)
        out.append(map_state(every, lambda t, index=index: t.index_select(0, index.to(t.device))))
    return out
