"""Tokenizer and chat format: special tokens are single ids, image slots expand, answers round-trip."""

from __future__ import annotations

import pytest

from segapp.data.instructions import generate_sample
from segapp.errors import ModelError
from segapp.tokenizer import IMAGE_TOKEN, SEG_TOKEN, ChatFormat, chat_format_for

N_IMAGE = 64


@pytest.fixture(scope="module")
def chat(tokenizer) -> ChatFormat:
    return ChatFormat(tokenizer, N_IMAGE)


def _answers_with_seg(count: int = 6) -> list[str]:
    answers = []
    for i in range(200):
        answer = generate_sample("train", i).answer
        if SEG_TOKEN in answer:
            answers.append(answer)
        if len(answers) == count:
            break
    assert answers, "the synthetic world should give answers with [SEG]"
    return answers


@pytest.mark.parametrize("token", [SEG_TOKEN, IMAGE_TOKEN])
def test_special_tokens_are_single_ids(tokenizer, chat: ChatFormat, token: str) -> None:
    added = {t.content: i for i, t in tokenizer.added_tokens_decoder.items()}
    expected = added[token]
    assert tokenizer(token, add_special_tokens=False)["input_ids"] == [expected]
    assert tokenizer.convert_tokens_to_ids(token) == expected
    assert (chat.seg_id if token == SEG_TOKEN else chat.image_id) == expected
    assert chat.seg_id != chat.image_id


def test_prompt_expands_image_into_slots(chat: ChatFormat) -> None:
    ids = chat.prompt_ids("  Segment the red circle.  ")
    positions = [i for i, t in enumerate(ids) if t == chat.image_id]
    assert len(positions) == N_IMAGE
    assert positions == list(range(positions[0], positions[0] + N_IMAGE))  # one contiguous run
    assert chat.seg_id not in ids and chat.eos_id not in ids
    assert len(ChatFormat(chat.tokenizer, 3).prompt_ids("x")) == len(chat.prompt_ids("x")) - 61


@pytest.mark.parametrize("answer", _answers_with_seg())
def test_answer_ids_and_decode_round_trip(chat: ChatFormat, answer: str) -> None:
    ids = chat.answer_ids(answer)
    assert ids[-1] == chat.eos_id and chat.eos_id not in ids[:-1]
    assert ids.count(chat.seg_id) == answer.count(SEG_TOKEN)
    assert chat.image_id not in ids
    assert chat.decode(ids[:-1]).lower() == answer.strip().lower()


def test_answer_without_seg(chat: ChatFormat) -> None:
    answer = "There is no blue star in the image."
    ids = chat.answer_ids(answer)
    assert chat.seg_id not in ids
    assert chat.decode(ids).lower() == answer.lower()  # eos dropped by decode


def test_text_first_format_puts_the_instruction_before_the_image(tokenizer) -> None:
    image_first = chat_format_for("segapp", tokenizer, N_IMAGE)
    text_first = chat_format_for("segapp_text_first", tokenizer, N_IMAGE)
    instruction = "Segment the red circle."
    words = tokenizer(" " + instruction, add_special_tokens=False)["input_ids"]
    for chat, before in ((image_first, False), (text_first, True)):
        ids = chat.prompt_ids(instruction)
        assert ids.count(chat.image_id) == N_IMAGE
        first_slot = ids.index(chat.image_id)
        instruction_at = next(i for i in range(len(ids)) if ids[i : i + len(words)] == words)
        assert (instruction_at < first_slot) is before
    assert len(text_first.prompt_ids(instruction)) == len(image_first.prompt_ids(instruction))


def test_unknown_chat_format_names_the_choices(tokenizer) -> None:
    with pytest.raises(ModelError, match="segapp_text_first"):
        chat_format_for("segapp_upside_down", tokenizer, N_IMAGE)
