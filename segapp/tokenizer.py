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

from segapp.config import SEGAPP_FORMATS

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
    """`<s>USER: <image> {instruction} ASSISTANT: {answer}</s>`, with N image slots.

    With `text_first` the instruction comes before the image slots (`segapp_text_first`): under
    causal attention every image token then sees the instruction, so the image tokens themselves
    can carry "is this the target?" to the [SEG] pointer.
    """

    tokenizer: PreTrainedTokenizerFast
    image_tokens: int  # N: how many slots the single <image> placeholder expands to
    text_first: bool = False

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
        if self.text_first:
            text = f"<s>USER: {instruction.strip()} {IMAGE_TOKEN} ASSISTANT:"
        else:
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


# ---- LLaVA conversation templates (what LLaVA / LISA checkpoints were trained with) ------------
IM_START, IM_END, IM_PATCH = "<im_start>", "<im_end>", "<im_patch>"
_LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)
LLAVA_TEMPLATES = ("llava_v1", "llava_llama_2")


@dataclass(frozen=True)
class LlavaChatFormat(ChatFormat):
    """LLaVA's conversation format over a checkpoint's own tokenizer (AutoTokenizer).

    llava_v1:       `<s>{system} USER: <im_start><image><im_end>\\n{instruction} ASSISTANT:`
    llava_llama_2:  `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n<image>\\n{instruction} [/INST]`
    `<im_start>`/`<im_end>` wrap the image when the tokenizer has them (LISA: mm_use_im_start_end).
    As LLaVA's `tokenizer_image_token` does, the text on each side of `<image>` is tokenized on its
    own (BOS kept only on the first piece) and the N image slots go in between. LLaVA marks the
    slot with id -200, which no embedding row has; here a slot is a real id whose embedding is
    overwritten: `<image>` or `<im_patch>` when the vocabulary has one, else `<unk>` (stripped
    from the text pieces, so user text cannot fake a slot).
    """

    template: str = "llava_v1"

    @cached_property
    def image_id(self) -> int:
        vocab = self.tokenizer.get_vocab()
        for token in (IMAGE_TOKEN, IM_PATCH):
            if token in vocab:
                return int(vocab[token])
        unk = self.tokenizer.unk_token_id
        if not isinstance(unk, int):
            raise TypeError("tokenizer has no <image>, <im_patch> or <unk> token for image slots")
        return unk

    @cached_property
    def wraps_image(self) -> bool:
        vocab = self.tokenizer.get_vocab()
        return IM_START in vocab and IM_END in vocab

    def prompt_text(self, instruction: str) -> str:
        image = f"{IM_START}{IMAGE_TOKEN}{IM_END}" if self.wraps_image else IMAGE_TOKEN
        message = f"{image}\n{instruction.strip()}"
        if self.template == "llava_llama_2":
            return f"[INST] <<SYS>>\n{_LLAVA_LLAMA_2_SYSTEM}\n<</SYS>>\n\n{message} [/INST]"
        if self.template != "llava_v1":
            raise ValueError(f"unknown LLaVA template {self.template!r}")
        return f"{_LLAVA_V1_SYSTEM} USER: {message} ASSISTANT:"

    def prompt_ids(self, instruction: str) -> list[int]:
        before, after = self.prompt_text(instruction).split(IMAGE_TOKEN, 1)
        bos = self.tokenizer.bos_token_id
        first = self._encode(before)
        rest = self._encode(after)
        if bos is not None and rest[:1] == [bos]:
            rest = rest[1:]
        return [*first, *[self.image_id] * self.image_tokens, *rest]

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text)["input_ids"]  # special tokens as the tokenizer adds them (BOS)
        return [i for i in ids if i != self.image_id]

    def answer_ids(self, answer: str) -> list[int]:
        ids = self.tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]
        return [*ids, self.eos_id]

    def decode(self, ids: list[int]) -> str:
        # LLaMA's tokenizer starts a new word after an added token ("[SEG]", "▁."): no space
        return re.sub(r"\[SEG\] (?=[.,;:!?])", SEG_TOKEN, super().decode(ids))


def chat_format_for(name: str, tokenizer: PreTrainedTokenizerFast, image_tokens: int) -> ChatFormat:
    """The chat format a ModelConfig.chat_format names."""
    if name in SEGAPP_FORMATS:
        return ChatFormat(tokenizer, image_tokens, text_first=name == "segapp_text_first")
    if name in LLAVA_TEMPLATES:
        return LlavaChatFormat(tokenizer, image_tokens, template=name)
    from segapp.errors import ModelError

    choices = ", ".join((*SEGAPP_FORMATS, *LLAVA_TEMPLATES))
    raise ModelError(
        f"unknown chat format {name!r}: use one of {choices}", "ModelConfig.chat_format"
    )
