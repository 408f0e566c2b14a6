"""The concept verifier: its features' invariances, its fit and storage, and its wiring into a
LoRA concept's predict (quality is `segapp eval personal`)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segapp.build import load_model
from segapp.personalize import ConceptStore, PersonalSegmenter, fit_concept
from segapp.personalize.concepts import NOVEL_SHAPES, concept_scene, sample_concepts
from segapp.personalize.fit import FitConfig
from segapp.personalize.reference import COLOUR_BINS, Reference, colour_bins, shot_colours
from segapp.personalize.segmenter import NOT_FOUND
from segapp.personalize.verify import (
    FEATURE_SIZE,
    FILE,
    Scene,
    Verifier,
    distinct,
    fit_verifier,
    mask_features,
)

EMBEDDING = torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(0))


def _shape(name: str, center=(64.0, 64.0), radius=20.0, angle=0.0) -> np.ndarray:
    t = np.deg2rad(angle)
    rot = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
    canvas = np.zeros((FEATURE_SIZE, FEATURE_SIZE), np.uint8)
    for poly, value in NOVEL_SHAPES[name]:
        pts = np.round((poly @ rot.T * radius + np.asarray(center)) * 16).astype(np.int32)
        cv2.fillPoly(canvas, [pts], int(value), cv2.LINE_8, 4)
    return canvas > 0


def _paint(masks: list[np.ndarray], colours: list[tuple[int, int, int]]) -> torch.Tensor:
    image = np.full((FEATURE_SIZE, FEATURE_SIZE, 3), 235, np.uint8)
    for m, c in zip(masks, colours, strict=True):
        image[m] = c
    return torch.from_numpy(image).permute(2, 0, 1).float()


def _features(thumb: torch.Tensor, masks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    return mask_features(thumb, EMBEDDING, torch.from_numpy(np.stack(masks)))


def test_form_features_ignore_rotation_and_scale_but_not_shape():
    arrow = _shape("arrow")
    turned = _shape("arrow", radius=26.0, angle=130.0)
    others = [_shape(name, angle=40.0) for name in ("tee", "pentagon", "bolt", "crescent")]
    thumb = _paint([arrow], [(200, 30, 30)])
    form = _features(thumb, [arrow, turned, *others])[1][:, :6]  # the invariant descriptors
    same = float((form[0] - form[1]).abs().mean())
    assert same < 0.04
    for other in form[2:]:
        assert float((form[0] - other).abs().mean()) > 1.5 * same


def test_appearance_features_tell_colours_apart():
    left, right = _shape("pentagon", (35, 64)), _shape("pentagon", (95, 64))
    same = _paint([left, right], [(200, 30, 30), (200, 30, 30)])
    differ = _paint([left, right], [(200, 30, 30), (30, 60, 200)])
    hist_same = _features(same, [left, right])[0][:, :64]
    hist_differ = _features(differ, [left, right])[0][:, :64]
    assert float((hist_same[0] - hist_same[1]).abs().sum()) < 0.05
    assert float((hist_differ[0] - hist_differ[1]).abs().sum()) > 1.5


def test_ring_feature_tells_a_part_from_the_whole():
    """The last form feature: how much of a mask's colours continue just outside it."""
    whole = np.zeros((FEATURE_SIZE, FEATURE_SIZE), bool)
    whole[40:80, 30:100] = True
    part = whole.copy()
    part[:, 65:] = False
    thumb = _paint([whole], [(40, 165, 55)])
    continues = _features(thumb, [whole, part])[1][:, -1]
    assert float(continues[0]) < 0.05
    assert float(continues[1]) > float(continues[0]) + 0.15


def test_reference_matches_the_shots_silhouette_turned_scaled_or_mirrored():
    shots = [_shape("arrow"), _shape("arrow", radius=16.0, angle=70.0)]
    thumb = _paint(shots[:1], [(200, 30, 30)])
    forms = _features(thumb, shots)[1]
    reference = Reference(torch.from_numpy(np.stack(shots)), forms)
    same = [
        _shape("arrow", center=(50.0, 70.0), radius=24.0, angle=200.0),
        np.ascontiguousarray(_shape("arrow", angle=35.0)[:, ::-1]),  # mirrored
    ]
    others = [_shape(name, radius=22.0, angle=15.0) for name in ("tee", "bolt", "crescent")]
    candidates = [*same, *others]
    raw = _features(thumb, candidates)[1]
    compared = reference.compare(raw, torch.from_numpy(np.stack(candidates)))
    assert compared.shape == (len(candidates), raw.shape[1] + 1)
    match = compared[:, -1]
    assert float(match[: len(same)].min()) > 0.85
    assert float(match[len(same) :].max()) < float(match[: len(same)].min()) - 0.1
    # the shots themselves: no distance to the nearest shot, a perfect match
    own = reference.compare(forms, torch.from_numpy(np.stack(shots)))
    assert float(own[:, :-1].abs().max()) == 0.0
    assert float(own[:, -1].min()) > 0.95


def test_a_stretched_copy_keeps_the_area_but_not_the_outline():
    """The fit's near-miss negatives: a shot's own pixels at another aspect."""
    from segapp.personalize.concepts import _stretched as stretched
    from segapp.personalize.concepts import cutout

    shot = _shape("arrow", radius=22.0)
    thumb = _paint([shot], [(40, 165, 55)])
    rgb = thumb.permute(1, 2, 0).numpy().astype(np.uint8)
    reference = Reference(torch.from_numpy(shot[None]), _features(thumb, [shot])[1])
    rng = np.random.default_rng(0)
    for _ in range(6):
        near = stretched(cutout(rgb, shot), rng)
        assert 0.75 < near.mask.sum() / shot.sum() < 1.25
        h, w = near.mask.shape
        canvas = np.zeros((FEATURE_SIZE, FEATURE_SIZE), bool)
        y0, x0 = (FEATURE_SIZE - h) // 2, (FEATURE_SIZE - w) // 2
        canvas[y0 : y0 + h, x0 : x0 + w] = near.mask
        match = reference.compare(_features(thumb, [canvas])[1], torch.from_numpy(canvas[None]))
        assert float(match[0, -1]) < 0.8  # the arrow itself, turned or mirrored: > 0.85


def test_distinct_drops_specks_duplicates_and_background():
    a = torch.zeros(FEATURE_SIZE, FEATURE_SIZE, dtype=torch.bool)
    a[10:40, 10:40] = True
    near = a.clone()
    near[10:41, 10:40] = True  # IoU ~0.97 with a
    speck = torch.zeros_like(a)
    speck[100:102, 100:102] = True
    everything = torch.ones_like(a)
    b = torch.zeros_like(a)
    b[60:90, 60:90] = True
    masks = torch.stack([near, a, speck, everything, b])
    quality = torch.tensor([0.5, 0.9, 1.0, 1.0, 0.1])
    assert distinct(masks, quality) == [1, 4]


def _scenes(rng: np.random.Generator, n: int) -> list[Scene]:
    """Feature clouds: the object's candidates sit at +1 on the first features, others at 0."""
    scenes = []
    for i in range(n):
        present = i % 2 == 0
        a = torch.from_numpy(rng.normal(0, 0.3, (6, 5))).float()
        b = torch.from_numpy(rng.normal(0, 0.3, (6, 3))).float()
        iou = torch.zeros(6)
        if present:
            a[0, 0] += 1.0
            b[0, 0] += 1.0
            iou[0] = 0.9
        scenes.append(Scene((a, b), iou, present))
    return scenes


def test_verifier_fits_separates_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    verifier = fit_verifier(_scenes(rng, 40))
    assert 0.5 <= verifier.threshold < 1.0
    assert verifier.reference is None
    test = _scenes(rng, 20)
    best_on = [float(verifier.scores(s.features).max()) for s in test if s.present]
    best_off = [float(verifier.scores(s.features).max()) for s in test if not s.present]
    assert np.mean([p >= verifier.threshold for p in best_on]) >= 0.9
    assert np.mean([p >= verifier.threshold for p in best_off]) <= 0.2
    verifier.save(tmp_path)
    again = Verifier.load(tmp_path)
    assert again is not None and again.threshold == pytest.approx(verifier.threshold)
    for s in test:
        assert torch.equal(verifier.scores(s.features), again.scores(s.features))
    assert Verifier.load(tmp_path / "elsewhere") is None  # a concept fitted without one


def test_verifier_reference_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    shots = torch.from_numpy(np.stack([_shape("tee"), _shape("tee", angle=50.0)]))
    thumb = _paint([shots[0].numpy()], [(200, 30, 30)])
    colours = shot_colours(thumb[None], shots[:1])
    reference = Reference(shots, torch.from_numpy(rng.normal(0, 1, (2, 3))).float(), colours)
    scenes = _scenes(rng, 12)
    verifier = fit_verifier(scenes, reference)
    verifier.save(tmp_path)
    again = Verifier.load(tmp_path)
    assert again is not None and again.reference is not None
    assert verifier.silhouette is not None and again.silhouette is not None  # the third gate
    for s in scenes:
        assert torch.equal(verifier.scores(s.features), again.scores(s.features))
    assert torch.equal(again.reference.masks, shots)
    assert torch.equal(again.reference.templates, reference.templates)
    assert again.reference.colours is not None
    assert torch.equal(again.reference.colours, colours)
    candidates = torch.from_numpy(np.stack([_shape("tee", angle=10.0), _shape("bolt")]))
    form = torch.zeros(2, 3)
    assert torch.equal(
        reference.compare(form, candidates, thumb),
        again.reference.compare(form, candidates, thumb),
    )


def test_likeness_tells_the_shots_colours_and_the_appearance_head_leaves_their_wearers_out(
    tmp_path,
):
    tee, bolt = _shape("tee", radius=16.0), _shape("bolt", center=(24.0, 24.0), radius=14.0)
    other = _shape("pentagon", center=(100.0, 100.0), radius=14.0)
    two = tee.copy()
    two[:64, :] = False  # the top half of the tee in a second colour
    thumb = _paint(
        [tee, two, bolt, other], [(200, 30, 30), (30, 30, 200), (200, 30, 30), (40, 200, 40)]
    )
    shots = torch.from_numpy(tee[None])
    appearance, forms = _features(thumb, [tee])
    hists = appearance[:, :COLOUR_BINS]
    reference = Reference(shots, forms, shot_colours(thumb[None], shots), hists)
    a = _features(thumb, [tee, bolt, other])[0]
    a_ref = mask_features(
        thumb, EMBEDDING, torch.from_numpy(np.stack([tee, bolt, other])), reference
    )[0]
    assert a_ref.shape[1] == a.shape[1] + 2 and torch.equal(a_ref[:, :-2], a)
    inter, share = a_ref[:, -2], a_ref[:, -1]
    assert inter[0] > 0.99 and share[0] > 0.99  # the shot itself
    assert share[1] > 0.99 and 0.2 < inter[1] < 0.9  # a bolt in one of the shot's two colours
    assert inter[2] < 0.05 and share[2] < 0.05  # another colour
    # scenes where negatives in the shots' colours look, to appearance, just like the object
    rng = np.random.default_rng(3)
    scenes = []
    for i in range(30):
        x = torch.from_numpy(rng.normal(0, 0.2, (4, 4))).float()
        x[0, 0] += 1.0  # the object
        x[1, :2] += 1.0  # a look-alike in its colours (share 1), told apart by feature 1
        x[:, -1] = torch.tensor([1.0, 1.0, 0.0, 0.0])
        iou = torch.tensor([0.9, 0.0, 0.0, 0.0]) if i % 2 == 0 else torch.zeros(4)
        scenes.append(Scene((x, torch.from_numpy(rng.normal(0, 0.3, (4, 3))).float()), iou, True))
    with_hists = fit_verifier(scenes, reference)
    without = fit_verifier(scenes, Reference(shots, forms, reference.colours))
    look = torch.tensor([[1.0, 1.0, 0.0, 1.0]])  # taught as a negative only without hists
    assert float(with_hists.appearance.prob(look)) > 0.5 > float(without.appearance.prob(look))
    with_hists.save(tmp_path)
    again = Verifier.load(tmp_path)
    assert again is not None and again.reference is not None
    assert again.reference.hists is not None
    assert torch.equal(again.reference.hists, reference.hists)


def test_snap_recovers_the_outline_in_the_shots_colours():
    tee = _shape("tee", center=(60.0, 60.0))
    thumb = _paint([tee], [(200, 30, 30)])
    shots = torch.from_numpy(tee[None])
    reference = Reference(shots, torch.zeros(1, 3), shot_colours(thumb[None], shots))
    coarse = cv2.dilate(tee.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0  # a blobby mask
    elsewhere = np.zeros_like(tee)
    elsewhere[5:25, 90:120] = True  # background only: nothing in the shots' colours
    snapped = reference.snap(torch.from_numpy(np.stack([coarse, elsewhere])), thumb).numpy()
    assert (snapped[0] & tee).sum() / (snapped[0] | tee).sum() > 0.95
    assert np.array_equal(snapped[1], elsewhere)  # too little left: its own outline stays


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_shot_colours_hold_the_fit_s_jittered_copies_but_not_other_colours():
    tee = _shape("tee")
    thumb = _paint([tee], [(230, 200, 40)])  # a yellow whose green sits near a bin edge
    colours = shot_colours(thumb[None], torch.from_numpy(tee[None]))
    darker = _paint([tee], [(207, 180, 36)])  # the same yellow 10% darker: the next bin
    for image, want in ((thumb, True), (darker, True), (_paint([tee], [(40, 90, 220)]), False)):
        bins = colour_bins(image)[torch.from_numpy(tee).flatten()]
        assert bool((bins @ colours.float() > 0).all()) is want


def test_refine_snaps_a_full_size_mask_to_the_object_and_leaves_strangers_alone():
    tee = _shape("tee", center=(60.0, 60.0))
    thumb = _paint([tee], [(200, 30, 30)])
    shots = torch.from_numpy(tee[None])
    reference = Reference(shots, torch.zeros(1, 3), shot_colours(thumb[None], shots))
    # the same object at 4x the thumbnail's size, seen through a coarse (upsampled) mask
    big = cv2.resize(tee.astype(np.uint8), None, fx=4, fy=4, interpolation=cv2.INTER_NEAREST) > 0
    pixels = np.full((*big.shape, 3), 235, np.uint8)
    pixels[big] = (200, 30, 30)
    coarse = cv2.dilate(big.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    refined = reference.refine(coarse, pixels, cell=4.0)
    assert _iou(coarse, big) < 0.85 and _iou(refined, big) > 0.97
    background = np.zeros_like(big)
    background[10:60, 300:400] = True  # nothing in the shots' colours near it: kept as is
    assert np.array_equal(reference.refine(background, pixels, cell=4.0), background)
    blind = Reference(shots, torch.zeros(1, 3))  # a concept stored without shot colours
    assert np.array_equal(blind.refine(coarse, pixels, cell=4.0), coarse)


@pytest.fixture(scope="module")
def concept(tmp_path_factory):
    bundle = load_model("tiny")
    store = ConceptStore(tmp_path_factory.mktemp("verify"))
    c = sample_concepts(1)[0]
    rng = np.random.default_rng(3)
    shots = [concept_scene(c, rng, split="val") for _ in range(2)]
    quick = FitConfig(steps=3, positives=6, negatives=4, batch=4)
    info = fit_concept(
        bundle, store, "dana", "kite", [s[0] for s in shots], [s[1] for s in shots], config=quick
    )
    return bundle, store, info, concept_scene(c, rng, split="test")


def test_lora_concept_stores_a_verifier_and_it_decides(concept, monkeypatch):
    bundle, store, info, (image, _) = concept
    assert (Path(info.path) / FILE).is_file()
    assert "verifier_threshold" in info.metrics
    seg = PersonalSegmenter(bundle, store)
    loaded = seg._verifier(info)
    assert loaded is not None
    assert loaded.reference is not None and len(loaded.reference.masks) == 2  # one per shot
    monkeypatch.setattr(loaded, "threshold", 1.01)  # nothing can pass
    none = seg.segment(image, "segment <kite>", user="dana")
    assert none.masks == [] and none.answer == NOT_FOUND.format(token="<kite>")
    monkeypatch.setattr(loaded, "threshold", 0.0)  # the best candidate always passes
    one = seg.segment(image, "segment <kite>", user="dana")
    assert seg.cache is not None and np.array_equal(seg.cache.pixels, image)  # for refine
    assert len(one.masks) == 1 and one.masks[0].label == "kite"
    assert one.masks[0].mask.shape == image.shape[:2] and one.masks[0].mask.any()
    assert "[SEG]" in one.answer
    raw = PersonalSegmenter(bundle, store, verify=False).segment(
        image, "segment <kite>", user="dana"
    )
    assert all(m.label == "kite" for m in raw.masks)  # the adapter's own masks, unverified


def _hue_shares(rgb: np.ndarray, mask: np.ndarray, hues: tuple[int, ...]) -> list[float]:
    h = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[..., 0][mask].astype(int)
    return [float(np.mean(np.abs((h - v + 90) % 180 - 90) <= 5)) for v in hues]


def test_main_colour_look_alike_keeps_the_second_colour():
    from segapp.personalize.concepts import Cutout, _transform

    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[:, :13] = (40, 165, 55)  # green: the main colour
    rgb[:, 13:] = (240, 205, 25)  # yellow: the second
    cut = Cutout(rgb, np.ones((20, 20), bool))
    green, yellow = (
        int(cv2.cvtColor(rgb[:1, c : c + 1], cv2.COLOR_RGB2HSV)[0, 0, 0]) for c in (0, 19)
    )
    main = _transform(cut, np.random.default_rng(0), 40, hue=180.0, main_only=True)
    g, y = _hue_shares(main.rgb, main.mask, (green, yellow))
    assert g < 0.05 and y > 0.2  # the main colour moved, the second stayed
    whole = _transform(cut, np.random.default_rng(0), 40, hue=180.0)
    g, y = _hue_shares(whole.rgb, whole.mask, (green, yellow))
    assert g < 0.05 and y < 0.05
