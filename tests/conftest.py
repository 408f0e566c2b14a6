"""Shared fixtures: a randomly initialised tiny model saved as a real weights directory."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may reach a weights hub

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from segapp.build import build_segllm, save_bundle  # noqa: E402
from segapp.config import MODEL_PRESETS  # noqa: E402
from segapp.data.instructions import iter_corpus  # noqa: E402
from segapp.tokenizer import train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """Byte-level BPE trained on a small slice of the synthetic corpus."""
    return train_tokenizer(iter_corpus(20), 1024)


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A weights directory (config.json, model.safetensors, tokenizer.json) of a random tiny model."""
    out = tmp_path_factory.mktemp("random_tiny")
    torch.manual_seed(0)
    model = build_segllm(MODEL_PRESETS["tiny"], tokenizer)
    save_bundle(model, tokenizer, MODEL_PRESETS["tiny"], out)
    return out


def _write_image(path: Path, pixels: np.ndarray | Image.Image, **save_kwargs: Any) -> Path:
    """Write an array (or PIL image) to `path` with PIL; the format follows the suffix."""
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_kwargs)
    return path


@pytest.fixture
def write_image() -> Callable[..., Path]:
    return _write_image
