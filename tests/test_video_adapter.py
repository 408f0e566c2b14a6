"""`segapp train-video`: the motion map, the per-token video pointer, what trains and what not,
the saved model, presence, CLI errors, and what the bundled adapter does on held-out clips."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from segapp.data.videos import generate_clip
from segapp.video.evaluate import write_frames


def _identity_motion(hidden: int) -> torch.nn.Linear:
    motion = torch.nn.Linear(hidden, hidden, bias=False)
    with torch.no_grad():
        motion.weight.copy_(torch.eye(hidden))
    return motion


def test_motion_is_each_tokens_deviation_from_its_patch_mean(random_model_dir) -> None:
    from segapp.build import load_model

    model = load_model(str(random_model_dir)).model
    torch.manual_seed(0)
    dense = torch.randn(1, 5, 128).repeat(4, 1, 1)  # T=4 frames, 5 patches, all static
    dense[2, 3] += 1.0  # patch 3 changes on frame 2
    assert model.add_motion(dense) is dense  # no motion map: unchanged
    model.video_motion = _identity_motion(128)
    moved = model.add_motion(dense)
    static = [p for p in range(5) if p != 3]
    assert torch.allclose(moved[:, static], dense[:, static], atol=1e-6)  # nothing changed there
    assert torch.allclose(moved[2, 3], dense[2, 3] + 0.75, atol=1e-6)  # 1 - mean 0.25
    assert torch.allclose(moved[0, 3], dense[0, 3] - 0.25, atol=1e-6)
    one = dense[:1]
    assert model.add_motion(one) is one  # one frame: nothing to compare


def test_token_presence_is_the_probability_of_each_frames_best_token() -> None:
    from segapp.video.tracks import token_presence

    grid = torch.full((1, 3, 4), -6.0)
    grid[0, 0, 2] = 4.0  # the target on frame 0, nowhere on frame 1, weakly on frame 2
    grid[0, 2, 1] = 0.0
    presence = token_presence(grid)[0]
    assert presence[0] > 0.98 and presence[1] < 0.01 and abs(float(presence[2]) - 0.5) < 1e-6


def test_train_video_trains_only_the_video_modules_and_saves_a_model(
    random_model_dir, tmp_path
) -> None:
    from segapp.build import load_model
    from segapp.video.adapter import AdapterConfig, fit_video_adapter

    bundle = load_model(str(random_model_dir))
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    acfg = AdapterConfig(steps=6, warmup=2, log_every=3, presence=0.3, frames=(4, 2))
    last = fit_video_adapter(bundle, tmp_path / "v", acfg, progress=False)
    assert last["step"] == 6 and np.isfinite(last["total"])
    after = bundle.model.state_dict()
    new = {k for k in after if k not in before}
    assert new and all(k.startswith(("video_motion.", "video_seg_pointer.")) for k in new)
    assert all(torch.equal(before[k], after[k]) for k in before)  # every old weight as it was
    assert after["video_motion.weight"].abs().sum() > 0  # it trained from zero
    lines = (tmp_path / "v" / "train_video_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [3, 6]
    saved = load_model(str(tmp_path / "v"))
    cfg = saved.config
    assert cfg.video_motion and cfg.video_seg_pointer == 64 and cfg.video_presence == 0.3
    assert saved.model.video_presence == 0.3
    assert torch.equal(
        saved.model.state_dict()["video_motion.weight"], after["video_motion.weight"]
    )
    assert json.loads((tmp_path / "v" / "train_video_config.json").read_text())["steps"] == 6


def test_adapter_losses_reach_only_the_motion_map_and_the_video_pointer(random_model_dir) -> None:
    from segapp.build import load_model
    from segapp.video.adapter import adapter_losses, add_video_modules
    from segapp.video.training import make_video_sample

    b = load_model(str(random_model_dir))
    params = add_video_modules(b.model, 16)
    with torch.no_grad():  # a non-zero map, so the gradient reaches through it to the pointer
        b.model.video_motion.weight.normal_(std=0.02)
    sample = make_video_sample(b.config, seed=0, step=2, sam_frames=1, answer_order="restate")
    terms = adapter_losses(b.model, sample, b.chat)
    assert all(torch.isfinite(v) for v in terms.values()) and terms["where"] > 0
    terms["total"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    trainable = {id(p) for p in params}
    assert all(p.grad is None for p in b.model.parameters() if id(p) not in trainable)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps must be at least 1"),
        (["--presence", "1.5"], "--presence must be in (0, 1)"),
        (["--lr", "0"], "--lr must be positive"),
        (["--frames", "4", "17"], "--frames must be from 2 to 16"),
    ],
)
def test_train_video_bad_values_are_one_line_exit_2(tmp_path, capsys, args, message) -> None:
    from segapp.cli import run

    assert run(["train-video", "--out", str(tmp_path / "v"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "v").exists()


def test_bad_video_presence_in_config_is_named(random_model_dir, tmp_path) -> None:
    import shutil

    from segapp.build import load_model
    from segapp.errors import ModelError

    copy = tmp_path / "m"
    shutil.copytree(random_model_dir, copy)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "video_presence": 1.0}))
    with pytest.raises(ModelError, match="video_presence must be in"):
        load_model(str(copy))


@pytest.fixture(scope="module")
def bundle():
    from segapp.build import load_model

    return load_model("tiny")


def _tokens(seg, clip):
    with tempfile.TemporaryDirectory() as tmp:
        return seg.encode_frames(write_frames(clip, Path(tmp) / "clip"))


def _on_target(bundle, clips: int, *, motion: bool) -> float:
    """Share of the LLM's frames showing the target where the video pointer's best token lies
    on it (first `clips` val clips, unmerged)."""
    from segapp.video.pipeline import VideoOptions, VideoSegmenter

    model = bundle.model
    saved = model.video_motion
    model.video_motion = saved if motion else None
    seg = VideoSegmenter(bundle, VideoOptions())
    side = model.sam.prompt_encoder.input_image_size[0]
    hits = []
    try:
        for i in range(clips):
            clip = generate_clip("val", i)
            answer = seg.reason(_tokens(seg, clip), clip.instruction, merge=None)
            assert answer.track is not None
            for j, f in enumerate(answer.track.frames):
                mask = clip.masks[f]
                if mask.any():
                    x, y = (answer.track.points[0, j] * mask.shape[0] / side).long().tolist()
                    hits.append(bool(mask[y, x]))
    finally:
        model.video_motion = saved
    return float(np.mean(hits))


def test_bundled_video_adapter_finds_the_target_on_most_llm_frames(bundle) -> None:
    """The bundled model's video pointer, with the motion map, lands on the target in most of
    the LLM's frames that show it; without the map (the same pointer) far less often."""
    assert bundle.config.video_motion and bundle.model.video_presence > 0
    with_motion = _on_target(bundle, 20, motion=True)
    without = _on_target(bundle, 20, motion=False)
    assert with_motion >= 0.55, with_motion
    assert with_motion >= without + 0.15, (with_motion, without)


def test_bundled_video_presence_empties_frames_without_the_target(bundle) -> None:
    """On clips whose target is hidden for part of the video, the presence gate leaves more
    of those frames empty than it empties frames that show the target."""
    from segapp.video.pipeline import VideoOptions, VideoSegmenter

    seg = VideoSegmenter(bundle, VideoOptions())
    off = VideoSegmenter(bundle, VideoOptions(presence=0.0))
    emptied_absent, emptied_present, absent, present = 0, 0, 0, 0
    clips = [c for c in (generate_clip("val", i) for i in range(40)) if c.kind == "appears"][:5]
    assert clips
    for clip in clips:
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_frames(clip, Path(tmp) / "clip")  # written once, read twice
            answer = seg.reason(seg.encode_frames(folder), clip.instruction, merge=None)
            frames = list(seg.iter_sam(folder))
            gated = seg.batch_masks(frames, answer)
            every = off.batch_masks(frames, dataclasses.replace(answer))
        for frame, (masks, _), (all_masks, _) in zip(frames, gated, every, strict=True):
            was_empty = not masks.any() and all_masks.any()
            if clip.masks[frame.index].any():
                present += 1
                emptied_present += was_empty
            else:
                absent += 1
                emptied_absent += was_empty
    assert absent and present
    assert emptied_absent / absent >= 0.5, (emptied_absent, absent)
    assert emptied_present / present <= 0.25, (emptied_present, present)


def test_eval_video_reports_the_presence_it_gated_with(bundle) -> None:
    from segapp.video.evaluate import evaluate_video
    from segapp.video.pipeline import VideoOptions

    own = evaluate_video(bundle, split="val", limit=2, merges=(None,), progress=False)
    assert own["presence"] == bundle.model.video_presence == 0.3
    off = evaluate_video(
        bundle,
        split="val",
        limit=2,
        merges=(None,),
        options=VideoOptions(presence=0.0),
        progress=False,
    )
    assert off["presence"] == 0.0
    for summary in (own, off):
        assert 0.0 <= summary["settings"]["unmerged"]["J&F"] <= 1.0
