"""Reading stored tensors and loading them into a built model, strictly.

A checkpoint is one file or a sharded set with an index (`*.index.json`, whose `weight_map` says
which file holds each tensor), as safetensors or as PyTorch pickles (`.bin` / `.pth`, read with
`torch.load(weights_only=True)`: tensors only, no code). Names are translated by a `Rename`
(stored name -> model name, or None for a stored tensor that is known and deliberately dropped).

Strictness: every model parameter must come from exactly one stored tensor of the right shape,
and every stored tensor must map somewhere (or be a known drop). Names, files and shapes are all
checked before a single value is copied (safetensors headers are read alone; zip pickles are
opened memory-mapped, so only their metadata is read); a failure raises `ModelError` naming the
first offending parameter, and the model being filled is never handed out.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from segapp.errors import ModelError

# stored name -> model name (None: a known tensor that is dropped on purpose)
Rename = Callable[[str], "str | None"]

# single-file and index names, in the order they are looked for
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class StoredTensors:
    """Where each stored tensor of a checkpoint lives: name -> file (index order kept)."""

    where: str  # directory or file, for error messages
    weight_map: dict[str, Path]

    @property
    def files(self) -> list[Path]:
        return list(dict.fromkeys(self.weight_map.values()))


def is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one file (safetensors, or a pickle read with weights_only=True)."""
    try:
        if is_safetensors(path):
            return load_file(str(path))
        try:  # zip-format pickles can be memory-mapped: nothing is read until used
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) pickle
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is an unreadable file
        raise ModelError(
            f"unreadable checkpoint file: {type(exc).__name__}: {exc}", str(path)
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # some trainers wrap the tensors
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError("checkpoint file does not hold a flat name -> tensor mapping", str(path))
    return state


def stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in one file, without reading the values where possible."""
    if is_safetensors(path):
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"unreadable checkpoint file: {exc}", str(path)) from None
    return {k: tuple(v.shape) for k, v in read_tensors(path).items()}


def index_checkpoint(directory: Path) -> StoredTensors:
    """The tensors of the checkpoint in `directory` (sharded with an index, or one file).

    A shard the index names but the directory lacks is an error naming the first parameter it
    was to hold.
    """
    for name in INDEX_FILES:
        index = directory / name
        if not index.is_file():
            continue
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelError(f"unreadable {name}: {exc}", str(directory)) from None
        mapping = {key: directory / str(file) for key, file in weight_map.items()}
        for key, file in mapping.items():
            if not file.is_file():
                raise ModelError(
                    f"missing shard {file.name} (it holds parameter {key}, among others)",
                    str(directory),
                )
        return StoredTensors(str(directory), mapping)
    for name in SINGLE_FILES:
        path = directory / name
        if path.is_file():
            return single_file(path)
    wanted = ", ".join((*INDEX_FILES, *SINGLE_FILES))
    raise ModelError(f"no checkpoint found (looked for {wanted})", str(directory))


def single_file(path: Path) -> StoredTensors:
    """A one-file checkpoint (e.g. segment-anything's sam_vit_h_4b8939.pth)."""
    if not path.is_file():
        raise ModelError("checkpoint file not found", str(path))
    return StoredTensors(str(path), {key: path for key in stored_shapes(path)})


@dataclass
class Source:
    """Stored tensors plus the rename that takes their names into the model's."""

    stored: StoredTensors
    rename: Rename
    targets: dict[str, str] = field(default_factory=dict)  # stored name -> model name

    def plan(self, expected: dict[str, torch.Tensor]) -> None:
        for key in self.stored.weight_map:
            target = self.rename(key)
            if target is None:
                continue
            if target not in expected:
                raise ModelError(f"unexpected parameter {key} in checkpoint", self.stored.where)
            self.targets[key] = target


def expected_tensors(
    model: torch.nn.Module, *, skip: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """The model's persistent tensors by name (tied duplicates listed in `skip` left out)."""
    state = model.state_dict(keep_vars=True)
    for key in skip:
        state.pop(key, None)
    return {k: v.data for k, v in state.items()}


def load_strict(
    model: torch.nn.Module,
    sources: list[Source],
    *,
    skip: Iterable[str] = (),
    describe: Callable[[str], str] = lambda key: key,
    grow_rows: Iterable[str] = (),
) -> None:
    """Fill every persistent tensor of `model` from `sources`, or raise naming what is wrong.

    Order of checks: unexpected names, then missing parameters (first in the model's own order;
    `describe` turns a model name into the stored name a user would look for), then shapes.
    `grow_rows` names tensors (token embeddings, LM head) whose model copy may have more rows
    than the stored one (tokens added since): the stored rows fill the leading rows and each new
    row is set to the mean of the stored ones.
    """
    grow = set(grow_rows)
    expected = expected_tensors(model, skip=skip)
    provider: dict[str, tuple[Source, str]] = {}
    for source in sources:
        source.plan(expected)
        for key, target in source.targets.items():
            if target in provider:
                raise ModelError(
                    f"parameter {describe(target)} is stored twice ({provider[target][1]}, {key})",
                    source.stored.where,
                )
            provider[target] = (source, key)
    for target in expected:
        if target not in provider:
            where = sources[0].stored.where if sources else "checkpoint"
            raise ModelError(f"checkpoint is missing parameter {describe(target)}", where)
    # every file's names and shapes before any copy (safetensors headers; pickles memory-mapped)
    for source in sources:
        for path in source.stored.files:
            _check_file(source, path, stored_shapes(path), expected, grow)
    with torch.no_grad():
        for source in sources:
            for path in source.stored.files:
                tensors = read_tensors(path)
                for key, value in tensors.items():
                    name = source.targets.get(key)
                    if name is None:
                        continue
                    dest = expected[name]
                    if name in grow and value.shape[0] < dest.shape[0]:
                        dest[: value.shape[0]].copy_(value)
                        dest[value.shape[0] :] = value.float().mean(0).to(dest.dtype)
                    else:
                        dest.copy_(value)
                del tensors


def _check_file(
    source: Source,
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    expected: dict[str, torch.Tensor],
    grow: Collection[str] = (),
) -> None:
    """The file holds what the index says it holds, each with the model's shape."""
    weight_map, where = source.stored.weight_map, source.stored.where
    for key, file in weight_map.items():
        if file == path and key not in shapes:
            raise ModelError(f"checkpoint is missing parameter {key} (not in {path.name})", where)
    for key, shape in shapes.items():
        if weight_map.get(key) != path:
            if source.rename(key) is None:
                continue
            raise ModelError(f"unexpected parameter {key} in {path.name} (not in the index)", where)
        target = source.targets.get(key)
        if target is None:
            continue
        want = tuple(expected[target].shape)
        if target in grow and shape[1:] == want[1:] and 0 < shape[0] <= want[0]:
            continue
        if shape != want:
            raise ModelError(f"parameter {key} has shape {shape}, expected {want}", where)
