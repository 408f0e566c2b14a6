"""Named peft adapters on one base SegLLM: the concept token, LoRA config, loading, LRU.

Every concept shares one concept-token id: a free embedding row past the tokenizer's vocabulary
(``concept_slot``). Each adapter holds its own value of that row (peft
``trainable_token_indices``), so the active adapter decides what ``<name>`` means.
"""

from __future__ import annotations

import copy
import re
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from segapp.build import Bundle
from segapp.errors import ModelError
from segapp.modeling.segllm import SegLLM

# "<name>" in an instruction; names as segapp.personalize.store.SLUG
CONCEPT_REF = re.compile(r"<([a-z0-9][a-z0-9_-]{0,47})>")
RESERVED = frozenset({"image", "unk", "pad", "s"})  # special tokens, never concept names
_PLACEHOLDER = "<unk>"  # a single special token in segapp tokenizers, swapped for the slot id

# LoRA targets (regexes over SegLLM module names): the LLM's attention projections, the [SEG]
# head and the token-to-image attention of SAM's mask decoder
LLM_TARGETS = r"llm\.model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
HEAD_TARGETS = r"text_hidden_fcs\.(0|2)"
MLP_TARGETS = r"llm\.model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)"
DECODER_TARGETS = r"sam\.mask_decoder\.transformer\.(layers\.\d+\.cross_attn_token_to_image|final_attn_token_to_image)\.(q_proj|v_proj)"


def concept_slot(bundle: Bundle) -> int:
    """The embedding row concept tokens use: the last row, if the tokenizer does not use it."""
    rows = int(bundle.model.llm.config.vocab_size)
    if rows <= len(bundle.tokenizer):
        raise ModelError(
            "this model has no free embedding row for a concept token (vocabulary is full)",
            bundle.source,
        )
    return rows - 1


def lora_config(slot: int, *, rank: int = 8, decoder: bool = True, mlp: bool = False) -> LoraConfig:
    targets = [LLM_TARGETS, HEAD_TARGETS]
    targets += ([DECODER_TARGETS] if decoder else []) + ([MLP_TARGETS] if mlp else [])
    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=rf".*(?:{'|'.join(targets)})",
        trainable_token_indices={"embed_tokens": [slot]},
    )


def concept_names(instruction: str) -> list[str]:
    """Distinct concept names referred to as ``<name>`` in the instruction, in order."""
    found = [n for n in CONCEPT_REF.findall(instruction) if n not in RESERVED]
    return list(dict.fromkeys(found))


def concept_prompt_ids(bundle: Bundle, instruction: str, name: str) -> list[int]:
    """Prompt ids with every ``<name>`` as the one concept-token id."""
    slot = concept_slot(bundle)
    text = instruction.replace(_PLACEHOLDER, " ").replace(f"<{name}>", _PLACEHOLDER)
    unk = bundle.tokenizer.convert_tokens_to_ids(_PLACEHOLDER)
    return [slot if i == unk else i for i in bundle.chat.prompt_ids(text)]


class AdapterBank:
    """Concept adapters loaded side by side on one model; at most ``max_loaded`` (LRU).

    ``activate(key, path)`` makes one adapter the active one (loading it if needed);
    ``deactivate()`` turns every adapter off, so the model computes exactly the base model.
    Not thread-safe by itself: callers hold ``lock`` around activate + forward passes.
    """

    def __init__(self, model: SegLLM, *, max_loaded: int = 8) -> None:
        if max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.model = model
        self.max_loaded = max_loaded
        self.peft: PeftModel | None = None
        self.loaded: OrderedDict[str, str] = OrderedDict()  # key -> adapter name, LRU first
        self.active: str | None = None
        self.lock = threading.RLock()
        self._count = 0
        self._orphans: list[str] = []  # unloaded adapters peft could not delete yet (the last)

    def _name(self) -> str:
        self._count += 1
        return f"c{self._count}"

    def activate(self, key: str, path: Path) -> None:
        """Make the adapter stored at ``path`` active under ``key`` (e.g. "user/concept")."""
        if key in self.loaded:
            self.loaded.move_to_end(key)
        else:
            name = self._name()
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            else:
                self.peft.load_adapter(str(path), adapter_name=name)
            self.loaded[key] = name
            self.peft.set_adapter(name)
            for orphan in self._orphans:
                self.peft.delete_adapter(orphan)
            self._orphans.clear()
            while len(self.loaded) > self.max_loaded:
                _, old = self.loaded.popitem(last=False)
                self.peft.set_adapter(name)
                self.peft.delete_adapter(old)
        assert self.peft is not None
        self.peft.set_adapter(self.loaded[key])
        self._tuner().enable_adapter_layers()
        self.peft.eval()
        for p in self.model.parameters():  # set_adapter marks the adapter trainable
            p.requires_grad_(False)
        self.active = key

    def _tuner(self) -> Any:
        assert self.peft is not None
        return self.peft.base_model  # the LoraModel

    def deactivate(self) -> None:
        if self.peft is not None and self.active is not None:
            self._tuner().disable_adapter_layers()
        self.active = None

    def forget(self, key: str) -> None:
        """Unload ``key`` (after the concept was deleted or refitted)."""
        if key not in self.loaded or self.peft is None:
            return
        name = self.loaded.pop(key)
        if not self.loaded:  # peft keeps at least one adapter: turn it off, delete it later
            self._orphans.append(name)
            self.deactivate()
            return
        other = next(iter(self.loaded.values()))
        self.peft.set_adapter(other)
        self.peft.delete_adapter(name)
        if self.active == key:
            self.deactivate()
        elif self.active is not None:
            self.peft.set_adapter(self.loaded[self.active])


_BANKS: weakref.WeakKeyDictionary[SegLLM, AdapterBank] = weakref.WeakKeyDictionary()
_BANKS_LOCK = threading.Lock()


def bank_for(model: SegLLM, *, max_loaded: int = 8) -> AdapterBank:
    """The one AdapterBank of ``model`` (peft must wrap a model once, however many segmenters
    serve it); ``max_loaded`` applies when it is created."""
    with _BANKS_LOCK:
        bank = _BANKS.get(model)
        if bank is None:
            bank = _BANKS[model] = AdapterBank(model, max_loaded=max_loaded)
        return bank


def base_copy(model: SegLLM) -> SegLLM:
    """A private deep copy of ``model`` without any adapter (what a fit starts from)."""
    bank = _BANKS.get(model)
    if bank is None or bank.peft is None:
        return copy.deepcopy(model)
    with bank.lock:  # no request may switch adapters while the copy is taken
        twin = copy.deepcopy(bank.peft)
    return twin.unload()


def new_training_adapter(model: SegLLM, slot: int, **kwargs) -> PeftModel:
    """``model`` (a private copy) wrapped with one fresh trainable adapter named 'default'."""
    return get_peft_model(model, lora_config(slot, **kwargs))


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
