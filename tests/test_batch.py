"""`segapp batch`: exports other tools read, bad inputs logged, crash + resume, engines agree.

The model is the random tiny model with its LLM rigged to answer "Object [SEG]" to anything,
so every query yields one (noisy, random-decoder) mask: these tests check plumbing, not quality.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch
from PIL import Image
from pycocotools.coco import COCO
from shapely.geometry import shape

from segapp.batch import BatchJob, run_batch
from segapp.batch.job import discover, mask_file
from segapp.build import load_bundle, save_bundle
from segapp.data.instructions import generate_sample
from segapp.export import polygons_to_mask
from segapp.predictor import Segmenter

PROMPT = "the largest red object"
ALL_FORMATS = ("png", "coco", "polygons", "yolo", "overlay")
TIMEOUT = 900  # seconds for a CLI subprocess on a loaded 2-core machine


@pytest.fixture(scope="session")
def seg_model_dir(random_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random tiny model, with an LLM that always answers "Object [SEG]".

    With attention and MLP outputs zeroed, the residual stream is the current token's
    embedding, so the next token depends on the current one only; four embedding rows along
    orthonormal directions chain "ASSISTANT:" -> " object" -> [SEG] -> </s>.
    """
    bundle = load_bundle(random_model_dir)
    model, chat, tokenizer = bundle.model, bundle.chat, bundle.tokenizer
    with torch.no_grad():
        for layer in model.llm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hidden = model.llm.config.hidden_size
        basis, _ = torch.linalg.qr(
            torch.randn(hidden, 3, generator=torch.Generator().manual_seed(0))
        )
        u1, u2, u3 = basis.T
        last = chat.prompt_ids("x")[-1]
        word = tokenizer(" object", add_special_tokens=False)["input_ids"][-1]
        rows = {
            last: u1,
            word: 10 * (u1 + u2),
            chat.seg_id: 30 * u2 + 10 * u3,
            chat.eos_id: 200 * u3,
        }
        for table in {
            model.llm.get_input_embeddings().weight,
            model.llm.get_output_embeddings().weight,
        }:
            for token, vector in rows.items():
                table[token] = vector
    out = tmp_path_factory.mktemp("seg_model")
    save_bundle(model, tokenizer, bundle.config, out)
    return out


def _scene(i: int) -> np.ndarray:
    return generate_sample("test", i).image


def _photo_tree(root: Path, count: int) -> list[str]:
    """`count` scenes in a small tree, several formats and odd names; returns their rel paths."""
    names = []
    for i in range(count):
        folder = ("", "sub/", "sub/deeper/")[i % 3]
        suffix = (".png", ".jpg", ".webp", ".bmp", ".tif")[i % 5]
        name = f"{folder}scene {i:02d}{' été 写真' if i == 1 else ''}{suffix}"
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_scene(i)).save(path)
        names.append(name)
    return names


def _job(root: Path, out: Path, model: Path, **changes: object) -> BatchJob:
    settings: dict[str, object] = {
        "prompt": PROMPT,
        "model": str(model),
        "formats": ALL_FORMATS,
        "batch_size": 3,
        "progress": False,
    }
    settings.update(changes)
    return BatchJob(root, out, **settings)  # type: ignore[arg-type]


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)) > 0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "segapp.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    _photo_tree(root, 7)
    return root


@pytest.fixture(scope="module")
def full_run(photos: Path, seg_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full") / "out"
    summary = run_batch(_job(photos, out, seg_model_dir))
    assert (summary.done, summary.failed, summary.skipped) == (7, 0, 0)
    return out


# ---- the model step ----------------------------------------------------------------------------
@pytest.mark.parametrize("rigged", [False, True], ids=["random-answers", "one-mask"])
def test_batched_model_step_equals_one_at_a_time(
    rigged: bool, random_model_dir: Path, seg_model_dir: Path
) -> None:
    segmenter = Segmenter.from_pretrained(str(seg_model_dir if rigged else random_model_dir))
    segmenter.max_new_tokens = 12
    images = [_scene(i) for i in range(4)]
    caches = segmenter.encode_batch([segmenter.prepare(im) for im in images])
    for i, image in enumerate(images):  # an image's encoding does not depend on its batch
        alone = segmenter.encode_batch([segmenter.prepare(image)])[0]
        assert torch.equal(alone.sam_embedding, caches[i].sam_embedding)
        assert torch.equal(alone.image_tokens, caches[i].image_tokens)
        assert caches[i].pixels is not None and np.array_equal(caches[i].pixels, image)
    asks = [PROMPT, "segment the blue square", PROMPT, "what can roll?"]
    batched = segmenter.predict_batch(list(zip(caches, asks, strict=True)))
    for cache, ask, got in zip(caches, asks, batched, strict=True):
        segmenter.cache = cache
        want = segmenter.predict(ask)
        assert (got.instruction, got.answer) == (want.instruction, want.answer)
        assert [m.score for m in got.masks] == [m.score for m in want.masks]
        for a, b in zip(got.masks, want.masks, strict=True):
            np.testing.assert_array_equal(a.mask, b.mask)
    if rigged:
        assert all(r.answer == "Object [SEG]" and len(r.masks) == 1 for r in batched)


# ---- exports -----------------------------------------------------------------------------------
def test_coco_json_loads_in_pycocotools_and_matches_png_masks(full_run: Path) -> None:
    coco = COCO(str(full_run / "coco.json"))
    rows = _rows(full_run)
    assert len(coco.getImgIds()) == len(rows) == 7
    masks = [m for row in rows for m in row["masks"] if m["area"] > 0]
    assert len(coco.getAnnIds()) == len(masks) > 0
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {m["label"] for m in masks}
    for ann in coco.loadAnns(coco.getAnnIds()):
        image = coco.loadImgs(ann["image_id"])[0]
        png = _png(full_run / ann["mask_file"])
        assert png.shape == (image["height"], image["width"])
        np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), png)
        ys, xs = np.nonzero(png)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["area"] == png.sum()


def test_geojson_polygons_rasterize_back_to_the_masks(full_run: Path) -> None:
    holes = 0
    for row in _rows(full_run):
        collection = json.loads((full_run / "polygons" / f"{row['image']}.geojson").read_text())
        assert len(collection["features"]) == len(row["masks"])
        for feature in collection["features"]:
            geometry = shape(feature["geometry"])
            png = _png(
                full_run
                / mask_file(row["image"], row["instruction"], feature["properties"]["mask"])
            )
            height, width = png.shape
            ys, xs = np.mgrid[0:height, 0:width]  # pixel (r, c) is the unit square around (c, r)
            drawn = shapely.contains_xy(geometry, xs.ravel(), ys.ravel()).reshape(png.shape)
            assert _iou(drawn, png) >= 0.95
            holes += sum(len(p.interiors) for p in getattr(geometry, "geoms", [geometry]))
    assert holes > 0  # the noisy masks have holes, and they are kept


def test_yolo_labels_are_normalised_polygons_of_the_masks(full_run: Path) -> None:
    names = (full_run / "yolo" / "classes.txt").read_text().splitlines()
    assert names == ["object"]
    for row in _rows(full_run):
        stem = row["image"].rsplit(".", 1)[0]
        lines = (full_run / "yolo" / "labels" / f"{stem}.txt").read_text().splitlines()
        polygons = [p for m in row["masks"] for p in m["polygons"]]
        assert len(lines) == len(polygons) > 0
        height, width = row["size"]
        drawn = []
        for line in lines:
            cls, *values = line.split()
            assert cls == "0" and len(values) % 2 == 0
            xy = np.asarray(values, dtype=float).reshape(-1, 2)
            assert ((xy >= 0) & (xy <= 1)).all()
            drawn.append(xy * [width, height] - 0.5)
        want = polygons_to_mask(polygons, height, width)
        assert _iou(polygons_to_mask(drawn, height, width), want) >= 0.99


def test_outputs_mirror_the_input_tree(full_run: Path, photos: Path) -> None:
    rels = sorted(str(p.relative_to(photos)) for p in photos.rglob("*") if p.is_file())
    rows = _rows(full_run)
    assert sorted(r["image"] for r in rows) == rels
    for row in rows:
        assert (full_run / mask_file(row["image"], PROMPT, 0)).is_file()
        assert list((full_run / "overlays" / row["image"]).glob("*.png"))
        assert row["size"] == list(_scene(0).shape[:2])
        assert set(row) == {"image", "size", "instruction", "answer", "masks"}
        assert set(row["masks"][0]) == {"label", "score", "bbox", "area", "rle", "polygons"}


# ---- bad inputs --------------------------------------------------------------------------------
def test_bad_files_are_logged_and_the_run_completes(seg_model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "in"
    good = _photo_tree(root, 3)
    Image.fromarray(_scene(5)).save(root / "sub" / "mon fichier ünï 写真.png")
    good.append("sub/mon fichier ünï 写真.png")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("not an image, just text\n")
    data = (root / good[0]).read_bytes()
    (root / "sub" / "cut.png").write_bytes(data[: len(data) // 3])
    (root / "loop.png").symlink_to("loop.png")
    (root / "sub" / "back").symlink_to("..", target_is_directory=True)
    (root / "README.txt").write_text("ignored: not an image suffix\n")
    out = tmp_path / "out"
    done = subprocess.run(
        _cli(
            "batch", str(root), "--prompt", PROMPT, "--out", str(out), "--model", str(seg_model_dir)
        ),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "done 4, skipped 0, failed 5" in done.stdout
    errors = {
        e["image"]: e["error"]
        for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())
    }
    assert set(errors) == {"empty.png", "notes.jpg", "sub/cut.png", "loop.png", "sub/back"}
    assert "0 bytes" in errors["empty.png"]
    assert "not an image" in errors["notes.jpg"]
    assert "truncated" in errors["sub/cut.png"]
    assert "symlink loop" in errors["loop.png"] and "symlink loop" in errors["sub/back"]
    assert sorted(r["image"] for r in _rows(out)) == sorted(good)
    assert (out / mask_file("sub/mon fichier ünï 写真.png", PROMPT, 0)).is_file()


def test_manifest_groups_instructions_per_image(seg_model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "in"
    names = _photo_tree(root, 2)
    rows = [
        {"image": names[0], "instruction": PROMPT},
        {"image": names[1], "instruction": "segment the blue one"},
        {"image": names[0], "instruction": "what can roll?"},
        {"image": names[0], "instruction": PROMPT},  # repeated: asked once
        {"image": names[1], "instruction": "   "},  # empty: logged
        {"image": "missing.png", "instruction": PROMPT},
    ]
    manifest = tmp_path / "asks.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    out = tmp_path / "out"
    summary = run_batch(_job(root, out, seg_model_dir, prompt=None, prompts_file=manifest))
    assert (summary.done, summary.failed) == (3, 2)
    got = [(r["image"], r["instruction"]) for r in _rows(out)]
    assert got == [
        (names[0], PROMPT),
        (names[0], "what can roll?"),
        (names[1], "segment the blue one"),
    ]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["image"] for e in errors] == [names[1], "missing.png"]
    assert errors[0]["error"] == "instruction is empty" and errors[1]["error"] == "no such file"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"image": "a.png"}', '"instruction"'),
        ('{"image": "../up.png", "instruction": "x"}', "inside the input folder"),
    ],
)
def test_bad_manifest_line_is_one_error_line(
    line: str, message: str, seg_model_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "in").mkdir()
    manifest = tmp_path / "asks.jsonl"
    manifest.write_text(line + "\n")
    done = subprocess.run(
        _cli(
            "batch", str(tmp_path / "in"), "--prompts", str(manifest), "--out", str(tmp_path / "o")
        ),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
        check=False,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert f"{manifest}:1" in lines[0]


def test_existing_results_need_resume_and_the_same_job(
    full_run: Path, photos: Path, seg_model_dir: Path
) -> None:
    base = [
        "batch",
        str(photos),
        "--out",
        str(full_run),
        "--model",
        str(seg_model_dir),
        "--formats",
        ",".join(ALL_FORMATS),
    ]
    for extra, message in [([], "pass --resume"), (["--resume"], "prompt differs")]:
        prompt = PROMPT if not extra else "another question"
        done = subprocess.run(
            _cli(*base, "--prompt", prompt, *extra),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=_env(),
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("error: ") and message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


# ---- resume ------------------------------------------------------------------------------------
def test_sigkill_halfway_then_resume_equals_an_uninterrupted_run(
    seg_model_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "in"
    count = 24
    _photo_tree(root, count)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")

    def command(out: Path, *extra: str) -> list[str]:
        return _cli(
            "batch",
            str(root),
            "--prompt",
            PROMPT,
            "--out",
            str(out),
            "--model",
            str(seg_model_dir),
            "--batch-size",
            "2",
            "--formats",
            ",".join(ALL_FORMATS),
            "--quiet",
            *extra,
        )

    whole = tmp_path / "whole"
    subprocess.run(command(whole), check=True, timeout=TIMEOUT, env=_env(), capture_output=True)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        command(cut), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + TIMEOUT
    results = cut / "results.jsonl"
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and results.read_bytes().count(b"\n") >= count // 2:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert results.read_bytes().count(b"\n") < count
    assert not (cut / "coco.json").exists()
    resumed = subprocess.run(
        command(cut, "--resume"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
        check=True,
    )
    assert "skipped" in resumed.stdout and "skipped 0," not in resumed.stdout
    assert _tree(cut) == _tree(whole)
    assert not [p for p in cut.rglob("*.tmp")]


def test_resume_cuts_a_half_written_line_and_removes_temp_files(
    full_run: Path, photos: Path, seg_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run_batch(_job(photos, out, seg_model_dir))
    want = _tree(out)
    lines = (out / "results.jsonl").read_bytes().splitlines(keepends=True)
    (out / "results.jsonl").write_bytes(b"".join(lines[:-2]) + lines[-2][: len(lines[-2]) // 2])
    (out / "masks" / ".e6a25af1_0.png.x8k2.tmp").parent.mkdir(parents=True, exist_ok=True)
    (out / "masks" / ".e6a25af1_0.png.x8k2.tmp").write_bytes(b"half a png")
    (out / "coco.json").unlink()
    summary = run_batch(_job(photos, out, seg_model_dir, resume=True))
    assert (summary.done, summary.skipped) == (2, 5)
    assert _tree(out) == want
    again = run_batch(_job(photos, out, seg_model_dir, resume=True))  # nothing left to do
    assert (again.done, again.skipped, again.images) == (0, 7, 0)
    assert _tree(out) == want


def test_batch_size_does_not_change_a_byte(
    full_run: Path, photos: Path, seg_model_dir: Path, tmp_path: Path
) -> None:
    for size in (1, 4):
        out = tmp_path / f"bs{size}"
        run_batch(_job(photos, out, seg_model_dir, batch_size=size, workers=1 + size % 2))
        assert _tree(out) == _tree(full_run)


def test_walk_skips_the_output_folder_inside_the_input(photos: Path, seg_model_dir: Path) -> None:
    inside = photos / "out-inside"
    inside.mkdir()
    Image.fromarray(_scene(0)).save(inside / "mask.png")
    try:
        rels = [u.rel for u in discover(_job(photos, inside, seg_model_dir)).units]
    finally:
        (inside / "mask.png").unlink()
        inside.rmdir()
    assert len(rels) == len(set(rels)) == 7
    assert "out-inside/mask.png" not in rels


# ---- Ray ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own config warnings
def test_ray_engine_writes_the_same_bytes_as_the_local_engine(
    local_ray: object, seg_model_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "in"
    _photo_tree(root, 5)
    (root / "zero.png").write_bytes(b"")
    local, remote = tmp_path / "local", tmp_path / "ray"
    a = run_batch(_job(root, local, seg_model_dir, batch_size=2))
    b = run_batch(_job(root, remote, seg_model_dir, batch_size=3), engine="ray")
    assert (a.done, a.failed) == (b.done, b.failed) == (5, 1)
    assert _tree(remote) == _tree(local)
