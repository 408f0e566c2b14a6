"""PersonalSegmenter: a Segmenter whose instructions may name a user's concept (``<my-mug>``).

One base model serves every user: a "lora" concept's adapter is switched on for that request
only (named peft adapters, LRU-bounded), a "persam" concept runs the training-free pipeline on
the cached SAM embedding, and an instruction without a concept runs the base model with every
adapter off. The image cache (``set_image``) is shared by all of them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from segapp.build import Bundle
from segapp.errors import InputError
from segapp.images import check_instruction
from segapp.modeling.generation import Generation
from segapp.personalize.adapters import bank_for, concept_names, concept_prompt_ids
from segapp.personalize.store import ConceptInfo, ConceptStore, validate_slug
from segapp.personalize.verify import Verifier, choose
from segapp.predictor import ImageCache, MaskResult, Result, Segmenter
from segapp.preprocess import postprocess_logits
from segapp.tokenizer import SEG_TOKEN

NOT_FOUND = "Sorry, I cannot find {token}."


class PersonalSegmenter(Segmenter):
    """Segmenter + per-user concepts. ``user`` given at construction is the default for calls
    that name none (a batch job runs for one user); the service passes ``user=`` per call."""

    def __init__(
        self,
        bundle: Bundle,
        store: ConceptStore | None = None,
        *,
        user: str | None = None,
        max_loaded: int = 8,
        max_new_tokens: int = 48,
        verify: bool = True,
    ) -> None:
        """``max_loaded`` bounds the adapters kept loaded on this model (shared by every
        PersonalSegmenter over the same model; the first one sets it). ``verify=False`` keeps a
        LoRA concept's own [SEG] masks even when it has a verifier (for ablations)."""
        super().__init__(bundle, max_new_tokens=max_new_tokens)
        self.store = store or ConceptStore()
        self.user = validate_slug(user, "user") if user is not None else None
        self.bank = bank_for(self.model, max_loaded=max_loaded)
        self.switch_s = 0.0  # time of the last adapter switch (load or set_adapter)
        self.verify = verify
        self._verifiers: dict[str, Verifier | None] = {}  # concept path@version -> verifier

    # ---- which concept an instruction needs ------------------------------------------------
    def concept_for(self, instruction: str, user: str | None = None) -> ConceptInfo | None:
        """The concept named in ``instruction`` (None if it names none); InputError if the
        user has no such concept, no user is given, or it names several."""
        names = concept_names(instruction)
        if not names:
            return None
        user = user if user is not None else self.user
        if user is None:
            raise InputError(f"the instruction names <{names[0]}>: give the user", "--user")
        if len(names) > 1:
            raise InputError("name one concept per instruction", "instruction")
        return self.store.get(validate_slug(user, "user"), names[0])

    def prompt_ids(self, instruction: str, user: str | None = None) -> tuple[str, list[int]]:
        text, ids = super().prompt_ids(instruction)
        info = self.concept_for(text, user)
        if info is None or info.method != "lora":
            return text, ids
        return text, concept_prompt_ids(self.bundle, text, info.name)

    # ---- predict -------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, instruction: str, *, user: str | None = None) -> Result:
        if self.cache is None:
            raise InputError("no image set: call set_image(image) before predict()", "Segmenter")
        return self._predict(self.cache, check_instruction(instruction), user)

    def segment(self, image, instruction: str, *, user: str | None = None) -> Result:  # type: ignore[override]
        self.set_image(image)
        return self.predict(instruction, user=user)

    @torch.inference_mode()
    def predict_batch(
        self, queries: Sequence[tuple[ImageCache, str]], *, user: str | None = None
    ) -> list[Result]:
        """Base-model queries decode together (adapters off); concept queries one by one."""
        plain = [i for i, (_, q) in enumerate(queries) if not concept_names(q)]
        results: list[Result | None] = [None] * len(queries)
        with self.bank.lock:
            self.bank.deactivate()
            for i, r in zip(plain, super().predict_batch([queries[i] for i in plain]), strict=True):
                results[i] = r
        for i, (cache, q) in enumerate(queries):
            if results[i] is None:
                results[i] = self._predict(cache, check_instruction(q), user)
        return [r for r in results if r is not None]

    def _predict(self, cache: ImageCache, text: str, user: str | None) -> Result:
        info = self.concept_for(text, user)
        if info is None:
            with self.bank.lock:
                self.bank.deactivate()
                saved, self.cache = self.cache, cache
                try:
                    return super().predict(text)
                finally:
                    self.cache = saved
        if info.method == "persam":
            return self._predict_persam(cache, text, info)
        return self._predict_lora(cache, text, info)

    def _predict_lora(self, cache: ImageCache, text: str, info: ConceptInfo) -> Result:
        ids = concept_prompt_ids(self.bundle, text, info.name)
        limit = self.bundle.config.max_positions - 4
        if len(ids) >= limit:
            raise InputError(
                f"instruction is too long ({len(ids)} tokens, limit {limit})", "instruction"
            )
        with self.bank.lock:
            t0 = time.perf_counter()
            self.bank.activate(f"{info.user}/{info.name}/{info.version}", Path(info.path))
            t1 = time.perf_counter()
            self.switch_s = t1 - t0
            # greedy throughout: the adapter's answer proposes a mask and the concept's
            # verifier, tuned on greedy answers, decides whether the concept is there (the
            # base model's no-target threshold cost 3-shot false positives: README)
            gen = self.model.generate(
                torch.tensor([ids], device=self.device),
                cache.image_tokens,
                max_new_tokens=self.max_new_tokens,
                no_target=False,
            )
            # the concept row is past the tokenizer: never decoded as text
            answer = self.bundle.chat.decode(
                [i for i in gen.token_ids if i < len(self.bundle.tokenizer)]
            )
            verifier = self._verifier(info) if self.verify else None
            if verifier is None or cache.thumbnail is None:
                masks = self._masks(answer, gen, cache)
            else:
                masks = self._verified(verifier, gen, cache, info)
                if masks and SEG_TOKEN not in answer:
                    answer = f"Sure, {info.token} {SEG_TOKEN}."
            t2 = time.perf_counter()
        for m in masks:
            m.label = info.name
        if not masks and (verifier is not None or SEG_TOKEN not in answer):
            answer = NOT_FOUND.format(token=info.token)
        timings = {
            "adapter_switch": t1 - t0,
            "llm_prefill": gen.prefill_s,
            "generation": gen.decode_s,
            "predict_total": t2 - t0,
        }
        return Result(text, answer, masks, timings)

    def _verifier(self, info: ConceptInfo) -> Verifier | None:
        key = f"{info.path}@{info.version}"
        if key not in self._verifiers:
            if len(self._verifiers) >= 64:
                self._verifiers.pop(next(iter(self._verifiers)))
            self._verifiers[key] = Verifier.load(Path(info.path))
        return self._verifiers[key]

    def _verified(
        self, verifier: Verifier, gen: Generation, cache: ImageCache, info: ConceptInfo
    ) -> list[MaskResult]:
        """The candidate the concept's verifier picks (the adapter's [SEG] masks among SAM's
        grid masks), or none when no candidate looks like the concept."""
        own = self._seg_logits(gen, cache)[0] if len(gen.seg_hidden) else None
        assert cache.thumbnail is not None
        picked = choose(
            verifier, self.model, cache.thumbnail, cache.sam_embedding, cache.sam_input_size, own
        )
        if picked is None:
            return []
        low, score = picked
        logits = postprocess_logits(
            low, cache.sam_input_size, cache.original_size, self.model.sam.image_encoder.img_size
        )
        mask = (logits[0] > 0).cpu().numpy()
        if verifier.reference is not None and cache.pixels is not None:
            cell = max(cache.original_size) / low.shape[-1]  # image pixels per low-res cell
            mask = verifier.reference.refine(mask, cache.pixels, cell)
        return [MaskResult(info.name, score, mask)] if mask.any() else []

    def _predict_persam(self, cache: ImageCache, text: str, info: ConceptInfo) -> Result:
        from segapp.personalize.persam import load_persam, persam_logits

        t0 = time.perf_counter()
        target, threshold = load_persam(Path(info.path))
        # cascaded refinement feeds mask logits, a negative point and a box back into SAM: the
        # tiny SAM was only ever trained on positive point prompts, and measured it turns a
        # good first mask into noise there, so it runs for the published SAM sizes only
        refine = self.bundle.config.sam_variant != "tiny"
        out = persam_logits(
            self.model, cache.sam_embedding, cache.sam_input_size, target, threshold, refine=refine
        )
        masks: list[MaskResult] = []
        if out is not None:
            low, score = out
            logits = postprocess_logits(
                low,
                cache.sam_input_size,
                cache.original_size,
                self.model.sam.image_encoder.img_size,
            )
            mask = (logits[0] > 0).cpu().numpy()
            if mask.any():
                masks.append(MaskResult(info.name, max(0.0, min(1.0, score)), mask))
        answer = f"Sure, {info.token} [SEG]." if masks else NOT_FOUND.format(token=info.token)
        return Result(text, answer, masks, {"predict_total": time.perf_counter() - t0})

    def forget(self, user: str, name: str) -> None:
        """Drop a deleted or refitted concept's loaded adapters."""
        with self.bank.lock:
            for key in [k for k in self.bank.loaded if k.startswith(f"{user}/{name}/")]:
                self.bank.forget(key)
