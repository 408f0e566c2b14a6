"""Few-shot personalization: teach segapp a user's own object from 1-5 (image, mask) shots.

Public API (other parts -- service, REST, UI, batch -- use only this)::

    from segapp.personalize import ConceptStore, PersonalSegmenter, fit_concept

    store = ConceptStore(Path("weights/adapters"))       # default root: weights/adapters
    info = fit_concept(bundle, store, "alice", "my-mug", images, masks,
                       steps=None, method="lora", progress=None)   # -> ConceptInfo
    store.list("alice")            # -> list[ConceptInfo], only alice's concepts
    store.get("alice", "my-mug")   # -> ConceptInfo; InputError if alice has no such concept
    store.delete("alice", "my-mug")

    seg = PersonalSegmenter(bundle, store, max_loaded=8)   # one base model, many adapters
    seg.set_image(image)                                   # as Segmenter (encoders cached)
    seg.predict("segment <my-mug>", user="alice")          # -> predictor.Result
    seg.predict("the red circle")                          # no concept: the base model, unchanged
    seg.segment(image, "where is <my-mug>?", user="alice")

- ``images``: list of H x W x 3 uint8 arrays; ``masks``: list of H x W bool arrays (same H, W
  as their image, not empty). ``progress(fraction 0..1, message)`` is called while fitting.
- ``method``: "lora" (peft LoRA on the LLM's q/v projections + the concept token's embedding
  row + a LoRA on the [SEG] head and SAM's mask decoder, then a concept verifier that picks,
  among the adapter's [SEG] mask and SAM's point-grid masks, the one that looks like the
  concept, or none: see verify.py) or "persam" (training-free, PerSAM-style:
  SAM target feature + location prior + positive/negative points + cascaded refinement).
- Names: user ids and concept names are slugs ``[a-z0-9][a-z0-9_-]{0,47}``; an instruction names
  a concept as ``<name>``. A bad slug, an unknown concept or another user's concept raises
  ``segapp.errors.InputError`` (CLI: one line, exit code 2).
- Adapters are named peft adapters on the one base model, switched per request (``user`` is an
  argument of every predict, never sticky state); at most ``max_loaded`` stay loaded (LRU).
  With no concept in the instruction every adapter is disabled: outputs equal the base model's.
- Store layout: ``<root>/<user>/<concept>/`` = peft ``save_pretrained`` files
  (adapter_config.json, adapter_model.safetensors) + verifier.safetensors (LoRA concepts) +
  concept.json (ConceptInfo); written into a
  temporary sibling directory and renamed into place, so a crash mid-save keeps the old version.
"""

from segapp.personalize.store import ConceptInfo, ConceptStore, validate_slug

__all__ = [
    "ConceptInfo",
    "ConceptStore",
    "PersonalSegmenter",
    "fit_concept",
    "validate_slug",
]


def __getattr__(name: str):  # heavy (torch / peft) parts load on first use
    if name == "fit_concept":
        from segapp.personalize.fit import fit_concept

        return fit_concept
    if name == "PersonalSegmenter":
        from segapp.personalize.segmenter import PersonalSegmenter

        return PersonalSegmenter
    raise AttributeError(name)
