"""Greedy decoding of a SegLLM with a KV cache (`SegLLM.generate` / `generate_batch`).

Keeps the last-layer hidden state of every step that emits `[SEG]` (what the masks are decoded
from) and the image tokens' hidden states (what the `[SEG]` pointer scores). The first answer
token may open a no-target answer below greedy's bar (`first_tokens`).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

if TYPE_CHECKING:
    from segapp.modeling.segllm import SegLLM

# the KV cache's keyword and output field: `cache` since transformers 5.x renamed it (the old
# `past_key_values` still works there, with a deprecation warning on every call)
_LAYER_ARGS = inspect.signature(LlamaDecoderLayer.forward).parameters
CACHE = "cache" if "cache" in _LAYER_ARGS else "past_key_values"


@dataclass
class Generation:
    """Greedy decoding output for one sequence."""

    token_ids: list[int]  # generated ids, without the prompt
    seg_hidden: torch.Tensor  # M x H hidden states that predicted each [SEG]
    prefill_tokens: int  # sequence length at prefill (image tokens included)
    prefill_s: float = 0.0  # wall time of the prefill forward pass
    decode_s: float = 0.0  # wall time of the token-by-token loop
    image_hidden: torch.Tensor | None = None  # N' x H last-layer hidden states of image tokens
    image_index: torch.Tensor | None = None  # N' patch index of each (None: 0..N-1)


def first_tokens(model: SegLLM, logits: torch.Tensor) -> list[int]:
    """The first answer token of each row (logits B x V after the prompt): the argmax,
    unless the first tokens of the no-target answers ("There is no ...") together have
    probability >= `no_target_threshold`; then the likeliest of them.

    Whether anything in the image matches is decided at this one token (every later one
    follows greedily), and greedy decoding needs that token to win outright: a model that
    is unsure whether the object is there starts describing one. A threshold below 0.5,
    chosen on a validation split, trades a few answers about a present object for
    "nothing here" on many absent ones (model card, weights/tiny/README.md).
    """
    greedy = logits.argmax(-1)
    if not model.no_target_ids:
        return [int(i) for i in greedy.tolist()]
    ids = torch.tensor(model.no_target_ids, device=logits.device)
    probs = logits.float().softmax(-1)[:, ids]  # B x K
    opening = ids[probs.argmax(-1)]
    chosen = torch.where(probs.sum(-1) >= model.no_target_threshold, opening, greedy)
    return [int(i) for i in chosen.tolist()]


@torch.inference_mode()
def generate_batch(
    model: SegLLM,
    input_ids: torch.Tensor,
    image_tokens: torch.Tensor,
    *,
    max_new_tokens: int,
    no_target: bool = True,
) -> list[Generation]:
    """Greedy decoding of B equal-length prompts at once (input_ids B x L, images B x N x H).

    A row that has emitted `</s>` keeps riding along (its outputs are ignored) until every
    row is done; `generate` is the one-row case. Wall times are shared equally.
    """
    t0 = time.perf_counter()
    batch = input_ids.shape[0]
    embeds = model.embed_inputs(input_ids, image_tokens)
    out = model.llm(
        inputs_embeds=embeds,
        attention_mask=model.prefill_attention_mask(embeds),
        use_cache=True,
        output_hidden_states=True,
    )
    past, logits, hidden = getattr(out, CACHE), out.logits[:, -1], out.hidden_states[-1][:, -1]
    slots = input_ids == model.image_token_id  # kept for the pointer only
    image_hidden = [
        out.hidden_states[-1][row][slots[row]] if model.seg_pointer is not None else None
        for row in range(batch)
    ]
    t1 = time.perf_counter()
    tokens: list[list[int]] = [[] for _ in range(batch)]
    seg_hidden: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    done = [False] * batch
    limit = model.llm.config.max_position_embeddings - input_ids.shape[1]
    for step in range(min(max_new_tokens, limit)):
        first = step == 0 and no_target
        next_ids = first_tokens(model, logits) if first else logits.argmax(-1).tolist()
        for row, next_id in enumerate(next_ids):
            if done[row]:
                continue
            if next_id == model.eos_token_id:
                done[row] = True
                continue
            tokens[row].append(next_id)
            if next_id == model.seg_token_id:
                seg_hidden[row].append(hidden[row])
        if all(done):
            break
        embedded = model.llm.get_input_embeddings()(
            torch.tensor(next_ids, device=model.device)[:, None]
        )
        out = model.llm(
            inputs_embeds=embedded, use_cache=True, output_hidden_states=True, **{CACHE: past}
        )
        past, logits, hidden = (
            getattr(out, CACHE),
            out.logits[:, -1],
            out.hidden_states[-1][:, -1],
        )
    t2 = time.perf_counter()
    width = model.llm.config.hidden_size
    return [
        Generation(
            tokens[row],
            torch.stack(seg_hidden[row]) if seg_hidden[row] else embeds.new_zeros(0, width),
            int(input_ids.shape[1]),
            (t1 - t0) / batch,
            (t2 - t1) / batch,
            image_hidden[row],
        )
        for row in range(batch)
    ]
