"""Weights directories and the Segmenter, on a randomly initialised tiny model (CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from safetensors.torch import load_file, save_file

from segapp.build import load_bundle, load_model
from segapp.data.instructions import generate_sample
from segapp.errors import InputError, ModelError
from segapp.predictor import MaskResult, Result, Segmenter
from segapp.preprocess import postprocess_logits, resized_shape

INSTRUCTION = "Segment the red circle."


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return generate_sample("test", 0).image


@pytest.fixture
def segmenter(random_model_dir: Path) -> Segmenter:
    return Segmenter(load_bundle(random_model_dir), max_new_tokens=8)


@pytest.fixture
def model_copy(random_model_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(random_model_dir, out)
    return out


# ---- save / load -------------------------------------------------------------------------------
def test_round_trip_gives_identical_weights_and_outputs(
    random_model_dir: Path, image: np.ndarray
) -> None:
    a, b = load_bundle(random_model_dir), load_bundle(random_model_dir)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    # the LM head is not stored: it must come back tied to the embedding
    assert torch.equal(a.model.llm.lm_head.weight, a.model.llm.get_input_embeddings().weight)

    ra = Segmenter(a, max_new_tokens=8).segment(image, INSTRUCTION)
    rb = Segmenter(b, max_new_tokens=8).segment(image, INSTRUCTION)
    assert ra.answer == rb.answer
    assert len(ra.masks) == len(rb.masks)
    for ma, mb in zip(ra.masks, rb.masks, strict=True):
        assert ma.mask.shape == image.shape[:2]
        np.testing.assert_array_equal(ma.mask, mb.mask)
        assert ma.score == mb.score and ma.label == mb.label


def _rewrite(path: Path, change) -> str:
    state = load_file(str(path))
    key = change(state)
    save_file(state, str(path))
    return key


def test_missing_weights_file(model_copy: Path) -> None:
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="missing model.safetensors"):
        load_bundle(model_copy)


def test_missing_parameter_is_named(model_copy: Path) -> None:
    def drop(state: dict) -> str:
        key = sorted(state)[len(state) // 2]
        del state[key]
        return key

    key = _rewrite(model_copy / "model.safetensors", drop)
    with pytest.raises(ModelError) as info:
        load_bundle(model_copy)
    assert key in str(info.value) and "missing" in str(info.value)


def test_wrong_shape_is_named(model_copy: Path) -> None:
    def grow(state: dict) -> str:
        key = next(k for k in sorted(state) if k.endswith("weight") and state[k].ndim == 2)
        state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])
        return key

    key = _rewrite(model_copy / "model.safetensors", grow)
    with pytest.raises(ModelError) as info:
        load_bundle(model_copy)
    assert key in str(info.value) and "shape" in str(info.value)


def test_unexpected_parameter_is_named(model_copy: Path) -> None:
    def add(state: dict) -> str:
        state["projector.extra.weight"] = torch.zeros(3)
        return "projector.extra.weight"

    key = _rewrite(model_copy / "model.safetensors", add)
    with pytest.raises(ModelError, match="unexpected") as info:
        load_bundle(model_copy)
    assert key in str(info.value)


def test_unknown_config_field(model_copy: Path) -> None:
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["flux_capacitor"] = 3
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="flux_capacitor"):
        load_bundle(model_copy)


def _with_config(model_dir: Path, **changes) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, **changes}))


def test_no_target_openings_take_the_first_token_above_the_threshold(model_copy: Path) -> None:
    _with_config(
        model_copy,
        no_target_openings=["There is no", "Sorry, I cannot find"],
        no_target_threshold=0.3,
    )
    bundle = load_bundle(model_copy)
    model, chat = bundle.model, bundle.chat
    there, sorry = chat.answer_ids("There")[0], chat.answer_ids("Sorry")[0]
    other = chat.answer_ids("It")[0]
    assert model.no_target_ids == tuple(sorted({there, sorry}))
    probs = torch.full((3, len(chat.tokenizer)), 1e-6)
    probs[0, [other, there, sorry]] = torch.tensor([0.5, 0.2, 0.15])  # openings 0.35 >= 0.3
    probs[1, [other, there, sorry]] = torch.tensor([0.7, 0.1, 0.15])  # 0.25: greedy
    probs[2, [other, there, sorry]] = torch.tensor([0.3, 0.1, 0.6])  # greedy is an opening
    assert model.first_tokens(probs.log()) == [there, other, sorry]
    model.no_target_ids = ()
    assert model.first_tokens(probs.log()) == [other, other, sorry]


def test_every_decoding_path_opens_with_a_no_target_token_above_the_threshold(
    model_copy: Path, image: np.ndarray
) -> None:
    from segapp.token_reduction import predict_reduced

    _with_config(model_copy, no_target_openings=["There is no"], no_target_threshold=1e-9)
    bundle = load_bundle(model_copy)
    model, chat = bundle.model, bundle.chat
    segmenter = Segmenter(bundle, max_new_tokens=3)
    segmenter.set_image(image)
    ids = torch.tensor([segmenter.prompt_ids(INSTRUCTION)[1]])
    there = chat.answer_ids("There")[0]
    assert model.generate(ids, segmenter.cache.image_tokens).token_ids[0] == there
    assert chat.answer_ids(segmenter.predict(INSTRUCTION).answer)[0] == there
    reduced = predict_reduced(segmenter, INSTRUCTION, keep=0.5)
    assert chat.answer_ids(reduced.answer)[0] == there
    # no_target=False (concept queries) decodes as a model without openings does
    own = model.generate(ids, segmenter.cache.image_tokens, no_target=False).token_ids
    model.no_target_ids = ()
    assert own == model.generate(ids, segmenter.cache.image_tokens).token_ids


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"no_target_threshold": 0.0}, "no_target_threshold must be in"),
        ({"no_target_threshold": 1.5}, "no_target_threshold must be in"),
        ({"no_target_openings": ["   "]}, "has no tokens"),
        ({"target_threshold": 1.5}, "target_threshold must be in"),
        ({"target_head": True}, "missing parameter target_head.weight"),
    ],
)
def test_bad_no_target_settings_are_named(model_copy: Path, changes: dict, message: str) -> None:
    _with_config(model_copy, **changes)
    with pytest.raises(ModelError, match=message):
        load_bundle(model_copy)


def test_unknown_preset_lists_choices() -> None:
    with pytest.raises(ModelError, match="nope") as info:
        load_model("nope")
    assert "tiny" in str(info.value)


# ---- Segmenter cache ---------------------------------------------------------------------------
def test_predict_uses_the_cache_only(
    segmenter: Segmenter, image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    segmenter.set_image(image)
    calls = dict(segmenter.encoder_calls)
    assert calls == {"vision": 1, "sam": 1}

    def boom(*args, **kwargs):
        raise AssertionError("an encoder ran during predict")

    monkeypatch.setattr(segmenter.model.vision_tower, "forward", boom)
    monkeypatch.setattr(segmenter.model.sam.image_encoder, "forward", boom)
    first = segmenter.predict(INSTRUCTION)
    second = segmenter.predict("Where is the blue square?")
    assert segmenter.encoder_calls == calls
    assert isinstance(first.answer, str) and isinstance(second.answer, str)
    assert first.instruction == INSTRUCTION
    assert all(m.mask.shape == image.shape[:2] for m in first.masks + second.masks)


def test_set_image_reencodes_only_new_pixels(segmenter: Segmenter, image: np.ndarray) -> None:
    cache = segmenter.set_image(image)
    assert segmenter.set_image(image.copy()) is cache  # same pixels, new array
    assert segmenter.encoder_calls == {"vision": 1, "sam": 1}
    changed = image.copy()
    changed[0, 0] ^= 255
    new = segmenter.set_image(changed)
    assert new.key != cache.key
    assert segmenter.encoder_calls == {"vision": 2, "sam": 2}


def test_predict_before_set_image(segmenter: Segmenter) -> None:
    with pytest.raises(InputError, match="set_image"):
        segmenter.predict(INSTRUCTION)


@pytest.mark.parametrize("instruction", ["", "   \n\t"])
def test_empty_instruction(segmenter: Segmenter, image: np.ndarray, instruction: str) -> None:
    segmenter.set_image(image)
    with pytest.raises(InputError, match="empty"):
        segmenter.predict(instruction)


def test_non_square_image_masks_at_original_size(segmenter: Segmenter) -> None:
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, size=(180, 300, 3), dtype=np.uint8)  # H x W
    cache = segmenter.set_image(wide)
    size = segmenter.model.sam.image_encoder.img_size
    assert cache.original_size == (180, 300)
    assert cache.sam_input_size == resized_shape(180, 300, size)
    dim = segmenter.bundle.config.prompt_dim
    with torch.no_grad():
        low, iou = segmenter.model.decode_masks(cache.sam_embedding, torch.zeros(2, 1, dim))
    assert iou.shape == (2, 1)
    logits = postprocess_logits(low, cache.sam_input_size, cache.original_size, size)
    assert tuple(logits.shape) == (2, 180, 300)
    assert torch.isfinite(logits).all()


def test_prompts_on_several_images_decode_as_one_image_at_a_time(random_model_dir: Path) -> None:
    model = load_bundle(random_model_dir).model
    torch.manual_seed(1)
    size = model.sam.image_encoder.img_size
    with torch.no_grad():
        emb = model.encode_sam(torch.rand(3, 3, size, size))
        sparse = torch.randn(5, 2, model.sam.prompt_encoder.embed_dim)
        image_of = torch.tensor([2, 0, 2, 1, 0])
        low, iou = model.decode_masks(emb, sparse, image_of)
        for i, b in enumerate(image_of.tolist()):
            one_low, one_iou = model.decode_masks(emb[b : b + 1], sparse[i : i + 1])
            torch.testing.assert_close(low[i], one_low[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(iou[i], one_iou[0], rtol=1e-4, atol=1e-4)
    # not a trivial agreement: the same prompt reads differently on another image
    assert (low[0] - model.decode_masks(emb[1:2], sparse[:1])[0][0]).abs().max() > 1e-3


def test_training_loss_heads_only_the_answer_yet_matches_the_full_forward(
    random_model_dir: Path,
) -> None:
    from segapp.modeling.losses import lm_loss, text_loss

    llm = load_bundle(random_model_dir).model.llm
    torch.manual_seed(2)
    ids = torch.randint(0, llm.config.vocab_size, (3, 12))
    attn = torch.ones_like(ids)
    attn[2, 9:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 6:9] = ids[:, 6:9]
    labels[0, 9:] = ids[0, 9:]
    full = llm(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    ce, last = lm_loss(llm, labels, input_ids=ids, attention_mask=attn)
    torch.testing.assert_close(ce, text_loss(full.logits, labels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, full.hidden_states[-1], rtol=1e-5, atol=1e-5)
    none = torch.full_like(labels, -100)
    assert torch.isnan(lm_loss(llm, none, input_ids=ids)[0])  # as the full path: no labels


# ---- results as JSON ---------------------------------------------------------------------------
def _disc(height: int = 40, width: int = 50) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    cv2.circle(mask, (30, 18), 9, 1, -1)
    return mask.astype(bool)


def test_result_json_keys() -> None:
    disc = _disc()
    record = MaskResult("red circle", 0.87654321, disc).to_dict()
    assert set(record) == {"label", "score", "bbox", "area", "rle", "polygons"}
    assert record["label"] == "red circle" and record["score"] == pytest.approx(0.8765)
    assert record["area"] == int(disc.sum())
    ys, xs = np.nonzero(disc)
    assert record["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert record["rle"]["size"] == [40, 50] and isinstance(record["rle"]["counts"], str)
    decoded = mask_utils.decode(
        {"size": record["rle"]["size"], "counts": record["rle"]["counts"].encode()}
    )
    np.testing.assert_array_equal(decoded.astype(bool), disc)
    assert record["polygons"] and all(len(p) >= 3 for p in record["polygons"])

    result = Result("Segment the disc.", "Sure, disc [SEG].", [MaskResult("disc", 0.5, disc)])
    row = json.loads(json.dumps(result.to_dict(image="a.png")))
    assert list(row) == ["image", "instruction", "answer", "masks"]
    assert row["image"] == "a.png" and len(row["masks"]) == 1
    assert set(row["masks"][0]) == set(record)


# ---- image tokens ------------------------------------------------------------------------------
def test_merged_tokens_hold_their_own_block_of_patches(random_model_dir: Path) -> None:
    """With vision_merge k, token (i, j) is the projector of patches (ki..ki+k-1, kj..kj+k-1)."""
    model = load_bundle(random_model_dir).model
    k = model.vision_merge
    assert k == 2
    grid, width = 16, 128
    feats = torch.randn(1, grid * grid, width)
    tokens = model.project(feats, 256)
    assert tokens.shape == (1, (grid // k) ** 2, model.llm.config.hidden_size)
    patches = feats.reshape(grid, grid, width)
    i, j = 3, 5
    block = torch.cat([patches[k * i + a, k * j + b] for a in range(k) for b in range(k)])
    expected = (
        model.projector(block)
        + model.image_pos(model.patch_position_encoding(64, 256))[i * (grid // k) + j]
    )
    torch.testing.assert_close(tokens[0, i * (grid // k) + j], expected)


def test_patch_positions_follow_sam_point_encoding(random_model_dir: Path) -> None:
    """A token's position code is SAM's encoding of its patch centre in SAM's input frame."""
    model = load_bundle(random_model_dir).model
    pe = model.patch_position_encoding(64, 256)  # 8 x 8 tokens over a 256 px vision input
    sam_size = model.sam.image_encoder.img_size
    centre = torch.tensor([[[(5 + 0.5) * sam_size / 8, (2 + 0.5) * sam_size / 8]]])
    prompt = model.sam.prompt_encoder
    expected = prompt.pe_layer.forward_with_coords(centre, prompt.input_image_size)[0, 0]
    torch.testing.assert_close(pe[2 * 8 + 5], expected)


def test_pointer_adds_sams_point_token_at_the_chosen_patch(random_model_dir: Path) -> None:
    """With a [SEG] pointer each prompt is [text_hidden_fcs(h), SAM point token at the centre
    of the patch the pointer picks]; a subset of tokens with their patch numbers (token
    reduction) points at the same place as the full grid when the winner is kept."""
    model = load_bundle(random_model_dir).model
    assert model.seg_pointer is not None
    torch.manual_seed(0)
    seg, image = torch.randn(3, 128), torch.randn(64, 128)
    with torch.no_grad():
        prompts = model.seg_prompts(seg, image)
        winner = model.seg_pointer.scores(seg, image).argmax(-1)
        assert prompts.shape == (3, 2, model.sam.prompt_encoder.embed_dim)
        torch.testing.assert_close(prompts[:, 0], model.text_hidden_fcs(seg))
        size = model.sam.image_encoder.img_size
        row, col = winner // 8, winner % 8
        centres = torch.stack([(col + 0.5) * size / 8, (row + 0.5) * size / 8], -1).float()
        torch.testing.assert_close(prompts[:, 1:], model.point_token(centres))
        # the kept subset: every winner plus every third token, with their patch numbers
        kept = torch.unique(torch.cat([winner, torch.arange(0, 64, 3)]))
        torch.testing.assert_close(model.seg_prompts(seg, image[kept], kept), prompts)
        # no image hidden states (video's One-Token-Seg-All): the [SEG] token alone
        assert model.seg_prompts(seg).shape == (3, 1, model.sam.prompt_encoder.embed_dim)


def test_pointer_training_choice_is_on_target_when_forced() -> None:
    from segapp.train_losses import pointer_choice

    scores = torch.tensor([[5.0, 1.0, 0.0, 2.0], [0.0, 3.0, 1.0, 0.0]])
    cover = torch.tensor([[0.0, 0.0, 0.9, 0.5], [0.0, 0.6, 0.0, 0.0]])
    forced = pointer_choice(scores, cover, 1.0, None)
    assert forced.tolist() == [3, 1]  # best-scored token among those on the target
    free = pointer_choice(scores, cover, 0.0, None)
    assert free.tolist() == [0, 1]  # where the pointer points, right or wrong


def test_mask_labels_drop_lead_in_words() -> None:
    from segapp.predictor import mask_labels

    answer = "A banana is yellow, so it is the medium striped yellow star [SEG]."
    assert mask_labels(answer, 1) == ["medium striped yellow star"]
    assert mask_labels("Sure, [SEG].", 1) == ["target 1"]
    # [SEG] first, the description after it (the bundled model's answers)
    answer = "It is [SEG], the small dotted red circle at the top left."
    assert mask_labels(answer, 1) == ["small dotted red circle"]
    answer = "It is [SEG], the medium pink star: only one object is pink."
    assert mask_labels(answer, 1) == ["medium pink star"]
    answer = "There are two hearts: the one on the left [SEG] and the large one [SEG]."
    assert mask_labels(answer, 2) == ["one on the left", "large one"]
    answer = "The hearts: the one on the left [SEG], the large one [SEG]; two in all."  # list_first
    assert mask_labels(answer, 2) == ["one on the left", "large one"]
    assert mask_labels("Sure, [SEG], [SEG].", 3) == ["target 1", "target 2", "target 3"]


def test_prefix_attention_trains_on_what_generation_computes(tokenizer) -> None:
    """A prefix LM's teacher-forced hidden states are the ones prefill + KV-cached decoding
    give, and its image tokens (unlike a causal model's) read the prompt tokens after them."""
    from segapp.build import build_segllm
    from segapp.config import MODEL_PRESETS
    from segapp.modeling.losses import lm_loss
    from segapp.modeling.segllm import SegLLM

    torch.manual_seed(3)
    cfg = MODEL_PRESETS["tiny"]
    models = {
        prefix: build_segllm(cfg.replace(prefix_attention=prefix), tokenizer).eval()
        for prefix in (False, True)
    }
    models[True].load_state_dict(models[False].state_dict())  # same weights, other mask
    model = models[True]
    n = model.image_grid_tokens
    img, vocab = model.image_token_id, 200
    prompt = [1, *torch.randint(5, vocab, (4,)).tolist(), *[img] * n, 7, 8]
    answer = torch.randint(5, vocab, (3,)).tolist()
    ids = torch.tensor([prompt + answer])
    labels = torch.full_like(ids, -100)
    labels[0, len(prompt) :] = ids[0, len(prompt) :]
    assert SegLLM.prompt_lengths(labels).tolist() == [len(prompt)]
    image = torch.randn(1, n, cfg.llm_hidden)
    with torch.no_grad():
        embeds = model.embed_inputs(ids, image)
        mask = model.lm_attention_mask(
            SegLLM.prompt_lengths(labels), ids.shape[1], torch.ones_like(ids), embeds.dtype
        )
        _, taught = lm_loss(model.llm, labels, inputs_embeds=embeds, attention_mask=mask)
        pre = embeds[:, : len(prompt)]
        out = model.llm(
            inputs_embeds=pre,
            attention_mask=model.prefill_attention_mask(pre),
            use_cache=True,
            output_hidden_states=True,
        )
        torch.testing.assert_close(
            taught[:, : len(prompt)], out.hidden_states[-1], rtol=1e-4, atol=1e-4
        )
        step = model.llm(
            inputs_embeds=embeds[:, len(prompt) : len(prompt) + 1],
            past_key_values=out.past_key_values,
            use_cache=True,
            output_hidden_states=True,
        )
        torch.testing.assert_close(
            taught[:, len(prompt)], step.hidden_states[-1][:, 0], rtol=1e-4, atol=1e-4
        )
        # the first image token reads the last one (and the prompt's last words) only with
        # prefix attention
        later = embeds.clone()
        later[0, len(prompt) - 1] += 1.0
        first = prompt.index(img)
        for prefix, m in models.items():
            mk = m.lm_attention_mask(
                SegLLM.prompt_lengths(labels), ids.shape[1], None, embeds.dtype
            )
            a = lm_loss(m.llm, labels, inputs_embeds=embeds, attention_mask=mk)[1]
            b = lm_loss(m.llm, labels, inputs_embeds=later, attention_mask=mk)[1]
            moved = float((a[0, first] - b[0, first]).abs().max())
            assert (moved > 1e-4) == prefix, (prefix, moved)


def _box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """A 100 x 100 bool mask holding one rectangle."""
    m = np.zeros((100, 100), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_group_masks_add_the_components_no_target_mask_covers() -> None:
    from segapp.predictor import MaskResult, group_masks

    a, b, c = _box(5, 25, 5, 25), _box(5, 25, 60, 80), _box(60, 90, 30, 60)
    speck = _box(95, 97, 95, 97)  # 4 px < 0.3% of the image: noise, not a target
    group = MaskResult("circles", 0.9, a | b | c | speck)
    first = MaskResult("red one", 0.8, a)
    repeat = MaskResult("red one", 0.7, a & _box(0, 100, 0, 20))  # IoU 0.75 with the first
    out = group_masks(group, [first, repeat, MaskResult("empty", 0.5, np.zeros((100, 100), bool))])
    assert [m.label for m in out] == ["red one", "circles 2", "circles 3"]
    assert np.array_equal(out[1].mask, b) and np.array_equal(out[2].mask, c)
    assert out[1].score == 0.9
    # targets that already cover every component: nothing is added
    found = [MaskResult("x", 0.8, a), MaskResult("y", 0.8, b), MaskResult("z", 0.8, c)]
    assert [m.label for m in group_masks(group, found)] == ["x", "y", "z"]


def test_complete_targets_drops_repeats_and_adds_the_uncovered_marked_objects() -> None:
    from segapp.targets import complete_targets

    a, b, c = _box(5, 25, 5, 25), _box(5, 25, 60, 80), _box(60, 90, 30, 60)
    empty = np.zeros((100, 100), bool)
    repeat = a & _box(0, 100, 0, 20)  # IoU 0.75 with a
    named = [a, repeat, empty, b]
    inside_b = _box(10, 20, 62, 78)  # half or more of it lies on b: a part of b, not a target
    speck = _box(95, 97, 95, 97)  # 4 px < 0.3% of the image
    overlapping_c = c | _box(60, 90, 60, 62)  # IoU > 0.5 with c, added first
    marked = [inside_b, speck, c, overlapping_c, _box(40, 55, 80, 95)]
    kept, added = complete_targets(named, marked)
    assert kept == [0, 3]
    assert added == [2, 4]
    # nothing marked: the named masks, repeats and empties dropped
    assert complete_targets(named, []) == ([0, 3], [])


def test_marked_prompts_point_at_the_marked_tokens_most_probable_first(
    random_model_dir: Path,
) -> None:
    from segapp.modeling.generation import Generation
    from segapp.targets import marked_prompts, target_probs

    model = load_bundle(random_model_dir).model
    torch.manual_seed(0)
    width, n = model.llm.config.hidden_size, model.image_grid_tokens
    gen = Generation([], torch.randn(2, width), 0, image_hidden=torch.randn(n, width))
    assert target_probs(model, gen) is None  # no head: nothing is marked
    assert len(marked_prompts(model, gen)[0]) == 0
    model.target_head = torch.nn.Linear(width, 1)
    model.target_threshold = 0.5
    with torch.inference_mode():
        probs = target_probs(model, gen)
        prompts, kept = marked_prompts(model, gen)
    assert probs is not None and 0 < len(kept) < n
    assert len(prompts) == len(kept) == int((probs >= 0.5).sum())
    assert torch.all(kept[:-1] >= kept[1:]) and float(kept.min()) >= 0.5
    tokens = [int((probs == p).nonzero()[0, 0]) for p in kept]
    centres = model.patch_centres(n, model.vision_size)[tokens]
    torch.testing.assert_close(prompts[:, 1:2], model.point_token(centres))
    # each prompt carries the [SEG] whose pointer scores its token highest
    assert model.seg_pointer is not None
    best = model.seg_pointer.scores(gen.seg_hidden, gen.image_hidden).argmax(0)[tokens]
    torch.testing.assert_close(prompts[:, 0], model.text_hidden_fcs(gen.seg_hidden[best]))
