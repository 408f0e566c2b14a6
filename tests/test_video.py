"""Video pipeline: DyCoke TTM on hand-made tensors, frame sampling, decoding errors, the
synthetic video world, One-Token-Seg-All outputs, and merged == unmerged at K = 0."""

from __future__ import annotations

import json
import math
import warnings

import cv2
import numpy as np
import pytest
import torch

from segapp.data.answers import in_order
from segapp.data.videos import VIDEO_KINDS, generate_clip
from segapp.errors import InputError
from segapp.export import rle_to_mask
from segapp.video.io import iter_frames, probe_video
from segapp.video.sampling import sample_frames
from segapp.video.tracks import pointer_grid
from segapp.video.ttm import fill_merged, keep_count, retained_fraction, temporal_token_merge


# ---- TTM on hand-made tensors -------------------------------------------------------------
def _static(t: int, n: int = 10, d: int = 6) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(1, n, d).repeat(t, 1, 1)


def _expected(t: int, n: int, k: float) -> int:
    keep = int((1 - k) * n)
    total = 0
    for start in range(0, t, 4):
        size = min(4, t - start)
        total += n + (size - 1) * keep
    return total


@pytest.mark.parametrize("k", [0.5, 0.7, 0.9])
def test_static_frames_keep_n_plus_three_per_window(k: float) -> None:
    n = 10
    merged = temporal_token_merge(_static(8, n), k)
    assert len(merged.tokens) == 2 * (n + 3 * int((1 - k) * n))
    assert merged.index.shape == (len(merged.tokens), 2)
    # every f0 (frames 0 and 4) keeps all of its patches
    for f0 in (0, 4):
        assert merged.index[merged.index[:, 0] == f0, 1].tolist() == list(range(n))


@pytest.mark.parametrize("t", [1, 2, 3, 5, 6, 7, 9])
def test_odd_frame_counts_and_short_last_window(t: int) -> None:
    n, k = 10, 0.7
    merged = temporal_token_merge(_static(t, n), k)
    assert len(merged.tokens) == _expected(t, n, k)
    counts = torch.bincount(merged.index[:, 0], minlength=t).tolist()
    for f in range(t):  # f2 of a short last window is compared too (not skipped)
        assert counts[f] == (n if f % 4 == 0 else keep_count(n, k))


def test_fully_changed_frame_keeps_its_most_changed_tokens() -> None:
    n, d, k = 12, 2, 0.5
    f0 = torch.zeros(n, d)
    f0[:, 0] = 1.0
    angles = torch.linspace(0.1, math.pi * 0.95, n)[
        torch.randperm(n, generator=torch.Generator().manual_seed(1))
    ]
    f1 = torch.stack([angles.cos(), angles.sin()], 1)  # every token turned, by a different angle
    merged = temporal_token_merge(torch.stack([f0, f1]), k)
    kept = merged.index[merged.index[:, 0] == 1, 1]
    most_changed = angles.argsort(descending=True)[: int((1 - k) * n)].sort().values
    assert kept.tolist() == most_changed.tolist()
    # kept tokens are the frame's own tokens at those patches
    assert torch.equal(merged.tokens[merged.index[:, 0] == 1], f1[most_changed])


def test_comparison_pairs_are_f1_f0_f3_f2_f2_f0() -> None:
    n, k = 4, 0.75  # each compared frame keeps exactly one token: the one that changed
    base = torch.eye(n)
    frames = base.repeat(4, 1, 1)
    frames[1, 2] = -base[2]  # f1 differs from f0 at patch 2
    frames[2, 1] = -base[1]  # f2 differs from f0 at patch 1
    frames[3] = frames[2].clone()
    frames[3, 3] = -base[3]  # f3 differs from f2 at patch 3 (and from f0 at 1 and 3)
    merged = temporal_token_merge(frames, k)
    kept = {f: merged.index[merged.index[:, 0] == f, 1].tolist() for f in range(4)}
    assert kept == {0: [0, 1, 2, 3], 1: [2], 2: [1], 3: [3]}


def test_k_zero_keeps_everything_in_order_and_positions_are_flat() -> None:
    tokens = torch.randn(6, 5, 3)
    merged = temporal_token_merge(tokens, 0.0)
    assert torch.equal(merged.tokens, tokens.reshape(-1, 3))
    assert merged.flat_positions.tolist() == list(range(30))
    assert retained_fraction(0.7) == pytest.approx(0.475)
    with pytest.raises(ValueError):
        temporal_token_merge(tokens, 1.5)


def test_dropped_tokens_inherit_their_reference_value() -> None:
    n, k = 4, 0.75  # the frames of the pairs test: each compared frame keeps one token
    base = torch.eye(n)
    frames = base.repeat(5, 1, 1)
    frames[1, 2] = -base[2]
    frames[2, 1] = -base[1]
    frames[3] = frames[2].clone()
    frames[3, 3] = -base[3]
    merged = temporal_token_merge(frames, k)
    values = torch.full((5, n), -1.0)
    values[merged.index[:, 0], merged.index[:, 1]] = torch.arange(len(merged.tokens)).float()
    kept = values >= 0
    filled = fill_merged(values, kept)
    assert torch.equal(filled[kept], values[kept])  # kept tokens keep their own value
    # f1 and f2 take f0's, f3 takes f2's (itself partly f0's); frame 4 starts a new window
    assert filled[1].tolist() == [0, 1, 4, 3]
    assert filled[2].tolist() == [0, 5, 2, 3]
    assert filled[3].tolist() == [0, 5, 2, 6]
    assert filled[4].tolist() == [7, 8, 9, 10]
    # the pointer's per-frame grid is the same fill, per [SEG] (here two)
    scores = torch.stack([torch.arange(11.0), -torch.arange(11.0)])
    grid = pointer_grid(scores, merged.index, 5, n)
    assert torch.equal(grid[0], filled) and torch.equal(grid[1], -filled)


def test_point_track_interpolates_between_llm_frames() -> None:
    from segapp.video.tracks import PointTrack

    points = torch.tensor([[[0.0, 0.0], [10.0, 20.0], [10.0, 20.0]]])  # M=1 x T=3 x 2
    track = PointTrack([2, 6, 10], points)
    assert track.at(0).tolist() == [[0.0, 0.0]] and track.at(2).tolist() == [[0.0, 0.0]]
    assert track.at(4).tolist() == [[5.0, 10.0]]
    assert track.at(8).tolist() == [[10.0, 20.0]] and track.at(15).tolist() == [[10.0, 20.0]]
    assert PointTrack([3], points[:, :1]).at(9).tolist() == [[0.0, 0.0]]


def test_presence_is_each_frames_share_of_the_pointer_over_its_best_frame() -> None:
    from segapp.video.tracks import PointTrack, frame_presence

    grid = torch.full((2, 3, 4), -30.0)  # M=2 [SEG] x T=3 frames x N=4 patches
    grid[0, 0, 1] = grid[0, 2, 3] = 5.0  # [SEG] 0: its target in frames 0 and 2, not 1
    grid[1, :, 0] = 2.0  # [SEG] 1: the same score on every frame
    presence = frame_presence(grid)
    assert presence.shape == (2, 3)
    assert torch.allclose(presence[0], torch.tensor([1.0, 0.0, 1.0]), atol=1e-6)
    assert torch.allclose(presence[1], torch.ones(3))
    track = PointTrack([0, 4, 8], torch.zeros(2, 3, 2), presence)
    assert torch.allclose(track.present(2), torch.tensor([0.5, 1.0]))  # halfway to frame 4
    assert torch.allclose(track.present(4), torch.tensor([0.0, 1.0]), atol=1e-6)
    assert torch.equal(PointTrack([0], torch.zeros(1, 1, 2)).present(3), torch.ones(1))


def test_frames_where_the_pointer_finds_no_target_get_no_mask(bundle, clip_dir) -> None:
    from segapp.video.pipeline import VideoOptions, VideoSegmenter

    seg = VideoSegmenter(bundle, VideoOptions(point_tracks=True, presence=0.0))
    answer = seg.reason(seg.encode_frames(clip_dir), "the shape that grows", merge=None)
    assert answer.track is not None and answer.track.presence is not None
    frames = list(seg.iter_sam(clip_dir))
    every = seg.batch_masks(frames, answer)
    # a presence of 1 on the first LLM frame, 0 from the second on
    answer.track.presence = torch.zeros_like(answer.track.presence)
    answer.track.presence[:, 0] = 1.0
    gated = VideoSegmenter(bundle, VideoOptions(point_tracks=True, presence=0.5))
    kept = gated.batch_masks(frames, answer)
    first, second = answer.track.frames[:2]
    emptied = 0
    for frame, (masks, scores), (gmasks, gscores) in zip(frames, every, kept, strict=True):
        if frame.index <= first:
            assert np.array_equal(gmasks, masks) and np.allclose(gscores, scores)
        elif frame.index > (first + second) / 2:  # interpolated presence below 0.5
            assert not gmasks.any() and gscores == [0.0] * len(scores)
            emptied += 1
    assert emptied >= len(frames) // 2


# ---- sampling and decoding ----------------------------------------------------------------
def test_sampling() -> None:
    assert sample_frames(16, dense=4).dense == (2, 6, 10, 14)
    assert sample_frames(1, dense=4).dense == (0,)
    s = sample_frames(100, dense=4, sparse=8, mode="sparse-dense")
    assert len(s.sparse) == 8 and len(s.dense) == 4 and set(s.all) >= set(s.dense)
    with pytest.raises(ValueError):
        sample_frames(0)


def _write_video(path, frames, fps=10.0):
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened()
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def test_bad_videos_give_clear_errors(tmp_path) -> None:
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x01not a video" * 100)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    folder = tmp_path / "no_frames"
    folder.mkdir()
    for path, words in [
        (corrupt, "video"),
        (empty, "empty"),
        (folder, "no frame images"),
        (tmp_path / "missing.mp4", "no such"),
    ]:
        with pytest.raises(InputError, match=words):
            probe_video(path)


def test_frame_folder_and_file_stream_the_same_frames(tmp_path) -> None:
    clip = generate_clip("test", 3, frames=6)
    from segapp.video.evaluate import write_frames

    folder = write_frames(clip, tmp_path / "frames")
    info = probe_video(folder)
    assert (info.frames, info.size, info.is_folder) == (6, (256, 256), True)
    got = list(iter_frames(folder, [4, 1]))
    assert [i for i, _ in got] == [1, 4]
    assert np.array_equal(got[1][1], clip.frames[4])
    video = _write_video(tmp_path / "clip.avi", list(clip.frames))
    assert probe_video(video).frames == 6
    assert [i for i, _ in iter_frames(video, [0, 5])] == [0, 5]


# ---- the synthetic video world ------------------------------------------------------------
def test_video_world_properties() -> None:
    seen = set()
    for i in range(40):
        clip = generate_clip("test", i)
        seen.add(clip.kind)
        areas = clip.masks.sum((1, 2))
        assert clip.frames.shape == (16, 256, 256, 3) and clip.masks.shape == (16, 256, 256)
        assert "[SEG]" in clip.answer
        if clip.kind == "disappears":
            assert areas[0] > 0 and areas[-1] == 0
        if clip.kind == "appears":
            assert areas[0] == 0 and areas[-1] > 0
        if clip.kind == "grows":
            assert areas[-1] > 1.5 * areas[0]
        # the phrase a `restate` answer repeats is the instruction's own (plus "the", "that")
        words = set(clip.instruction.rstrip("?").split()) | {"the", "that"}
        assert clip.phrase and set(clip.phrase.split()) <= words, clip.instruction
        restated = in_order(clip.answer, "restate", clip.phrase)
        assert restated.startswith(f"It is {clip.phrase} [SEG], the ")
    assert seen == set(VIDEO_KINDS)
    a, b = generate_clip("val", 5), generate_clip("val", 5)
    assert np.array_equal(a.frames, b.frames) and a.instruction == b.instruction


# ---- the model: reduced decoding, One-Token-Seg-All ---------------------------------------
@pytest.fixture(scope="module")
def bundle():
    from segapp.build import load_model

    return load_model("tiny")


def test_reduced_generate_without_reduction_matches_generate(bundle) -> None:
    from segapp.data.instructions import generate_sample
    from segapp.modeling.reduction import KVPrune, reduced_generate
    from segapp.predictor import Segmenter

    seg = Segmenter(bundle)
    sample = generate_sample("test", 1)
    cache = seg.set_image(sample.image)
    _, prompt = seg.prompt_ids(sample.instruction)
    ids = torch.tensor([prompt])
    ref = bundle.model.generate(ids, cache.image_tokens)
    embeds = bundle.model.embed_inputs(ids, cache.image_tokens)
    pos = torch.arange(ids.shape[1])[None]
    visual = ids[0] == bundle.model.image_token_id
    for kv in (None, KVPrune(layer=3, keep=1.0)):  # keeping every visual token changes nothing
        got = reduced_generate(bundle.model, embeds, pos, visual, kv_prune=kv)
        assert got.token_ids == ref.token_ids
        assert torch.equal(got.seg_hidden, ref.seg_hidden)
    pruned = reduced_generate(bundle.model, embeds, pos, visual, kv_prune=KVPrune(3, 0.25))
    assert pruned.visual_decode == 16 and pruned.kv_refreshes >= 1


def test_fastv_and_divprune_keep_the_asked_share(bundle) -> None:
    from segapp.data.instructions import generate_sample
    from segapp.modeling.reduction import divprune_select
    from segapp.predictor import Segmenter
    from segapp.token_reduction import predict_reduced

    seg = Segmenter(bundle)
    seg.set_image(generate_sample("test", 2).image)
    for method in ("fastv", "divprune"):
        res = predict_reduced(seg, "the largest object", method=method, keep=0.5)
        assert res.timings["image_tokens_kept"] == 32 and res.timings["image_tokens_total"] == 64
    # DivPrune on three tight clusters picks one token from each
    centres = torch.eye(3)
    tokens = torch.cat([c + 0.01 * torch.randn(5, 3) for c in centres])
    picked = divprune_select(tokens, 3)
    assert sorted((picked // 5).tolist()) == [0, 1, 2]


def test_token_keep_defaults_to_divprune() -> None:
    """`--token-keep` alone selects DivPrune (the method that keeps gIoU within 0.02)."""
    from segapp.cli import build_parser

    args = build_parser().parse_args(["segment", "x.png", "the red circle", "--token-keep", "0.5"])
    assert args.token_method == "divprune"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from segapp.video.evaluate import write_frames

    return write_frames(generate_clip("test", 0, frames=6), tmp_path_factory.mktemp("clip"))


def test_merged_equals_unmerged_at_k0(bundle, clip_dir) -> None:
    from segapp.video.pipeline import VideoSegmenter

    seg = VideoSegmenter(bundle)
    tokens = seg.encode_frames(clip_dir)
    a = seg.reason(tokens, "the shape that moves fastest", merge=None)
    b = seg.reason(tokens, "the shape that moves fastest", merge=0.0)
    assert a.answer == b.answer and torch.equal(a.prompts, b.prompts)
    assert a.stats["visual_tokens_kept"] == b.stats["visual_tokens_kept"] == 4 * 64
    for (_, _, ma, sa), (_, _, mb, sb) in zip(
        seg.iter_masks(clip_dir, a), seg.iter_masks(clip_dir, b), strict=True
    ):
        assert np.array_equal(ma, mb) and sa == sb
    merged = seg.reason(tokens, "the shape that moves fastest", merge=0.7)
    assert merged.stats["visual_tokens_kept"] == 64 + 3 * 19
    pruned = seg.reason(tokens, "the shape that moves fastest", merge=0.7, prune=0.7)
    assert pruned.stats["visual_tokens_decode"] == round(0.3 * 121)
    assert pruned.stats["prefill_s"] > 0 and pruned.stats["kv_refreshes"] >= 1


def test_compiled_prefill_gives_the_eager_answer(bundle, clip_dir) -> None:
    """`--compile`: the prefill under torch.compile answers as the eager one, merged or not, and
    its KV cache serves DyCoke's pruned decoding. Compiles once (about 10 s on 2 cores)."""
    import shutil

    from segapp.modeling.reduction import compiled_prefill
    from segapp.video.pipeline import VideoOptions, VideoSegmenter

    eager = VideoSegmenter(bundle)
    fast = VideoSegmenter(bundle, VideoOptions(compile_llm=True))
    tokens = eager.encode_frames(clip_dir)
    for merge, prune in ((None, None), (0.7, None), (0.7, 0.7)):
        a = eager.reason(tokens, "the shape that moves fastest", merge=merge, prune=prune)
        b = fast.reason(tokens, "the shape that moves fastest", merge=merge, prune=prune)
        assert a.answer == b.answer
        assert torch.allclose(a.prompts, b.prompts, atol=1e-4)
        assert a.stats["kv_cache_bytes"] == b.stats["kv_cache_bytes"]
        assert a.track is not None and b.track is not None
        assert torch.allclose(a.track.points, b.track.points, atol=1e-3)
    if shutil.which("g++") or shutil.which("c++"):  # a CPU compile needs a C++ compiler
        assert not compiled_prefill.failed


def test_a_failed_compile_warns_once_and_runs_eagerly(bundle, monkeypatch) -> None:
    from segapp.modeling import reduction

    def broken(fn, **kw):
        def run(*args):
            raise RuntimeError("no C++ compiler found")

        return run

    monkeypatch.setattr(reduction.torch, "compile", broken)
    prefill = reduction._CompiledPrefill()
    llm = bundle.model.llm
    h, pos = torch.randn(1, 12, 128), torch.arange(12)[None]
    index = torch.arange(2, 10)
    with torch.inference_mode():
        with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler found.*eagerly"):
            got = prefill(llm, h, pos, None, index)
        with warnings.catch_warnings(record=True) as later:
            warnings.simplefilter("always")
            again = prefill(llm, h, pos, None, index)
        want = reduction._prefill_layers(llm, h, pos, None, index)
    assert prefill.failed and not later  # warned once, not on every call
    for x, y, z in zip(got[:3], again[:3], want[:3], strict=True):
        assert torch.equal(x, z) and torch.equal(y, z)


def test_point_track_follows_every_llm_frame_and_joins_the_prompt(bundle, clip_dir) -> None:
    from segapp.video.pipeline import VideoOptions, VideoSegmenter

    seg = VideoSegmenter(bundle, VideoOptions(point_tracks=True))
    tokens = seg.encode_frames(clip_dir)
    a = seg.reason(tokens, "the shape that grows", merge=None)
    b = seg.reason(tokens, "the shape that grows", merge=0.0)
    assert a.track is not None and b.track is not None and len(a.prompts) >= 1
    assert a.track.frames == list(tokens.sample.dense)
    assert a.track.points.shape == (len(a.prompts), len(tokens.sample.dense), 2)
    assert torch.equal(a.track.points, b.track.points)  # K=0 merging changes nothing
    side = bundle.model.sam.image_encoder.img_size
    assert ((a.track.points >= 0) & (a.track.points < side)).all()
    merged = seg.reason(tokens, "the shape that grows", merge=0.7)
    assert merged.track is not None and merged.track.points.shape == a.track.points.shape
    frame = next(iter(seg.iter_sam(clip_dir)))
    masks, scores = seg.frame_masks(frame, a)
    assert masks.shape[0] == len(a.prompts) == len(scores)


def test_batched_frame_decoding_matches_one_decoder_call_per_frame(bundle, clip_dir) -> None:
    from segapp.preprocess import postprocess_logits
    from segapp.video.pipeline import VideoOptions, VideoSegmenter

    for tracks in (False, True):
        options = VideoOptions(point_tracks=tracks, sam_batch=4, presence=0.0)
        seg = VideoSegmenter(bundle, options)
        answer = seg.reason(seg.encode_frames(clip_dir), "the shape that grows", merge=0.7)
        assert len(answer.prompts) >= 1 and (answer.track is not None) == tracks
        frames = list(seg.iter_sam(clip_dir))
        batched = seg.batch_masks(frames, answer)
        streamed = list(seg.iter_masks(clip_dir, answer))  # batches of 4 + 2 frames
        assert [i for i, *_ in streamed] == [f.index for f in frames] == list(range(6))
        size = bundle.model.sam.image_encoder.img_size
        for frame, (masks, scores), (_, _, smasks, sscores) in zip(
            frames, batched, streamed, strict=True
        ):
            prompts = answer.prompts
            if answer.track is not None:
                point = bundle.model.point_token(answer.track.at(frame.index))
                prompts = torch.cat([prompts, point], 1)
            low, iou = bundle.model.decode_masks(frame.embedding, prompts)  # this frame alone
            ref = postprocess_logits(low, frame.input_size, frame.rgb.shape[:2], size) > 0
            assert masks.shape == ref.shape == smasks.shape
            assert (masks != ref.numpy()).mean() < 1e-3 and (smasks != masks).mean() < 1e-3
            assert np.allclose(scores, iou[:, 0].clamp(0, 1).tolist(), atol=1e-4)
            assert np.allclose(sscores, scores, atol=1e-4)
    assert seg.batch_masks([], answer) == []


def test_run_writes_masks_overlay_and_rle_for_every_frame(bundle, clip_dir, tmp_path) -> None:
    from segapp.video import VideoSegmenter

    seen: list[float] = []
    result = VideoSegmenter(bundle).run(
        clip_dir,
        "the object that changes colour",
        tmp_path / "out",
        merge=0.7,
        progress=lambda f, stage: seen.append(f),
    )
    assert result.frames == 6 and result.overlay_path.is_file()
    assert seen[-1] == 1.0 and seen == sorted(seen)
    rows = [json.loads(line) for line in result.results_path.read_text().splitlines()]
    assert [r["frame"] for r in rows] == list(range(6))
    for r in rows:
        assert r["answer"] == result.answer
        for k, m in enumerate(r["masks"]):
            png = cv2.imread(str(result.mask_dir / f"frame_{r['frame']:05d}_mask_{k}.png"), 0)
            assert np.array_equal(rle_to_mask(m["rle"]), png > 0)
    for key in ("visual_tokens_kept", "visual_tokens_total", "prefill_s", "decode_s", "total_s"):
        assert key in result.stats
    assert result.stats["visual_tokens_kept"] < result.stats["visual_tokens_total"]


def test_one_frame_and_4k_videos(bundle, tmp_path) -> None:
    from segapp.video.pipeline import VideoSegmenter

    seg = VideoSegmenter(bundle)
    one = _write_video(tmp_path / "one.avi", [generate_clip("test", 1).frames[0]])
    res = seg.run(one, "the shape that grows", tmp_path / "one", merge=0.7)
    assert res.frames == 1 and res.stats["visual_tokens_total"] == 64
    big = np.kron(generate_clip("test", 1, frames=2).frames, np.ones((1, 9, 15, 1), np.uint8))
    big = big[:, :2160, :3840]
    four_k = _write_video(tmp_path / "4k.avi", list(big))
    res = seg.run(four_k, "the shape that grows", tmp_path / "4k", merge=0.7)
    row = json.loads(res.results_path.read_text().splitlines()[0])
    assert res.frames == 2 and all(m["rle"]["size"] == [2160, 3840] for m in row["masks"])
    overlay = cv2.VideoCapture(str(res.overlay_path))
    assert overlay.get(cv2.CAP_PROP_FRAME_WIDTH) == 1280  # overlay video is downscaled


def test_cli_video_and_errors(clip_dir, tmp_path, capsys) -> None:
    from segapp.cli import run

    assert (
        run(
            [
                "video",
                str(clip_dir),
                "the shape that grows",
                "--out-dir",
                str(tmp_path),
                "--quiet",
                "--json",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["frames"] == 6 and (tmp_path / "results.jsonl").is_file()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"garbage" * 50)
    assert run(["video", str(bad), "anything", "--out-dir", str(tmp_path / "b"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "bad.mp4" in err[0]


def test_video_training_sample_gives_finite_losses_and_gradients(random_model_dir) -> None:
    from segapp.build import load_model
    from segapp.config import TrainConfig
    from segapp.video.training import is_video_step, make_video_sample, video_losses

    assert [is_video_step(s, 0.25) for s in range(8)] == [False, False, False, True] * 2
    assert not any(is_video_step(s, 0.0) for s in range(100))
    b = load_model(str(random_model_dir))
    b.model.train()
    sample = make_video_sample(b.config, seed=0, step=3)
    sample.merge = 0.7
    terms = video_losses(b.model, sample, b.chat, b.config, TrainConfig())
    terms["video_total"].backward()
    assert torch.isfinite(terms["video_total"])
    grad = b.model.projector[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # with --video-pointer: the pointer learns on every LLM frame and SAM gets its point track
    b.model.zero_grad()
    terms = video_losses(b.model, sample, b.chat, b.config, TrainConfig(video_pointer=True))
    assert torch.isfinite(terms["video_pointer"]) and terms["video_pointer"] > 0
    terms["video_total"].backward()
    assert b.model.seg_pointer is not None
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in b.model.seg_pointer.parameters()
    )
    assert sample.vision_cover is not None and sample.vision_cover.shape == (4, 64)
    assert len(sample.frames) == 4 and len(sample.sam_frames) == 2


def test_video_token_losses_train_the_target_head_and_pointer_on_every_frame(
    random_model_dir,
) -> None:
    from segapp.build import load_model
    from segapp.config import TrainConfig
    from segapp.train_losses import AuxHeads
    from segapp.video.training import make_video_sample, video_losses

    b = load_model(str(random_model_dir))
    b.model.train()
    aux = AuxHeads(b.config)
    tcfg = TrainConfig(video_token_losses=True, target_weight=1.0)
    sample = make_video_sample(b.config, seed=0, step=3)
    assert sample.vision_cover is not None and bool((sample.vision_cover >= 0.5).any())
    for merge in (None, 0.7):
        sample.merge = merge
        b.model.zero_grad()
        aux.zero_grad()
        terms = video_losses(b.model, sample, b.chat, b.config, tcfg, aux)
        plain = video_losses(b.model, sample, b.chat, b.config, TrainConfig(target_weight=1.0))
        assert "video_target" not in plain and "video_seg_pointer" not in plain
        for name in ("video_target", "video_seg_pointer"):
            assert torch.isfinite(terms[name]) and terms[name] > 0, name
        # the extra terms are in the total, and only they differ from the plain sample
        extra = terms["video_target"] + terms["video_seg_pointer"]
        assert torch.allclose(terms["video_total"], plain["video_total"] + extra, atol=1e-5)
        terms["video_total"].backward()
        assert aux.target.weight.grad is not None and aux.target.weight.grad.abs().sum() > 0
        assert b.model.seg_pointer is not None
        assert b.model.seg_pointer.q.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="training heads"):
        video_losses(b.model, sample, b.chat, b.config, tcfg)


def test_a_video_pointer_head_trains_on_clips_and_leaves_the_image_pointer_alone(
    tmp_path, tokenizer
) -> None:
    from segapp.build import build_segllm, load_model, save_bundle
    from segapp.config import MODEL_PRESETS, TrainConfig
    from segapp.train_losses import AuxHeads
    from segapp.video.training import make_video_sample, video_losses

    cfg = MODEL_PRESETS["tiny"].replace(video_seg_pointer=32)
    torch.manual_seed(0)
    save_bundle(build_segllm(cfg, tokenizer), tokenizer, cfg, tmp_path / "m")
    b = load_model(str(tmp_path / "m"))  # the head is saved and loaded with the model
    assert b.config.video_seg_pointer == 32
    model = b.model
    assert model.video_seg_pointer is not None and model.video_pointer is model.video_seg_pointer
    assert model.video_seg_pointer.q.out_features == 32
    model.train()
    aux = AuxHeads(b.config)
    tcfg = TrainConfig(video_token_losses=True, target_weight=1.0)
    sample = make_video_sample(b.config, seed=0, step=3)
    terms = video_losses(model, sample, b.chat, b.config, tcfg, aux)
    assert torch.isfinite(terms["video_seg_pointer"]) and terms["video_seg_pointer"] > 0
    terms["video_total"].backward()
    assert model.video_seg_pointer.q.weight.grad.abs().sum() > 0
    assert model.seg_pointer is not None and model.seg_pointer.q.weight.grad is None
    # SAM is prompted with the video pointer's track, so the dice differs from [SEG] alone
    alone = video_losses(model, sample, b.chat, b.config, TrainConfig(target_weight=1.0))
    assert not torch.allclose(terms["video_dice"], alone["video_dice"])


def test_extra_video_clips_of_a_step_are_new_clips(random_model_dir) -> None:
    from segapp.build import load_model
    from segapp.video.training import make_video_sample

    cfg = load_model(str(random_model_dir)).config
    first = make_video_sample(cfg, seed=0, step=5)
    again = make_video_sample(cfg, seed=0, step=5, extra=0)
    other = make_video_sample(cfg, seed=0, step=5, extra=1)
    assert torch.equal(first.vision_pixels, again.vision_pixels)  # clip 0: the one-clip stream
    assert not torch.equal(first.vision_pixels, other.vision_pixels)


def test_more_sam_frames_per_clip_are_distinct_frames_of_the_same_clip(random_model_dir) -> None:
    from segapp.build import load_model
    from segapp.data.videos import FRAMES
    from segapp.video.training import make_video_sample

    cfg = load_model(str(random_model_dir)).config
    two = make_video_sample(cfg, seed=0, step=5)
    many = make_video_sample(cfg, seed=0, step=5, sam_frames=FRAMES)
    assert torch.equal(two.vision_pixels, many.vision_pixels)  # the same clip for the LLM
    assert sorted(many.sam_frames) == list(range(FRAMES))
    assert many.sam_pixels.shape[0] == many.sam_masks.shape[0] == FRAMES


@pytest.mark.parametrize("frames", ["0", "17"])
def test_train_refuses_video_sam_frames_outside_a_clip(tmp_path, capsys, frames) -> None:
    from segapp.cli import run

    assert run(["train", "--out", str(tmp_path / "v"), "--video-sam-frames", frames]) == 2
    assert "--video-sam-frames must be from 1 to 16" in capsys.readouterr().err


def test_train_refuses_zero_video_clips(tmp_path, capsys) -> None:
    from segapp.cli import run

    assert run(["train", "--out", str(tmp_path / "v"), "--video-clips", "0"]) == 2
    assert "--video-clips must be at least 1" in capsys.readouterr().err


def test_a_loaded_model_gets_a_fresh_video_pointer_for_fine_tuning(
    random_model_dir, tmp_path, capsys
) -> None:
    from segapp.build import load_model
    from segapp.cli import run
    from segapp.train_command import _with_video_pointer

    b = load_model(str(random_model_dir))
    assert b.model.video_seg_pointer is None and b.model.video_pointer is b.model.seg_pointer
    image_pointer = b.model.seg_pointer.q.weight.clone()
    grown = _with_video_pointer(b, 16)
    assert grown.config.video_seg_pointer == 16 and b.config.video_seg_pointer == 0
    assert grown.model.video_pointer is grown.model.video_seg_pointer
    assert grown.model.video_seg_pointer.k.out_features == 16
    assert torch.equal(grown.model.seg_pointer.q.weight, image_pointer)  # left as it was
    assert _with_video_pointer(grown, 16) is grown
    with pytest.raises(InputError, match="has width 16, not 32"):
        _with_video_pointer(grown, 32)
    out = tmp_path / "v"
    args = ["train", "--init-from", str(random_model_dir), "--out", str(out)]
    assert run([*args, "--video-seg-pointer", "0"]) == 2
    assert "--video-seg-pointer must be at least 1" in capsys.readouterr().err
    assert not out.exists()


# ---- segapp bench video -------------------------------------------------------------------
@pytest.mark.parametrize("llm_hidden", [None, 32])
def test_bench_video_reports_kept_tokens_and_cache_per_setting(llm_hidden) -> None:
    """On the bundled model (video adapter included) and with a swapped-in random LLM: the
    kept visual tokens are TTM's count, the KV cache shrinks with them."""
    from segapp.video.bench import bench_video

    out = bench_video(
        "tiny",
        frames=4,
        repeats=1,
        llm_repeats=0,
        llm_hidden=llm_hidden,
        llm_layers=2,
        max_new_tokens=2,
    )
    assert out["llm"]["random_weights"] is bool(llm_hidden)
    assert out["llm"]["hidden"] == (llm_hidden or 128)
    per_frame = out["settings"]["unmerged"]["visual_tokens_kept"] // 4
    assert out["settings"]["unmerged"]["visual_tokens_total"] == 4 * per_frame
    for k in (0.5, 0.7):
        assert out["settings"][f"K={k:g}"]["visual_tokens_kept"] == _expected(4, per_frame, k)
        ratio = out["merged_vs_unmerged"][f"K={k:g}"]
        assert ratio["kv_cache_reduction"] > 1 and ratio["prefill_speedup"] > 0
        text = out["settings"]["unmerged"]["prompt_tokens"] - 4 * per_frame  # not merged
        merged_prompt = _expected(4, per_frame, k) + text
        assert out["settings"][f"K={k:g}"]["prompt_tokens"] == merged_prompt
        bound = (4 * per_frame + text) / merged_prompt
        assert ratio["prefill_speedup_bound"] == pytest.approx(bound, abs=0.006)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repeats", "0"], "--repeats: must be at least 1"),
        (["--llm-hidden", "-5"], "--llm-hidden: must be at least 8"),
        (["--llm-hidden", "64", "--llm-layers", "2", "--prune", "0.5"], "--llm-layers above 3"),
    ],
)
def test_bench_video_bad_values_exit_2(capsys, args, message) -> None:
    from segapp.cli import run

    try:
        code = run(["bench", "video", *args])
    except SystemExit as stop:  # argparse's own refusal
        code = int(stop.code or 0)
    assert code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
