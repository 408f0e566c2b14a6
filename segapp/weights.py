"""`segapp weights`: what is installed under weights/ (sizes, sha256) and fetching published ones.

Fetching uses huggingface_hub where a network exists. segapp itself never downloads at run
time: the CLI sets HF_HUB_OFFLINE=1 unless the caller set it, and `fetch` refuses while it is on,
so a download only ever happens on an explicit `HF_HUB_OFFLINE=0 segapp weights fetch NAME`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from segapp.config import AUXILIARY_WEIGHTS, CHECKPOINT_PRESETS
from segapp.errors import InputError, ModelError

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
SAM_CHECKPOINTS = {  # published segment-anything files (not on the Hugging Face hub)
    "sam_vit_h_4b8939.pth": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "sam_vit_l_0b3195.pth": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "sam_vit_b_01ec64.pth": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
}


@dataclass
class InstalledFile:
    path: str  # relative to the weights root
    size: int  # bytes
    sha256: str | None  # None when checksums were skipped


@dataclass
class Installed:
    """One entry of weights/: a model folder, a CLIP tower, a SAM .pth, ..."""

    name: str
    kind: str
    files: list[InstalledFile] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "size": self.size,
            "files": [vars(f) for f in self.files],
        }


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def kind_of(path: Path) -> str:
    """What a weights/ entry holds, from its files (never by loading it)."""
    if path.is_file():
        return "SAM checkpoint" if path.name.startswith("sam_") else "checkpoint file"
    config = path / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError):
            return "unreadable config.json"
        architectures = data.get("architectures") or []
        if "LISAForCausalLM" in architectures:
            return "LISA checkpoint"
        if data.get("model_type") in ("clip", "clip_vision_model"):
            return "CLIP vision tower"
        if "sam_variant" in data:
            return "segapp model"
        return f"unknown ({', '.join(architectures) or 'no architectures'})"
    if path.name == "adapters":
        return "personal adapters"
    return "folder"


def list_installed(root: Path, *, checksums: bool = True) -> list[Installed]:
    """Every model folder and checkpoint file directly under `root`, with its files."""
    if not root.is_dir():
        return []
    entries: list[Installed] = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or (path.is_file() and path.suffix not in CHECKPOINT_SUFFIXES):
            continue
        entry = Installed(path.name, kind_of(path))
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            digest = sha256_of(file) if checksums else None
            entry.files.append(
                InstalledFile(str(file.relative_to(root)), file.stat().st_size, digest)
            )
        entries.append(entry)
    return entries


def fetchable() -> dict[str, str]:
    """NAME -> Hugging Face repo id, for `segapp weights fetch NAME`."""
    return {
        **{name: p.hub_repo for name, p in CHECKPOINT_PRESETS.items()},
        **AUXILIARY_WEIGHTS,
    }


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def fetch(name: str, root: Path) -> Path:
    """Download NAME into root/NAME with huggingface_hub; fails fast (no network attempt) when
    offline or when huggingface_hub is missing."""
    sources = fetchable()
    if name in SAM_CHECKPOINTS:
        raise InputError(
            f"SAM checkpoints are not on the Hugging Face hub: download {SAM_CHECKPOINTS[name]} "
            f"into {root}/",
            "weights fetch",
        )
    if name not in sources:
        choices = ", ".join(sorted(sources))
        raise InputError(f"unknown weights {name!r}: use one of {choices}", "weights fetch")
    repo = sources[name]
    if hub_offline():
        raise ModelError(
            f"cannot fetch {name} ({repo}): HF_HUB_OFFLINE=1, no network here; set "
            f"HF_HUB_OFFLINE=0 where a network exists, or copy the files into {root / name}",
            "weights fetch",
        )
    if importlib.util.find_spec("huggingface_hub") is None:
        raise ModelError("fetching needs huggingface_hub: pip install huggingface_hub", name)
    from huggingface_hub import snapshot_download

    target = root / name
    target.mkdir(parents=True, exist_ok=True)
    try:
        snapshot_download(repo_id=repo, local_dir=str(target))
    except Exception as exc:  # noqa: BLE001 - network / hub errors become one line
        raise ModelError(f"download of {repo} failed: {type(exc).__name__}: {exc}", name) from None
    return target


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
