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
