"""Characters and UTF-8 bytes that each token id decodes to, for the normalised metrics.

Normalised perplexity divides the nats of the scored targets by the number of characters those targets
decode to (docs/evaluation.md). Decoding text in the hot path is slow, so the length of every token id is computed
once from the SentencePiece model and looked up as a tensor.

Per id: a text piece counts the characters / UTF-8 bytes of its surface text (`▁` is a space); `<D>` and
other user-defined symbols count their literal text (`<D>` = 3 characters, as in the original, which
decodes it to the string "<D>"); control pieces (`<pad>`) count 0; `<unk>` counts what SentencePiece
decodes it to. A byte-fallback piece is one byte, and one character only when it starts a UTF-8 sequence
(ASCII or a lead byte), so the sum over a run of tokens equals the length of the decoded text.
"""

import os
from dataclasses import dataclass

import torch

from languini.common_lib.errors import UserError


@dataclass(frozen=True)
class TokenLengths:
    """int64 tensors [vocab_size]: characters and UTF-8 bytes that each token id decodes to."""

    chars: torch.Tensor
    bytes: torch.Tensor

    def to(self, device) -> "TokenLengths":
        return TokenLengths(self.chars.to(device), self.bytes.to(device))


def _byte_value(piece: str) -> int:
    """`<0xE2>` -> 0xE2."""
    return int(piece[3:-1], 16)


def _piece_lengths(sp, token_id: int) -> tuple[int, int]:
    if sp.is_control(token_id) or sp.is_unused(token_id):
        return 0, 0
    if sp.is_byte(token_id):
        is_continuation = 0x80 <= _byte_value(sp.id_to_piece(token_id)) <= 0xBF
        return (0 if is_continuation else 1), 1
    text = (
        sp.decode([token_id]) if sp.is_unknown(token_id) else sp.id_to_piece(token_id).replace("\u2581", " ")
    )
    return len(text), len(text.encode("utf-8"))


def token_lengths_from_processor(sp) -> TokenLengths:
    """The lengths of every id of a loaded `sentencepiece.SentencePieceProcessor` (runs once per vocab)."""
    lengths = [_piece_lengths(sp, i) for i in range(sp.vocab_size())]
    table = torch.tensor(lengths, dtype=torch.int64).reshape(-1, 2)
    return TokenLengths(chars=table[:, 0].contiguous(), bytes=table[:, 1].contiguous())


def load_token_lengths(dataset_path: str, vocab_size: int | None = None) -> TokenLengths | None:
    """Lengths from `<dataset_path>/tokenizer.model`, or None when the dataset has no tokenizer.

    Without a tokenizer (e.g. synthetic test corpora) only token-level metrics can be computed.
    """
    model_path = os.path.join(dataset_path, "tokenizer.model")
    if not os.path.isfile(model_path):
        return None
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    if vocab_size is not None and sp.vocab_size() != vocab_size:
        raise UserError(
            f"{model_path} has {sp.vocab_size()} tokens but the config has --vocab_size {vocab_size}"
        )
    return token_lengths_from_processor(sp)
