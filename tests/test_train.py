"""Training from scratch: losses fall, the output directory loads, and runs resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from segapp.build import load_bundle
from segapp.config import MODEL_PRESETS, TrainConfig
from segapp.data.instructions import generate_sample
from segapp.data.queries import NO_TARGET_OPENINGS
from segapp.predictor import Segmenter
from segapp.train import train

TINY = MODEL_PRESETS["tiny"]
# one thread: the tests must not fight a busy machine (OpenMP barriers spin when cores are taken)
THREADS = 1
# a two-image, two-step run (two SAM warm-up steps): enough to write every output file
SMALL = TrainConfig(
    steps=2,
    sam_warmup_steps=2,
    images_per_batch=2,
    queries_per_image=1,
    workers=0,
    checkpoint_every=1000,
    threads=THREADS,
    warmup=1,
)


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # train() sets the process-wide thread count


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def _fresh_model_and_batch(images: int, queries_per_image: int):
    """An untrained tiny SegLLM (the bundled tokenizer) and one seeded training batch."""
    from segapp.build import build_segllm
    from segapp.data.batches import make_batch
    from segapp.tokenizer import ChatFormat

    bundle = load_bundle(Path("weights/tiny"))
    cfg = MODEL_PRESETS["tiny"]
    model = build_segllm(cfg, bundle.tokenizer)
    chat = ChatFormat(bundle.tokenizer, bundle.chat.image_tokens)
    rng = np.random.default_rng(0)
    return (
        model,
        cfg,
        make_batch(rng, chat, cfg, images=images, queries_per_image=queries_per_image),
    )


def _terms_off_stage1_on(tcfg: TrainConfig, **heads: bool):
    """The untrained model and its batch, with forward_losses' terms: the joint stage without
    the option, stage 1 with it, and the joint stage with it (the same pointer choices)."""
    from segapp.train_losses import AuxHeads, forward_losses

    model, cfg, batch = _fresh_model_and_batch(2, 2)
    aux = AuxHeads(cfg, **heads)

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    off = forward_losses(model, aux, batch, TrainConfig(), cfg, joint=True, generator=seeded())
    stage1 = forward_losses(model, aux, batch, tcfg, cfg, joint=False)
    on = forward_losses(model, aux, batch, tcfg, cfg, joint=True, generator=seeded())
    return model, batch, off, stage1, on


def test_losses_fall_and_output_loads(tmp_path: Path) -> None:
    logs: list[dict] = []
    cfg = SMALL.replace(
        steps=30,
        sam_warmup_steps=10,
        images_per_batch=4,
        queries_per_image=2,
        log_every=1,
        lr=2e-3,
        warmup=5,
    )
    out = tmp_path / "run"
    last = train(out, model_cfg=TINY, train_cfg=cfg, progress=False, on_step=logs.append)
    assert [r["step"] for r in logs] == list(range(1, 41))
    assert last == logs[-1]
    joint = [r for r in logs if "ce" in r]
    assert len(joint) == 30 and all("ce" not in r for r in logs[:10])
    assert _mean(joint[-5:], "ce") < 0.8 * _mean(joint[:5], "ce")
    assert _mean(logs[-5:], "point_dice") < 0.95 * _mean(logs[:5], "point_dice")
    assert all(np.isfinite(r["total"]) for r in logs)

    bundle = load_bundle(out)
    image = generate_sample("test", 0).image
    result = Segmenter(bundle, max_new_tokens=16).segment(image, "Segment the red circle.")
    assert isinstance(result.answer, str)
    assert all(m.mask.shape == image.shape[:2] for m in result.masks)


def test_resume_continues_from_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    small = SMALL.replace(log_every=1)
    first: list[dict] = []
    train(out, model_cfg=TINY, train_cfg=small, progress=False, on_step=first.append)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and [r["step"] for r in first] == [1, 2, 3, 4]
    tokenizer_before = (out / "tokenizer.json").read_bytes()

    second: list[dict] = []
    train(
        out, model_cfg=TINY, train_cfg=small.replace(steps=4), progress=False, on_step=second.append
    )
    assert [r["step"] for r in second] == [5, 6]  # no step is repeated
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 6
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert (out / "tokenizer.json").read_bytes() == tokenizer_before
    # the saved config is the preset plus how this world's no-target answers begin
    assert load_bundle(out).config == TINY.replace(no_target_openings=NO_TARGET_OPENINGS)


def test_target_loss_marks_target_tokens_and_no_target_queries_are_all_negative() -> None:
    from types import SimpleNamespace

    from segapp.train_losses import target_loss

    head = torch.nn.Linear(2, 1)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0]]))
        head.bias.zero_()
    # query 0 has one target covering token 0 (and a sliver of token 1); query 1 has none
    batch = SimpleNamespace(seg_query=torch.tensor([0]), seg_cover=torch.tensor([[0.9, 0.1, 0.0]]))
    right = torch.tensor([[[10.0, 0], [-10, 0], [-10, 0]], [[-10, 0], [-10, 0], [-10, 0]]])
    assert float(target_loss(head, right, batch).detach()) < 1e-3  # type: ignore[arg-type]
    wrong = right.clone()
    wrong[1, 2, 0] = 10.0  # a token of the no-target query claims to match
    assert float(target_loss(head, wrong, batch).detach()) > 1.0  # type: ignore[arg-type]


def test_target_marks_every_marks_each_small_targets_best_token() -> None:
    from types import SimpleNamespace

    from segapp.train_losses import target_loss

    head = torch.nn.Linear(2, 1)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0]]))
        head.bias.zero_()
    # one query, two targets: a large one on token 0 (and a sliver of token 1), a small one
    # that covers token 2 by 0.3 at most (and token 3 by 0.1); token 4 is background
    cover = torch.tensor([[0.9, 0.1, 0.0, 0.0, 0.0], [0.0, 0.0, 0.3, 0.1, 0.0]])
    batch = SimpleNamespace(seg_query=torch.tensor([0, 0]), seg_cover=cover)

    def hidden(*logits: float) -> torch.Tensor:
        return torch.tensor([[[v, 0.0] for v in logits]])

    # the small target's best token marked, partly covered tokens either way: ~0 under "every"
    marked = hidden(10, 10, 10, -10, -10)
    assert float(target_loss(head, marked, batch, marks="every").detach()) < 1e-3  # type: ignore[arg-type]
    assert (
        float(target_loss(head, hidden(10, -10, 10, 10, -10), batch, marks="every").detach()) < 1e-3
    )  # type: ignore[arg-type]
    # "half" wants the small target's token negative; "every" wants it positive
    unmarked = hidden(10, -10, -10, -10, -10)
    assert float(target_loss(head, unmarked, batch).detach()) < 1e-3  # type: ignore[arg-type]
    assert float(target_loss(head, unmarked, batch, marks="every").detach()) > 1.0  # type: ignore[arg-type]
    assert float(target_loss(head, marked, batch).detach()) > 1.0  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown target marks"):
        target_loss(head, marked, batch, marks="all")  # type: ignore[arg-type]


def test_text_first_model_trains_further_as_segapp_weights(
    tokenizer, tmp_path: Path, capsys
) -> None:
    from segapp.build import build_segllm, save_bundle
    from segapp.cli import run

    cfg = TINY.replace(chat_format="segapp_text_first")
    torch.manual_seed(0)
    save_bundle(build_segllm(cfg, tokenizer), tokenizer, cfg, tmp_path / "start")
    out = tmp_path / "more"
    common = ["--steps", "2", "--workers", "0", "--threads", str(THREADS), "--out", str(out)]
    # segapp weights in either of segapp's formats train whole (no LoRA, no prefix list)
    assert run(["train", "--init-from", str(tmp_path / "start"), *common]) == 0
    capsys.readouterr()
    bundle = load_bundle(out)
    assert bundle.config.chat_format == "segapp_text_first" and bundle.chat.text_first
    start = load_bundle(tmp_path / "start").model.state_dict()
    moved = [k for k, v in bundle.model.state_dict().items() if not torch.equal(v, start[k])]
    assert any(k.startswith("llm.model.layers.") for k in moved)
    assert not any("lora" in k for k in bundle.model.state_dict())
    # the format belongs to the model: a loaded one cannot be given another
    again = ["train", "--init-from", str(out), "--chat-format", "segapp", *common]
    assert run(again) == 2
    assert "--chat-format" in capsys.readouterr().err


def test_a_model_built_from_scratch_trains_on_its_own_chat_format(
    tmp_path: Path, monkeypatch
) -> None:
    """The prompts of a fresh text-first run put the instruction before the image slots, as
    the saved model is served (a run once trained image-first and was served text-first)."""
    import segapp.train as training

    class Seen(Exception):
        pass

    def stream(chat, *args, **kwargs):  # the training batches are built with this chat
        raise Seen(chat)

    monkeypatch.setattr(training, "BatchStream", stream)
    cfg = TINY.replace(chat_format="segapp_text_first")
    small = TrainConfig(steps=1, sam_warmup_steps=0, workers=0, threads=THREADS)
    with pytest.raises(Seen) as seen:
        train(tmp_path / "run", model_cfg=cfg, train_cfg=small, progress=False)
    chat = seen.value.args[0]
    ids = chat.prompt_ids("Segment the red circle.")
    before_image = chat.tokenizer.decode(ids[: ids.index(chat.image_id)])
    assert chat.text_first and "red circle" in before_image


def test_conv_stem_keeps_the_token_grid_and_needs_a_power_of_two_patch() -> None:
    from segapp.errors import ModelError
    from segapp.modeling.builders import ConvStem, build_vision_tower

    cfg = MODEL_PRESETS["tiny"].replace(vision_stem="conv")
    tower = build_vision_tower(cfg)
    assert isinstance(tower.embeddings.patch_embedding, ConvStem)
    pixels = torch.randn(2, 3, cfg.vision_image_size, cfg.vision_image_size)
    grid = cfg.vision_image_size // cfg.vision_patch
    assert tower(pixel_values=pixels).last_hidden_state.shape == (2, grid * grid + 1, 128)
    plain = build_vision_tower(MODEL_PRESETS["tiny"])
    assert isinstance(plain.embeddings.patch_embedding, torch.nn.Conv2d)
    with pytest.raises(ModelError, match="power-of-two patch"):
        ConvStem(14, 64)
    with pytest.raises(ModelError, match="above its first stride"):
        ConvStem(4, 64, patchify=4)
    # conv4: a 4 x 4 patchify layer first, the same token grid, no full-resolution feature map
    quick = build_vision_tower(cfg.replace(vision_stem="conv4"))
    stem = quick.embeddings.patch_embedding
    first = stem.net[0]
    assert (first.kernel_size, first.stride) == ((4, 4), (4, 4))
    assert len([m for m in stem.net if isinstance(m, torch.nn.Conv2d)]) == 3
    assert quick(pixel_values=pixels).last_hidden_state.shape == (2, grid * grid + 1, 128)
    with pytest.raises(ModelError, match="unknown vision stem"):
        build_vision_tower(cfg.replace(vision_stem="fancy"))
    # a published-style config keeps CLIP's patch embedding and writes no vision_stem key
    assert "vision_stem" not in cfg.replace(vision_stem="patch").to_dict()
    assert cfg.to_dict()["vision_stem"] == "conv"


def test_swapped_probe_reorders_colours_and_leaves_colour_unlabelled() -> None:
    from segapp.train_losses import AuxHeads, ObjectProbe, swapped_probe_loss

    model, cfg, batch = _fresh_model_and_batch(4, 1)
    aux = AuxHeads(cfg)
    seen: list[torch.Tensor] = []
    model.vision_tower.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs["pixel_values"]), with_kwargs=True
    )
    tcfg = TrainConfig(probe_swap=0.5)
    loss = swapped_probe_loss(model, aux, batch, tcfg, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss.requires_grad
    (pixels,) = seen
    assert pixels.shape[0] == 2  # half the scenes
    for i in range(2):  # each copy is its scene with the channels in another order
        channels = [pixels[i, c] for c in range(3)]
        original = [batch.vision_pixels[i, c] for c in range(3)]
        order = [next(j for j in range(3) if torch.equal(x, original[j])) for x in channels]
        assert sorted(order) == [0, 1, 2] and order != [0, 1, 2]
    # an attribute nobody labelled adds no loss (and no NaN)
    probe = ObjectProbe(8)
    attrs = torch.full((1, 2, 4), 1)
    attrs[..., 0] = -100
    assert torch.isfinite(probe(torch.randn(1, 5, 8), torch.rand(1, 2, 5), attrs))


def test_projector_norm_puts_image_tokens_at_a_fixed_scale() -> None:
    from segapp.modeling.builders import build_projector

    cfg = MODEL_PRESETS["tiny"]
    width = cfg.vision_hidden * cfg.vision_merge**2
    feats = 50.0 * torch.randn(3, 16, width)
    normed = build_projector(cfg.replace(projector_norm=True))(feats)
    # LayerNorm with its initial affine: every token has norm sqrt(H), whatever the input scale
    torch.testing.assert_close(
        normed.norm(dim=-1), torch.full((3, 16), cfg.llm_hidden**0.5), rtol=1e-3, atol=1e-3
    )
    # the default keeps the bundled weights' layout (no extra key) and writes no config key
    plain = build_projector(cfg)
    assert set(plain.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert "projector_norm" not in cfg.to_dict()
    assert cfg.replace(projector_norm=True).to_dict()["projector_norm"] is True


def test_token_probe_reads_the_llm_image_tokens_with_merged_cover() -> None:
    from segapp.train_losses import AuxHeads, forward_losses, merged_cover

    # a 4 x 4 patch grid merged 2 x 2: each token's cover is the mean of its block
    cover = torch.arange(16.0).reshape(1, 1, 16) / 16
    merged = merged_cover(cover, 2)
    assert merged.shape == (1, 1, 4)
    assert torch.allclose(merged[0, 0], torch.tensor([2.5, 4.5, 10.5, 12.5]) / 16)
    assert merged_cover(cover, 1) is cover

    model, cfg, batch = _fresh_model_and_batch(2, 2)
    aux = AuxHeads(cfg, token_probe=True)
    off = forward_losses(model, aux, batch, TrainConfig(), cfg, joint=True)
    assert "token_probe" not in off
    on = forward_losses(model, aux, batch, TrainConfig(token_probe=1.0), cfg, joint=True)
    probe = on["token_probe"]
    assert torch.isfinite(probe) and float(probe.detach()) > 0.5  # untrained: near chance
    probe.backward()  # it trains the projector, which makes the LLM's image tokens
    assert model.projector[0].weight.grad is not None
    assert float(model.projector[0].weight.grad.abs().sum()) > 0


def test_prefix_attention_is_saved_with_the_model_and_only_built_from_scratch(
    tmp_path: Path, tokenizer, capsys
) -> None:
    from segapp.build import build_segllm, save_bundle
    from segapp.cli import run

    cfg = TINY.replace(prefix_attention=True)
    assert "prefix_attention" not in TINY.to_dict()  # older config.json files stay as they were
    save_bundle(build_segllm(cfg, tokenizer), tokenizer, cfg, tmp_path / "w")
    loaded = load_bundle(tmp_path / "w")
    assert loaded.config.prefix_attention and loaded.model.prefix_attention
    code = run(
        ["train", "--init-from", str(tmp_path / "w"), "--prefix-attention", "--out", str(tmp_path)]
    )
    assert code != 0
    assert "--prefix-attention applies to a model built from scratch" in capsys.readouterr().err


def test_group_first_batches_give_the_group_seg_the_union_and_no_point() -> None:
    from segapp.build import build_segllm
    from segapp.data.batches import make_batch
    from segapp.tokenizer import ChatFormat
    from segapp.train_losses import AuxHeads, forward_losses

    bundle = load_bundle(Path("weights/tiny"))
    cfg = MODEL_PRESETS["tiny"]
    chat = ChatFormat(bundle.tokenizer, bundle.chat.image_tokens)
    rng = np.random.default_rng(3)
    batch = make_batch(
        rng,
        chat,
        cfg,
        images=8,
        queries_per_image=3,
        answer_order="restate",
        multi_order="group_first",
    )
    seg_id = bundle.tokenizer.convert_tokens_to_ids("[SEG]")
    assert batch.seg_group is not None
    assert int((batch.input_ids == seg_id).sum()) == len(batch.seg_masks) == len(batch.seg_group)
    groups = torch.nonzero(batch.seg_group)[:, 0].tolist()
    assert groups, "no multi-target query in 24"
    for g in groups:  # the group [SEG]'s mask is the union of the targets that follow it
        q = int(batch.seg_query[g])
        own = [i for i in range(g + 1, len(batch.seg_query)) if int(batch.seg_query[i]) == q]
        assert len(own) >= 2 and not batch.seg_group[own].any()
        union = batch.seg_masks[own].amax(0)
        assert (batch.seg_masks[g] != union).float().mean() < 0.01
    # the group [SEG]'s SAM prompt carries SAM's not-a-point token, the others a real point
    model = build_segllm(cfg, bundle.tokenizer)
    prompts = torch.randn(3, 2, cfg.prompt_dim)
    rows = torch.tensor([True, False, False])
    out = model.without_point(prompts, rows)
    blank = model.sam.prompt_encoder.not_a_point_embed.weight[0]
    assert torch.equal(out[0, 1], blank) and torch.equal(out[1:], prompts[1:])
    assert torch.equal(out[:, 0], prompts[:, 0])
    terms = forward_losses(model, AuxHeads(cfg), batch, TrainConfig(), cfg, joint=True)
    assert torch.isfinite(terms["total"]) and torch.isfinite(terms["anchor"])


def test_dense_probe_reads_each_token_that_one_object_mostly_covers() -> None:
    import torch.nn.functional as F

    from segapp.train_losses import ObjectProbe

    probe = ObjectProbe(3)
    feats = torch.randn(1, 4, 3)
    # token 0: object 0 (0.9); token 1: object 1 (0.6); token 2: split 0.3 / 0.3; token 3: empty
    cover = torch.tensor([[[0.9, 0.1, 0.3, 0.0], [0.0, 0.6, 0.3, 0.0]]])
    attrs = torch.tensor([[[0, 1, 2, 0], [3, 4, 0, 1]]])
    loss = probe.dense_loss(feats, cover, attrs)
    expected = torch.stack(
        [F.cross_entropy(h(feats[0, :2]), attrs[0, :, a]) for a, h in enumerate(probe.heads)]
    ).mean()
    torch.testing.assert_close(loss, expected)
    other = feats.clone()
    other[0, 2:] = 100.0  # tokens no single object covers by half do not count
    torch.testing.assert_close(probe.dense_loss(other, cover, attrs), loss)
    assert float(probe.dense_loss(feats, cover * 0, attrs)) == 0.0  # nothing covered

    model, _, off, stage1, on = _terms_off_stage1_on(TrainConfig(dense_probe=1.0), token_probe=True)
    assert "dense_probe" not in off and "dense_token_probe" not in off
    assert "dense_probe" in stage1 and "dense_token_probe" not in stage1  # no LLM in stage 1
    for name in ("dense_probe", "dense_token_probe"):
        assert torch.isfinite(on[name]) and float(on[name].detach()) > 0.5  # untrained
    extra = on["dense_probe"] + on["dense_token_probe"]
    torch.testing.assert_close(on["total"].detach(), (off["total"] + extra).detach())
    on["dense_token_probe"].backward()  # it trains the projector and the tower beneath it
    assert float(model.projector[0].weight.grad.abs().sum()) > 0
    grads = [p.grad for p in model.vision_tower.parameters() if p.grad is not None]
    assert grads and float(sum(g.abs().sum() for g in grads)) > 0


def test_relation_probe_labels_how_each_object_relates_to_its_scene() -> None:
    from segapp.data.batches import RELATIONS, object_relations
    from segapp.data.queries import LARGEST, SMALLEST
    from segapp.data.world import Obj, Scene

    def obj(shape: str, color: str, size: str, texture: str, radius: float) -> Obj:
        return Obj(shape, color, size, texture, (50.0, 50.0), radius, 0.0)

    objects = [
        obj("circle", "red", "small", "solid", 10.0),
        obj("circle", "red", "large", "solid", 40.0),
        obj("square", "blue", "medium", "striped", 18.0),
        obj("square", "red", "medium", "solid", 17.0),
    ]
    scene = Scene(np.zeros((8, 8, 3), np.uint8), objects, np.zeros((4, 8, 8), bool))
    rel = object_relations(scene)
    assert rel.shape == (4, len(RELATIONS))
    # objects sharing colour / shape / size / texture / colour and shape, minus one
    assert rel[:, :5].tolist() == [
        [2, 1, 0, 2, 1],
        [2, 1, 0, 2, 1],
        [0, 1, 1, 0, 0],
        [2, 1, 1, 2, 0],
    ]
    assert int(rel[1, 5]) == LARGEST and int(rel[0, 5]) == SMALLEST  # of all objects
    assert int(rel[1, 6]) == LARGEST and int(rel[3, 6]) == 0  # of the red ones
    assert int(rel[2, 6]) == 0  # blue: no other object to be larger than
    assert (rel < torch.tensor(RELATIONS)).all() and (rel >= 0).all()

    tcfg = TrainConfig(relation_probe=0.5)
    model, batch, off, stage1, on = _terms_off_stage1_on(tcfg, relation_probe=True)
    assert batch.object_relations.shape[:2] == batch.object_attrs.shape[:2]
    assert ((batch.object_relations == -100) == (batch.object_attrs[..., :1] == -100)).all()
    assert "relation" not in off and "token_relation" not in off
    assert "relation" in stage1 and "token_relation" not in stage1  # no LLM in stage 1
    for name in ("relation", "token_relation"):
        assert torch.isfinite(on[name]) and float(on[name].detach()) > 0.3  # untrained
    extra = 0.5 * (on["relation"] + on["token_relation"])
    torch.testing.assert_close(on["total"].detach(), (off["total"] + extra).detach())
    on["relation"].backward()  # it trains the vision tower, which sees the whole scene
    grads = [p.grad for p in model.vision_tower.parameters() if p.grad is not None]
    assert grads and float(sum(g.abs().sum() for g in grads)) > 0


def test_the_target_head_is_saved_with_the_model_only_when_trained(tmp_path: Path) -> None:
    small = SMALL.replace(sam_warmup_steps=1)
    train(
        tmp_path / "marked",
        model_cfg=TINY,
        train_cfg=small.replace(target_weight=1.0),
        progress=False,
    )
    bundle = load_bundle(tmp_path / "marked")
    assert bundle.config.target_head and bundle.model.target_head is not None
    aux = load_file(str(tmp_path / "marked" / "checkpoint" / "aux.safetensors"))
    torch.testing.assert_close(bundle.model.target_head.weight, aux["target.weight"])
    torch.testing.assert_close(bundle.model.target_head.bias, aux["target.bias"])
    # trained on from those weights, the head goes on from the saved one
    train(
        tmp_path / "more",
        model_cfg=bundle.config,
        init_from=bundle,
        train_cfg=small.replace(target_weight=1.0, steps=1, lr=1e-9),
        progress=False,
    )
    more = load_bundle(tmp_path / "more").model.target_head
    assert more is not None
    torch.testing.assert_close(more.weight, aux["target.weight"], atol=1e-6, rtol=0)
    # without the target loss there is no head to save
    train(tmp_path / "plain", model_cfg=TINY, train_cfg=small, progress=False)
    plain = load_bundle(tmp_path / "plain")
    assert not plain.config.target_head and plain.model.target_head is None


def test_llm_layers_shapes_a_model_built_from_scratch(tmp_path: Path, capsys) -> None:
    from segapp.cli import run

    out = tmp_path / "deep"
    common = ["--steps", "2", "--sam-warmup-steps", "0", "--workers", "0"]
    assert run(["train", "--out", str(out), "--llm-layers", "2", *common]) == 0
    capsys.readouterr()
    bundle = load_bundle(out)
    assert bundle.config.llm_layers == 2 and len(bundle.model.llm.model.layers) == 2
    assert run(["train", "--out", str(tmp_path / "none"), "--llm-layers", "0", *common]) == 2
    assert "--llm-layers must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    again = ["train", "--init-from", str(out), "--llm-layers", "6", "--out", str(tmp_path / "x")]
    assert run([*again, *common]) == 2
    assert "--llm-layers applies to a model built from scratch" in capsys.readouterr().err


def test_batch_shape_flags_set_scenes_and_conversations_per_step(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    import segapp.train as training
    from segapp.cli import run

    seen: list[tuple[int, int]] = []
    real = training.forward_losses

    def spy(model, aux, batch, *args, **kwargs):
        seen.append((batch.vision_pixels.shape[0], batch.input_ids.shape[0]))
        return real(model, aux, batch, *args, **kwargs)

    monkeypatch.setattr(training, "forward_losses", spy)
    out = tmp_path / "shape"
    flags = ["--images-per-batch", "2", "--queries-per-image", "4"]
    common = ["--steps", "2", "--sam-warmup-steps", "0", "--workers", "0", "--video-fraction", "0"]
    assert run(["train", "--out", str(out), *flags, *common]) == 0
    capsys.readouterr()
    # two scenes a step, each with several distinct instructions (up to four)
    assert len(seen) == 2 and all(scenes == 2 and 2 < convs <= 8 for scenes, convs in seen)
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["images_per_batch"], saved["queries_per_image"]) == (2, 4)
    try:
        code = run(["train", "--out", str(tmp_path / "none"), "--queries-per-image", "0"])
    except SystemExit as stop:  # argparse's own refusal
        code = int(stop.code or 0)
    assert code == 2
    assert "--queries-per-image: must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    for command in (["train"], ["train", "--sam-warmup-steps", "2"], ["train-video"]):
        try:  # a negative count used to train nothing and save the untrained model
            code = run([*command, "--out", str(tmp_path / "none"), "--steps", "-3"])
        except SystemExit as stop:
            code = int(stop.code or 0)
        assert code == 2
        assert "--steps: must be at least 0" in capsys.readouterr().err
        assert not (tmp_path / "none").exists()
