"""SentencePiece BPE tokenizer with the original Languini settings (docs/data.md), trained on train books only."""

import io
import os
from collections.abc import Iterable

import sentencepiece as spm

from languini.common_lib.errors import UserError
from languini.dataset_lib.layout import END_OF_DOC, PAD

# The original's trainer flags; character_coverage 0.9995 is SentencePiece's default, written out here.
SETTINGS = {
    "model_type": "bpe",
    "hard_vocab_limit": True,
    "input_sentence_size": 2_000_000,
    "shuffle_input_sentence": True,
    "character_coverage": 0.9995,
    "pad_id": PAD,
    "unk_id": 1,
    "bos_id": -1,
    "eos_id": -1,
    "user_defined_symbols": ["<D>"],
    "max_sentencepiece_length": 99,
    "split_by_unicode_script": True,
    "split_by_number": True,
    "split_by_whitespace": True,
    "split_digits": True,
    "add_dummy_prefix": False,
    "byte_fallback": True,
    "remove_extra_whitespaces": False,
    "allow_whitespace_only_pieces": True,
    "normalization_rule_name": "identity",
    "vocabulary_output_piece_score": False,
}


def _lines(texts: Iterable[str]):
    """Training sentences: the non-empty lines of every book (SentencePiece samples up to 2M of them)."""
    for text in texts:
        for line in text.split("\n"):
            if line:
                yield line


class _Sentences:
    """The training sentences, keeping any error raised while reading the books (SentencePiece would wrap
    it into a RuntimeError that reads like a training failure)."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.error = texts, None

    def __iter__(self):
        try:
            yield from _lines(self.texts)
        except (Exception, KeyboardInterrupt) as e:
            self.error = e
            raise


def train_tokenizer(texts: Iterable[str], vocab_size: int, num_threads: int = 1) -> bytes:
    """Train on the given book texts and return the serialised model.

    An error from reading the books (e.g. a non-UTF-8 book with --strict) is raised as it is.
    """
    model = io.BytesIO()
    sentences = _Sentences(texts)
    spm.set_random_generator_seed(0)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
            num_threads=max(1, num_threads), minloglevel=2, **SETTINGS,
        )
    except RuntimeError as e:
        if sentences.error is not None:
            raise sentences.error from None
        reason = str(e).strip().splitlines()[-1]
        fix = "larger" if "Increase vocab_size" in reason else "smaller"  # too few pieces for the characters
        raise UserError(f"SentencePiece could not train a {vocab_size}-token vocabulary on the train books "
                        f"({reason}); try a {fix} --vocab-size") from None
    return model.getvalue()


def load_processor(model: str | bytes) -> spm.SentencePieceProcessor:
    """A processor from a model file or bytes, checked for the special ids the loader relies on."""
    where = model if isinstance(model, str) else "the tokenizer"
    try:
        sp = spm.SentencePieceProcessor(model_file=model) if isinstance(model, str) else \
            spm.SentencePieceProcessor(model_proto=model)
    except (OSError, RuntimeError) as e:
        raise UserError(f"cannot load SentencePiece model {where}: {e}") from None
    expected = {PAD: "<pad>", 1: "<unk>", END_OF_DOC: "<D>"}
    got = {i: sp.id_to_piece(i) for i in expected}
    if got != expected:
        raise UserError(f"{where} must have pad=0, unk=1 and <D>=2 (got {got})")
    return sp


def model_file_bytes(path: str) -> bytes:
    if not os.path.isfile(path):
        raise UserError(f"no tokenizer model at {path}")
    with open(path, "rb") as f:
        return f.read()
