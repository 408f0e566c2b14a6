"""Concept store: ``<root>/<user>/<concept>/`` per fitted concept, written atomically.

A concept directory holds what its method needs (peft ``save_pretrained`` files and
``verifier.safetensors`` for "lora", ``persam.safetensors`` for "persam") plus ``concept.json`` (a ConceptInfo). Saving writes a
temporary sibling directory and renames it into place; the previous version is moved aside
first and removed last, and a lookup that finds only the moved-aside copy (a crash between the
two renames) puts it back. So a crash at any point leaves either the old or the new version.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segapp.errors import InputError

SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
METHODS = ("lora", "persam")
INFO_FILE = "concept.json"
_TMP, _OLD = ".tmp-", ".old-"


def validate_slug(value: Any, what: str = "name") -> str:
    """``value`` if it is a slug (lower-case letters, digits, '-' and '_', 1-48 characters,
    starting with a letter or digit); otherwise InputError. Slugs cannot escape a directory."""
    if not isinstance(value, str) or not SLUG.match(value):
        shown = repr(value) if isinstance(value, str) else type(value).__name__
        raise InputError(
            f"invalid {what} {shown}: use 1-48 characters of a-z, 0-9, '-' or '_', "
            "starting with a letter or digit",
            f"--{what}" if what in ("user", "name") else what,
        )
    return value


def concept_token(name: str) -> str:
    """How an instruction names a concept: ``<name>``."""
    return f"<{name}>"


def shot_hash(image: np.ndarray, mask: np.ndarray) -> str:
    """sha1 of one shot (pixels + mask), stored so a refit from the same shots is visible."""
    h = hashlib.sha1(np.ascontiguousarray(image).tobytes())
    h.update(np.ascontiguousarray(mask, dtype=bool).tobytes())
    return h.hexdigest()


@dataclass
class ConceptInfo:
    """Metadata of one fitted concept (concept.json)."""

    user: str
    name: str
    method: str  # "lora" or "persam"
    token: str = ""  # "<name>", how instructions refer to it
    shots: int = 0
    shot_hashes: list[str] = field(default_factory=list)
    base_model: str = ""  # preset / directory of the base model it was fitted on
    created: str = ""  # ISO 8601 UTC
    steps: int = 0
    fit_seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. IoU on the shots
    size_bytes: int = 0  # files on disk
    version: str = ""  # changes on every save (a refit is a new adapter to load)
    path: str = ""  # directory (not stored in concept.json)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConceptInfo:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class ConceptStore:
    """Per-user concepts under ``root``. Every method takes the user; there is no way to reach
    another user's directory (names are validated slugs)."""

    def __init__(self, root: Path | str | None = None) -> None:
        if root is None:
            from segapp.build import weights_root

            root = weights_root() / "adapters"
        self.root = Path(root)

    def user_dir(self, user: str) -> Path:
        return self.root / validate_slug(user, "user")

    def concept_dir(self, user: str, name: str) -> Path:
        return self.user_dir(user) / validate_slug(name, "name")

    def _recover(self, user: str, name: str) -> None:
        """Put back a version moved aside by a save that crashed before renaming the new one in."""
        final = self.concept_dir(user, name)
        if final.exists():
            return
        aside = sorted(self.user_dir(user).glob(f"{_OLD}{name}-*"))
        if aside:
            os.rename(aside[-1], final)

    def exists(self, user: str, name: str) -> bool:
        self._recover(user, name) if self.user_dir(user).is_dir() else None
        return (self.concept_dir(user, name) / INFO_FILE).is_file()

    def get(self, user: str, name: str) -> ConceptInfo:
        """The concept's info; InputError naming the user's concepts if it has no such one."""
        if not self.exists(user, name):
            have = ", ".join(c.name for c in self.list(user)) or "none"
            raise InputError(
                f"user {user!r} has no concept {concept_token(name)} (their concepts: {have}); "
                "fit one with `segapp personalize`",
                "concept",
            )
        directory = self.concept_dir(user, name)
        info = ConceptInfo.from_dict(json.loads((directory / INFO_FILE).read_text()))
        info.path = str(directory)
        return info

    def list(self, user: str) -> list[ConceptInfo]:
        """The user's concepts, sorted by name (an unknown user has none)."""
        base = self.user_dir(user)
        if not base.is_dir():
            return []
        for aside in base.glob(f"{_OLD}*"):
            name = aside.name[len(_OLD) :].rsplit("-", 1)[0]
            if SLUG.match(name):
                self._recover(user, name)
        out = []
        for entry in sorted(base.iterdir()):
            if not entry.name.startswith(".") and (entry / INFO_FILE).is_file():
                out.append(self.get(user, entry.name))
        return out

    def delete(self, user: str, name: str) -> None:
        self.get(user, name)  # InputError if unknown
        final = self.concept_dir(user, name)
        trash = final.with_name(f"{_TMP}{name}-{uuid.uuid4().hex[:8]}")
        os.rename(final, trash)  # atomic: the concept disappears at once
        shutil.rmtree(trash, ignore_errors=True)

    def save(self, info: ConceptInfo, write: Callable[[Path], None]) -> ConceptInfo:
        """Atomically (re)place a concept: ``write(tmp_dir)`` writes the method's files, then
        concept.json is added and the directory renamed into place. Returns the stored info."""
        final = self.concept_dir(info.user, info.name)
        final.parent.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        tmp = final.with_name(f"{_TMP}{info.name}-{tag}")
        tmp.mkdir()
        try:
            write(tmp)
            info.token = concept_token(info.name)
            info.version = tag
            info.size_bytes = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
            data = {k: v for k, v in info.to_dict().items() if k != "path"}
            (tmp / INFO_FILE).write_text(json.dumps(data, indent=2) + "\n")
            for f in tmp.rglob("*"):  # data on disk before the rename makes it visible
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            self._recover(info.user, info.name)
            aside = final.with_name(f"{_OLD}{info.name}-{tag}")
            if final.exists():
                os.rename(final, aside)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(aside, ignore_errors=True)
        info.path = str(final)
        return info
