"""A stand-in for the stream loader that yields uniform random tokens, for throughput measurements."""

import torch

from languini.dataset_lib.layout import END_OF_DOC


class RandomBatches:
    """Batches shaped like the loader's ([micro_batches, rows, seq_len], never padded), of random real ids.

    Inputs and targets are contiguous tensors of their own (not overlapping views of one [.., seq_len + 1]
    array), so the trainer pins and copies exactly the bytes the step uses, in one piece each.
    """

    def __init__(self, cfg):
        rows = cfg.train_batch_size // cfg.gradient_accumulation_steps
        self.shape = (cfg.gradient_accumulation_steps, rows, cfg.seq_len)
        self.vocab_size = cfg.vocab_size

    def __next__(self):
        tokens = torch.randint(END_OF_DOC + 1, self.vocab_size, self.shape[:-1] + (self.shape[-1] + 1,))
        return tokens[..., :-1].contiguous(), tokens[..., 1:].contiguous(), torch.zeros(self.shape, dtype=torch.bool)
