"""Byte-level BPE tokenizer trained locally with ``tokenizers``.

Byte-level, so any text, including names never seen in training, encodes
without an unknown token: an edit may introduce a brand-new name. Nothing is
downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from knowedit.errors import KnoweditError

PAD = "<pad>"
EOS = "<eos>"


class TextError(KnoweditError, ValueError):
    """Text that is not valid Unicode, or a tokenizer that cannot encode it; the message says which."""


def text_problem(text: str) -> str | None:
    """Why ``text`` is not valid Unicode text, or None if it is.

    A Python str may hold surrogate code points that no UTF-8 text can: JSON's
    ``"\\ud800"`` gives a lone surrogate, and invalid UTF-8 bytes in argv arrive
    surrogate-escaped (byte 0xff as U+DCFF). ``tokenizers`` refuses both with a
    bare TypeError, so callers check first and name the field.

    Returns:
        e.g. ``"lone surrogate U+D800 at position 3"`` or ``"invalid UTF-8 byte
        0xff at position 3"`` (positions count characters from 0).
    """
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as err:
        pos = err.start
    code = ord(text[pos])
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: an undecodable byte
        return f"invalid UTF-8 byte 0x{code - 0xDC00:02x} at position {pos}"
    return f"lone surrogate U+{code:04X} at position {pos}"


def check_text(text: str, what: str = "text") -> str:
    """``text`` itself if it is valid Unicode text.

    Raises:
        TextError: ``"{what} is not valid text: lone surrogate U+D800 at position 3"``.
    """
    problem = text_problem(text)
    if problem is not None:
        raise TextError(f"{what} is not valid text: {problem}")
    return text


class TextCodec:
    """Wraps a ``tokenizers.Tokenizer`` with the prompt/answer conventions of knowedit.

    An answer is encoded with a leading space (``" Paris"``) and followed by
    ``<eos>`` in training, so greedy decoding stops after it.
    """

    def __init__(self, tokenizer: Tokenizer, pad_token: str = PAD, eos_token: str = EOS) -> None:
        """``pad_token``/``eos_token``: a Hugging Face tokenizer's own (e.g. ``<|endoftext|>``)."""
        self.tok = tokenizer
        pad, eos = tokenizer.token_to_id(pad_token), tokenizer.token_to_id(eos_token)
        if pad is None or eos is None:
            raise TextError(f"tokenizer lacks the {pad_token}/{eos_token} special tokens")
        self.pad_id: int = pad
        self.eos_id: int = eos

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096) -> TextCodec:
        """Train a byte-level BPE on ``texts`` (deterministic for the same input)."""
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[PAD, EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(list(texts), trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path, pad_token: str = PAD, eos_token: str = EOS) -> TextCodec:
        return cls(Tokenizer.from_file(str(path)), pad_token, eos_token)

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a prompt (stripped). TextError if it is not valid text."""
        return self.tok.encode(check_text(prompt, "the prompt").strip(), add_special_tokens=False).ids

    def encode_answer(self, answer: str, eos: bool = True) -> list[int]:
        """Token ids of `` answer`` (+ eos). TextError if it is not valid text."""
        ids = self.tok.encode(" " + check_text(answer, "the target").strip(), add_special_tokens=False).ids
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([i for i in ids if i not in (self.pad_id, self.eos_id)]).strip()


def corpus_texts(examples: Iterable) -> list[str]:
    """The texts a tokenizer is trained on: each example's prompt and answer."""
    return [f"{e.prompt} {e.answer}" for e in examples]
