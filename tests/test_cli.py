"""The CLI contract (DESIGN.md): one-line errors `error: <what> (<where>)`, exit 2 for bad input,
no traceback; valid images of any mode give an overlay at the displayed size."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segapp.cli import run

ERROR_LINE = re.compile(r"^error: .+ \(.+\)$")


def _pattern(height: int = 24, width: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _png_with_header_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR claims ``width x height`` (CRC fixed so only the size is wrong)."""
    buf = io.BytesIO()
    Image.new("1", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    at = data.index(b"IHDR")
    body = struct.pack(">II", width, height) + bytes(data[at + 12 : at + 17])
    data[at + 4 : at + 17] = body
    data[at + 17 : at + 21] = struct.pack(">I", zlib.crc32(b"IHDR" + body))
    return bytes(data)


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_pattern(64, 64)).save(buf, format=fmt)
    return buf.getvalue()


def _segment(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = run(["segment", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert ERROR_LINE.match(lines[0]), lines[0]
    assert "Traceback" not in err
    return lines[0]


# name -> (how to make the input under tmp, words the message must hold)
BAD_IMAGES = {
    "missing": (lambda d: d / "nope.png", "no such file"),
    "directory": (lambda d: d, "directory"),
    "empty": (lambda d: _write(d / "empty.png", b""), "empty file"),
    "truncated_png": (lambda d: _write(d / "t.png", _encoded("PNG")[:-200]), "truncated"),
    "truncated_jpeg": (lambda d: _write(d / "t.jpg", _encoded("JPEG")[:300]), "truncated"),
    "text_as_png": (lambda d: _write(d / "notes.png", b"hello, not a picture\n"), "not an image"),
    "huge_header": (
        lambda d: _write(d / "huge.png", _png_with_header_size(20000, 20000)),
        "too large",
    ),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_is_one_line_exit_2(
    case: str, random_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, words = BAD_IMAGES[case]
    src = tmp_path / "in"
    src.mkdir()
    path = make(src)
    out = tmp_path / "out"
    code, stdout, err = _segment(
        [str(path), "find the circle", "--model", str(random_model_dir), "--out-dir", str(out)],
        capsys,
    )
    assert code == 2
    line = _assert_one_line_error(err)
    assert words in line.lower()
    assert line.endswith(f"({path})")  # where = the path the user gave
    assert stdout == ""
    assert not out.exists()  # nothing written for bad input


@pytest.mark.parametrize(
    ("instruction", "words"),
    [("", "empty"), ("  \t\n ", "empty"), ("a" * 10_000, "too long")],
    ids=["empty", "whitespace", "10k"],
)
def test_bad_instruction_is_one_line_exit_2(
    instruction: str,
    words: str,
    random_model_dir: Path,
    tmp_path: Path,
    write_image,
    capsys: pytest.CaptureFixture[str],
) -> None:
    image = write_image(tmp_path / "a.png", _pattern())
    code, _, err = _segment(
        [str(image), instruction, "--model", str(random_model_dir), "--out-dir", str(tmp_path)],
        capsys,
    )
    assert code == 2
    line = _assert_one_line_error(err)
    assert words in line and line.endswith("(instruction)")


def test_unknown_model_lists_choices(
    tmp_path: Path, write_image, capsys: pytest.CaptureFixture[str]
) -> None:
    image = write_image(tmp_path / "a.png", _pattern())
    code, _, err = _segment(
        [str(image), "x", "--model", "nope", "--out-dir", str(tmp_path)], capsys
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    assert "nope" in lines[0] and "tiny" in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line_error(
    random_model_dir: Path, tmp_path: Path, write_image, capsys: pytest.CaptureFixture[str]
) -> None:
    from segapp.errors import InputError
    from segapp.service import Service, ServiceConfig

    image = write_image(tmp_path / "a.png", _pattern())
    args = [str(image), "x", "--model", str(random_model_dir), "--device", "cuda"]
    code, _, err = _segment(args + ["--out-dir", str(tmp_path)], capsys)
    assert code == 2
    line = _assert_one_line_error(err)
    assert "CUDA" in line and line.endswith("(--device)")
    # the service resolves its device by the same rule (no silent fall-back to the CPU)
    service = Service(ServiceConfig(model=str(random_model_dir), device="cuda"))
    with pytest.raises(InputError, match="no CUDA device"):
        service.segment(_pattern(), "x")


def test_unknown_model_error_names_where(
    tmp_path: Path, write_image, capsys: pytest.CaptureFixture[str]
) -> None:
    image = write_image(tmp_path / "a.png", _pattern())
    _, _, err = _segment([str(image), "x", "--model", "nope", "--out-dir", str(tmp_path)], capsys)
    _assert_one_line_error(err)


def _exif_rotated(path: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(_pattern(20, 40)).save(path, exif=exif.tobytes())  # stored 40 wide x 20 high
    return path


# name -> (writer, displayed (W, H))
ODD_IMAGES = {
    "gray": (lambda p, w: w(p.with_suffix(".png"), _pattern()[:, :, 0]), (32, 24)),
    "rgba": (
        lambda p, w: w(
            p.with_suffix(".png"),
            np.dstack([_pattern(), np.full((24, 32), 128, np.uint8)]),
        ),
        (32, 24),
    ),
    "png16": (
        lambda p, w: w(
            p.with_suffix(".png"),
            Image.fromarray(np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 80),
        ),
        (32, 24),
    ),
    "exif_jpeg": (lambda p, w: _exif_rotated(p.with_suffix(".jpg")), (20, 40)),
}


@pytest.mark.parametrize("case", sorted(ODD_IMAGES))
def test_odd_images_give_overlay_at_displayed_size(
    case: str, random_model_dir: Path, tmp_path: Path, write_image, capsys
) -> None:
    writer, displayed = ODD_IMAGES[case]
    path = writer(tmp_path / case, write_image)
    out = tmp_path / "out"
    code, stdout, err = _segment(
        [str(path), "find the circle", "--model", str(random_model_dir), "--out-dir", str(out)],
        capsys,
    )
    assert code == 0, err
    assert stdout.startswith("answer: ")
    with Image.open(out / f"{case}_overlay.png") as im:
        assert im.size == displayed
    for mask_file in out.glob(f"{case}_mask_*.png"):
        with Image.open(mask_file) as im:
            assert im.size == displayed


def test_json_output(random_model_dir: Path, tmp_path: Path, write_image, capsys) -> None:
    image = write_image(tmp_path / "scene.png", _pattern(30, 50))
    code, stdout, err = _segment(
        [
            str(image),
            "find the circle",
            "--model",
            str(random_model_dir),
            "--out-dir",
            str(tmp_path / "o"),
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert set(record) == {"image", "instruction", "answer", "masks"}
    assert record["image"] == str(image) and record["instruction"] == "find the circle"
    assert isinstance(record["answer"], str)
    for m in record["masks"]:
        assert set(m) == {"label", "score", "bbox", "area", "rle", "polygons"}
        assert m["rle"]["size"] == [30, 50]


def test_real_process_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "segapp.cli", "segment", str(missing), "x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: no such file ({missing})"]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize(
    ("flag", "model", "threshold", "message"),
    [
        ("--no-target-threshold", "tiny", "1.5", "--no-target-threshold must be in"),
        ("--no-target-threshold", "random", "0.3", "names no no_target_openings"),
        ("--target-threshold", "tiny", "0", "--target-threshold must be in"),
        ("--target-threshold", "random", "0.5", "has no target head"),
    ],
)
def test_bad_eval_threshold_is_one_line_exit_2(
    random_model_dir: Path, flag: str, model: str, threshold: str, message: str, capsys
) -> None:
    model_arg = str(random_model_dir) if model == "random" else model
    argv = ["eval", "reason", "--model", model_arg, "--limit", "1", "--quiet"]
    code = run([*argv, flag, threshold])
    line = _assert_one_line_error(capsys.readouterr().err)
    assert code == 2 and message in line
