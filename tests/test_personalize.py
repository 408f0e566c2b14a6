"""Personalization: concept store, shot checks, LoRA adapters per user, PerSAM, CLI.

LoRA fits here run a handful of steps on a small pool (properties, not quality; quality is
`segapp eval personal`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from segapp.build import load_model
from segapp.cli import run
from segapp.errors import InputError
from segapp.personalize import ConceptInfo, ConceptStore, PersonalSegmenter, fit_concept
from segapp.personalize.concepts import concept_scene, sample_concepts
from segapp.personalize.fit import FitConfig, check_shots
from segapp.predictor import Segmenter

QUICK = FitConfig(steps=3, positives=4, negatives=2, batch=4)


@pytest.fixture(scope="module")
def bundle():
    return load_model("tiny")


@pytest.fixture(scope="module")
def shots():
    """Two concepts, three (image, mask) shots each, plus a test scene of the first."""
    c0, c1 = sample_concepts(2)
    rng = np.random.default_rng(0)
    return {
        "a": [concept_scene(c0, rng, split="val") for _ in range(3)],
        "b": [concept_scene(c1, rng, split="val") for _ in range(3)],
        "test": concept_scene(c0, rng),
    }


@pytest.fixture(scope="module")
def fitted(bundle, shots, tmp_path_factory):
    """alice and bob both own a LoRA concept called 'thing' (different objects)."""
    store = ConceptStore(tmp_path_factory.mktemp("adapters"))
    for user, key in (("alice", "a"), ("bob", "b")):
        images, masks = zip(*shots[key], strict=True)
        fit_concept(bundle, store, user, "thing", list(images), list(masks), config=QUICK)
    return store


def _masks(result) -> list[np.ndarray]:
    return [m.mask for m in result.masks]


# ---- names and the store -------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../../etc", "", "..", "a/b", "Alice", ".hidden", "x" * 49, None])
def test_bad_names_are_refused(tmp_path, bad):
    store = ConceptStore(tmp_path)
    with pytest.raises(InputError, match="invalid"):
        store.concept_dir("alice", bad)
    with pytest.raises(InputError, match="invalid user"):
        store.list(bad)
    assert list(tmp_path.iterdir()) == []


def test_bad_name_refused_before_fitting(bundle, shots, tmp_path):
    images, masks = zip(*shots["a"], strict=True)
    with pytest.raises(InputError, match="invalid name '../../etc'"):
        fit_concept(bundle, ConceptStore(tmp_path), "alice", "../../etc", images, masks)
    assert not (tmp_path.parent / "etc").exists()


def _info(name: str = "mug") -> ConceptInfo:
    return ConceptInfo(user="alice", name=name, method="persam")


def test_crash_mid_save_keeps_previous_version(tmp_path):
    store = ConceptStore(tmp_path)
    store.save(_info(), lambda d: (d / "weights.bin").write_bytes(b"v1"))

    def crash(directory: Path) -> None:
        (directory / "weights.bin").write_bytes(b"half")
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        store.save(_info(), crash)
    info = store.get("alice", "mug")
    assert (Path(info.path) / "weights.bin").read_bytes() == b"v1"
    assert [p.name for p in (tmp_path / "alice").iterdir()] == ["mug"]  # no temp left over


def test_crash_between_renames_recovers_previous_version(tmp_path, monkeypatch):
    store = ConceptStore(tmp_path)
    store.save(_info(), lambda d: (d / "weights.bin").write_bytes(b"v1"))
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # old version moved aside, new one not yet in place
            raise OSError("crash")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        store.save(_info(), lambda d: (d / "weights.bin").write_bytes(b"v2"))
    monkeypatch.setattr(os, "rename", real_rename)
    assert not (tmp_path / "alice" / "mug").exists()
    info = store.get("alice", "mug")  # the moved-aside version is put back
    assert (Path(info.path) / "weights.bin").read_bytes() == b"v1"
    assert [c.name for c in store.list("alice")] == ["mug"]


# ---- shots ---------------------------------------------------------------------------------
def _shot():
    image = np.full((64, 48, 3), 200, np.uint8)
    mask = np.zeros((64, 48), bool)
    mask[10:30, 10:30] = True
    return image, mask


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("empty", "mask is empty"),
        ("size", "mask is 40x64 but its image is 48x64"),
        ("gradient", "not a mask"),
        ("rgb", "mask must be a 2-D"),
        ("count", "1 images but 2 masks"),
        ("many", "give 1 to 5 shots"),
    ],
)
def test_bad_shots_get_clear_errors(change, message):
    image, mask = _shot()
    images, masks = [image], [mask]
    if change == "empty":
        masks = [np.zeros_like(mask)]
    elif change == "size":
        masks = [mask[:, :40]]
    elif change == "gradient":
        masks = [np.tile(np.arange(48, dtype=np.uint8) * 5, (64, 1))]
    elif change == "rgb":
        masks = [np.random.default_rng(0).integers(0, 2, (64, 48, 3)).astype(np.uint8)]
    elif change == "count":
        masks = [mask, mask]
    elif change == "many":
        images, masks = [image] * 6, [mask] * 6
    with pytest.raises(InputError, match=message):
        check_shots(images, masks)


def test_png_style_masks_are_accepted():
    image, mask = _shot()
    as_png = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)
    ((_, checked),) = check_shots([image], [as_png])
    assert np.array_equal(checked, mask)


# ---- adapters ------------------------------------------------------------------------------
def test_same_name_two_users_stay_separate(fitted):
    alice, bob = fitted.list("alice"), fitted.list("bob")
    assert [c.name for c in alice] == [c.name for c in bob] == ["thing"]
    assert alice[0].shot_hashes != bob[0].shot_hashes
    assert alice[0].path != bob[0].path
    assert fitted.list("carol") == []


def test_round_trip_and_switching_give_identical_masks(bundle, fitted, shots):
    image = shots["test"][0]
    first = PersonalSegmenter(bundle, fitted)
    a1 = first.segment(image, "segment <thing>", user="alice")
    b1 = first.segment(image, "segment <thing>", user="bob")
    a2 = first.segment(image, "segment <thing>", user="alice")  # switched back
    again = PersonalSegmenter(load_model("tiny"), fitted, max_loaded=1)  # reloaded from disk
    b2 = again.segment(image, "segment <thing>", user="bob")
    a3 = again.segment(image, "segment <thing>", user="alice")  # LRU evicted bob
    assert len(again.bank.loaded) == 1
    for x, y in ((a1, a2), (a1, a3), (b1, b2)):
        assert x.answer == y.answer
        assert len(x.masks) == len(y.masks)
        assert all(np.array_equal(p, q) for p, q in zip(_masks(x), _masks(y), strict=True))


def test_adapters_do_not_leak_between_users(bundle, fitted):
    """bob's adapter differs from alice's: their concept-token rows are not the same."""
    from safetensors.torch import load_file

    rows = []
    for user in ("alice", "bob"):
        state = load_file(str(Path(fitted.get(user, "thing").path) / "adapter_model.safetensors"))
        rows.append(next(v for k, v in state.items() if "trainable_tokens" in k))
    assert not torch.equal(rows[0], rows[1])


def test_base_outputs_unchanged_without_adapter(bundle, fitted, shots):
    image = shots["test"][0]
    instruction = "the largest red object"
    plain = Segmenter(load_model("tiny")).segment(image, instruction)
    seg = PersonalSegmenter(bundle, fitted)
    seg.segment(image, "segment <thing>", user="alice")  # an adapter is loaded and was active
    after = seg.segment(image, instruction, user="alice")
    assert after.answer == plain.answer
    assert all(np.array_equal(p, q) for p, q in zip(_masks(after), _masks(plain), strict=True))
    ids = torch.tensor([seg.bundle.chat.prompt_ids(instruction)])
    assert seg.cache is not None
    with torch.inference_mode():
        ref = Segmenter(load_model("tiny"))
        ref.set_image(image)
        assert ref.cache is not None
        want = ref.model.llm(inputs_embeds=ref.model.embed_inputs(ids, ref.cache.image_tokens))
        got = seg.model.llm(inputs_embeds=seg.model.embed_inputs(ids, seg.cache.image_tokens))
    assert torch.equal(want.logits, got.logits)


@pytest.mark.parametrize(
    ("user", "instruction", "message"),
    [
        ("alice", "segment <nope>", "user 'alice' has no concept <nope>"),
        ("carol", "segment <thing>", "user 'carol' has no concept <thing>"),
        (None, "segment <thing>", "give the user"),
        ("../x", "segment <thing>", "invalid user"),
    ],
)
def test_unknown_concepts_are_errors(bundle, fitted, shots, user, instruction, message):
    seg = PersonalSegmenter(bundle, fitted)
    with pytest.raises(InputError, match=message):
        seg.segment(shots["test"][0], instruction, user=user)


def test_delete_removes_only_that_users_concept(bundle, shots, tmp_path):
    store = ConceptStore(tmp_path)
    images, masks = zip(*shots["a"], strict=True)
    for user in ("alice", "bob"):
        fit_concept(bundle, store, user, "mug", images, masks, method="persam")
    store.delete("alice", "mug")
    assert store.list("alice") == [] and [c.name for c in store.list("bob")] == ["mug"]
    with pytest.raises(InputError, match="has no concept"):
        store.delete("alice", "mug")


def test_persam_concept_segments(bundle, shots, tmp_path):
    store = ConceptStore(tmp_path)
    images, masks = zip(*shots["a"], strict=True)
    info = fit_concept(bundle, store, "alice", "mug", images, masks, method="persam")
    assert info.method == "persam" and info.size_bytes < 10_000
    seg = PersonalSegmenter(bundle, store)
    res = seg.segment(images[0], "where is <mug>?", user="alice")
    assert res.answer in ("Sure, <mug> [SEG].", "Sorry, I cannot find <mug>.")
    assert len(res.masks) == (1 if res.answer.startswith("Sure") else 0)


# ---- CLI -----------------------------------------------------------------------------------
def test_cli_personalize_list_segment(tmp_path, shots, capsys, write_image):
    image, mask = shots["a"][0]
    img = write_image(tmp_path / "a.png", image)
    msk = write_image(tmp_path / "a_mask.png", (mask * 255).astype(np.uint8))
    store = str(tmp_path / "store")
    assert (
        run(
            [
                "personalize",
                "--user",
                "u1",
                "--name",
                "../../etc",
                "--images",
                str(img),
                "--masks",
                str(msk),
                "--store",
                store,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: invalid name '../../etc'") and "\n" not in err
    assert (
        run(
            [
                "personalize",
                "--user",
                "u1",
                "--name",
                "mug",
                "--images",
                str(img),
                "--masks",
                str(msk),
                "--method",
                "persam",
                "--store",
                store,
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert run(["personalize", "--user", "u1", "--list", "--json", "--store", store]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in listed["concepts"]] == ["mug"]
    out = tmp_path / "out"
    code = run(
        [
            "segment",
            str(img),
            "segment <mug>",
            "--user",
            "u1",
            "--store",
            store,
            "--out-dir",
            str(out),
            "--json",
        ]
    )
    assert code == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["answer"] in ("Sure, <mug> [SEG].", "Sorry, I cannot find <mug>.")
    assert (
        run(
            [
                "segment",
                str(img),
                "segment <mug>",
                "--user",
                "u2",
                "--store",
                store,
                "--out-dir",
                str(out),
            ]
        )
        == 2
    )
    assert "user 'u2' has no concept <mug>" in capsys.readouterr().err


def test_fit_while_serving_leaves_served_model_alone(bundle, fitted, shots, tmp_path):
    seg = PersonalSegmenter(bundle, fitted)
    image = shots["test"][0]
    before = seg.segment(image, "segment <thing>", user="alice")
    images, masks = zip(*shots["b"], strict=True)
    info = fit_concept(bundle, ConceptStore(tmp_path), "carol", "cup", images, masks, config=QUICK)
    assert info.method == "lora" and info.size_bytes < 2_000_000
    after = seg.segment(image, "segment <thing>", user="alice")
    assert after.answer == before.answer
    assert all(np.array_equal(p, q) for p, q in zip(_masks(after), _masks(before), strict=True))


def test_a_fit_is_reproducible_and_leaves_the_global_generator_alone(bundle, shots, tmp_path):
    """The same shots and config give the same adapter, whatever drew from torch's global
    generator before; the caller's generator state is left as it was."""
    from safetensors.torch import load_file

    images, masks = zip(*shots["a"], strict=True)
    store = ConceptStore(tmp_path)
    weights = []
    for name, draws in (("one", 0), ("two", 7)):
        torch.rand(draws)  # an earlier caller's use of the global generator
        state = torch.random.get_rng_state()
        info = fit_concept(bundle, store, "dana", name, images, masks, config=QUICK)
        assert torch.equal(torch.random.get_rng_state(), state)
        weights.append(load_file(str(Path(info.path) / "adapter_model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_cli_batch_with_user(tmp_path, shots, write_image):
    image, mask = shots["a"][0]
    img = write_image(tmp_path / "in" / "a.png", image)
    msk = write_image(tmp_path / "a_mask.png", (mask * 255).astype(np.uint8))
    store = str(tmp_path / "store")
    fit = ["personalize", "--user", "u1", "--name", "mug", "--images", str(img), "--masks",
           str(msk), "--method", "persam", "--store", store, "--quiet"]  # fmt: skip
    assert run(fit) == 0
    out, out2 = tmp_path / "out", tmp_path / "out2"
    batch = ["batch", str(tmp_path / "in"), "--prompt", "segment <mug>", "--store", store,
             "--quiet", "--device", "cpu"]  # fmt: skip
    assert run([*batch, "--out", str(out), "--user", "u1"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert rows[0]["answer"] in ("Sure, <mug> [SEG].", "Sorry, I cannot find <mug>.")
    run([*batch, "--out", str(out2), "--user", "u2"])  # another user: unknown, per image
    assert "user 'u2' has no concept <mug>" in (out2 / "errors.jsonl").read_text()
