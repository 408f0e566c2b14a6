"""Tokenizer and chat format.

The tiny preset's tokenizer is a byte-level BPE trained with the `tokenizers` library on the
synthetic corpus, wrapped as a transformers `PreTrainedTokenizerFast` (saved as tokenizer.json).
`[SEG]` and `<image>` are added special tokens: their ids are taken from the added token itself,
never from encoding the string (some tokenizers prepend a space token).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SEG_TOKEN = "[SEG]"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN, SEG_TOKEN)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE over `texts`; lower-cases input; ids 0..5 are SPECIAL_TOKENS in order."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=[IMAGE_TOKEN, SEG_TOKEN],
    )


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """Load tokenizer.json from a file or a directory holding one."""
    path = path / "tokenizer.json" if path.is_dir() else path
    return wrap(Tokenizer.from_file(str(path)))


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    """Id of an added token itself (never of the encoded string, which may gain a space)."""
    found = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(found, int):
        raise TypeError(f"token {token!r} does not map to a single id")
    return found


@dataclass(frozen=True)
class ChatFormat:
    """`<s>USER: <image> {instruction} ASSISTANT: {answer}</s>`, with N image slots."""

    tokenizer: PreTrainedTokenizerFast
    image_tokens: int  # N: how many slots the single <image> placeholder expands to

    @cached_property
    def image_id(self) -> int:
        return _token_id(self.tokenizer, IMAGE_TOKEN)

    @cached_property
    def seg_id(self) -> int:
        return _token_id(self.tokenizer, SEG_TOKEN)

    @cached_property
    def eos_id(self) -> int:
        return _token_id(self.tokenizer, str(self.tokenizer.eos_token))

    def prompt_ids(self, instruction: str) -> list[int]:
        """Token ids of the prompt up to and including `ASSISTANT:`, image slots expanded."""
        text = f"<s>USER: {IMAGE_TOKEN} {instruction.strip()} ASSISTANT:"
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        out: list[int] = []
        for i in ids:
            out.extend([i] * self.image_tokens if i == self.image_id else [i])
        return out

    def answer_ids(self, answer: str) -> list[int]:
        """Answer ids followed by `</s>` (what the LLM is trained to produce)."""
        # "[SEG]" glued to the word before it, so that word's hidden state predicts [SEG]
        text = " " + answer.strip().replace(" " + SEG_TOKEN, SEG_TOKEN)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [*ids, self.eos_id]

    def decode(self, ids: list[int]) -> str:
        """Answer text with `[SEG]` kept and other special tokens dropped, first letter upper."""
        keep = [i for i in ids if i == self.seg_id or i not in self.tokenizer.all_special_ids]
        text = str(self.tokenizer.decode(keep, skip_special_tokens=False)).strip()
        text = re.sub(r"(?<=\S)\[SEG\]", " " + SEG_TOKEN, text)
        return text[:1].upper() + text[1:]
