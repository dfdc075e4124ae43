"""The ``dataset.json`` manifest of a shard directory: its format, reading and validation.

``tools/build_shards.py`` (:mod:`igpt_ds.data.shards`) writes it last, atomically, beside the shards:

    format, version         "igpt-ds-shards", 1
    palette_sha256          the palette the tokens index (:func:`igpt_ds.palette.palette_sha256`)
    palette                 that palette itself, [[r, g, b], ...] (K rows in [-1, 1]; last in the file).
                            Each number is the float32 value written as the float64 it equals
                            exactly (Python's shortest round-trip repr), so reading it back as float32
                            is bit-exact and hashes to palette_sha256. Optional: manifests written
                            before it existed load, and then carry no palette
    num_colors, resolution, seq_len, token_encoding
    shards                  [{name, samples, bytes, sha256}], plain file names in the manifest's directory
    num_samples             the sum of the shards' samples
    label_names, has_labels, num_images, skipped, source, build (settings, creation time)

Readers (:mod:`igpt_ds.data.tokens`, fine-tuning, feature extraction) go through
:func:`read_manifest`, which refuses a malformed file or a shard name that would point elsewhere,
and :func:`check_manifest`, which refuses shards of another palette or resolution than the run's.
Every error names the file and the fix.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from igpt_ds.config import NUM_COLORS

MANIFEST_NAME = "dataset.json"
FORMAT_NAME = "igpt-ds-shards"
FORMAT_VERSION = 1
TOKENS_EXT = "tokens"
LABEL_EXT = "cls"
_SAFE_SHARD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class ShardError(ValueError):
    """A shard or manifest that cannot be used as it is. The message names the file and the fix."""


@dataclass(frozen=True)
class ShardRecord:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A validated ``dataset.json``: shard names are plain file names inside ``directory``."""

    path: str
    directory: str
    resolution: int
    palette_sha256: str
    num_colors: int
    shards: tuple[ShardRecord, ...]
    num_samples: int
    label_names: tuple[str, ...]
    data: dict
    palette: Optional[np.ndarray] = field(default=None, compare=False, repr=False)  # None: an older manifest
    views: int = 1
    """Pre-quantized views per sample (``--views K``): its ``.tokens`` hold K x seq_len tokens, view-major."""

    @property
    def seq_len(self) -> int:
        return self.resolution * self.resolution

    def shard_paths(self) -> list[str]:
        return [os.path.join(self.directory, s.name) for s in self.shards]


def check_shard_name(name: Any, manifest_path: str) -> str:
    """Refuse a shard name that is not a plain file name (no path, no URL, no ``pipe:``)."""
    if (not isinstance(name, str) or not _SAFE_SHARD_NAME.match(name) or ".." in name
            or name.lower().startswith("pipe")):
        raise ShardError(f"{manifest_path}: shard name {name!r} is not a plain file name in the "
                         f"manifest's directory (no '/', '..', URLs or 'pipe:'); a manifest cannot "
                         f"point elsewhere. Put the shards beside it, or pass their URLs to the "
                         f"loader yourself")
    return name


def read_manifest(path: str) -> Manifest:
    """Read and validate ``dataset.json`` (``path`` is the file or the directory holding it)."""
    path = os.fspath(path)
    file = os.path.join(path, MANIFEST_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: no shard manifest; build shards with "
                                f"`python tools/build_shards.py --data DATA --out {os.path.dirname(file) or '.'}`")
    try:
        with open(file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ShardError(f"{file}: not valid JSON ({e}); rebuild it with tools/build_shards.py") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        found = data.get("format") if isinstance(data, dict) else None
        raise ShardError(f"{file}: not an {FORMAT_NAME} manifest (format={found!r})")
    if data.get("version") != FORMAT_VERSION:
        raise ShardError(f"{file}: manifest version {data.get('version')!r}, this code reads "
                         f"version {FORMAT_VERSION}; rebuild the shards with this version's tools/build_shards.py")
    try:
        shards = tuple(ShardRecord(check_shard_name(s["name"], file), int(s["samples"]), int(s["bytes"]),
                                   str(s["sha256"])) for s in data["shards"])
        manifest = Manifest(path=file, directory=os.path.dirname(os.path.abspath(file)),
                            resolution=int(data["resolution"]), palette_sha256=str(data["palette_sha256"]),
                            num_colors=int(data.get("num_colors", NUM_COLORS)), shards=shards,
                            num_samples=int(data["num_samples"]),
                            label_names=tuple(data.get("label_names", [])), data=data,
                            views=int(data.get("views", 1)))
    except (KeyError, TypeError) as e:
        raise ShardError(f"{file}: manifest field missing or malformed ({e!r}); rebuild it with "
                         f"tools/build_shards.py") from None
    if data.get("palette") is not None:
        manifest = dataclasses.replace(manifest, palette=_read_palette(data["palette"], manifest))
    if manifest.views < 1:
        raise ShardError(f"{file}: field 'views' is {manifest.views}; it must be >= 1 (views per sample)")
    if sum(s.samples for s in shards) != manifest.num_samples:
        raise ShardError(f"{file}: num_samples={manifest.num_samples} but the shards hold "
                         f"{sum(s.samples for s in shards)}; the manifest is inconsistent, rebuild it")
    return manifest


def palette_to_json(palette: np.ndarray) -> list:
    """The manifest's ``palette`` field: float32 rows as the float64 numbers they equal exactly."""
    return np.asarray(palette, dtype=np.float32).astype(np.float64).tolist()


def _read_palette(value: Any, manifest: Manifest) -> np.ndarray:
    """The ``palette`` field as float32 (K, 3), refused unless it hashes to ``palette_sha256``."""
    from igpt_ds.palette import check_palette, palette_sha256  # palette imports torch: only when needed

    where = f"{manifest.path}: field 'palette'"
    try:
        palette = check_palette(np.asarray(value, dtype=np.float64), where, manifest.num_colors)
    except (TypeError, ValueError) as e:
        raise ShardError(f"{e}; rebuild the manifest with tools/build_shards.py") from None
    if palette_sha256(palette) != manifest.palette_sha256:
        raise ShardError(f"{where} hashes to sha256 {palette_sha256(palette)[:16]}..., but the manifest's "
                         f"palette_sha256 is {manifest.palette_sha256[:16]}...: the file was edited or damaged. "
                         f"Rebuild the shards with tools/build_shards.py (or delete the 'palette' field to "
                         f"pass the palette by --palette)")
    return palette


def check_manifest(manifest: Manifest, expected_palette_sha256: Optional[str] = None,
                   expected_resolution: Optional[int] = None) -> None:
    """Refuse shards made with another palette or at another resolution than the run expects."""
    if expected_palette_sha256 is not None and manifest.palette_sha256 != expected_palette_sha256:
        raise ShardError(
            f"{manifest.path}: shards were quantized with palette sha256 {manifest.palette_sha256[:16]}..., "
            f"the run expects {expected_palette_sha256[:16]}...: tokens from another palette are other "
            f"colours. Rebuild the shards with the run's palette (tools/build_shards.py --palette), "
            f"or run with the palette these shards were built with")
    if expected_resolution is not None and manifest.resolution != expected_resolution:
        raise ShardError(
            f"{manifest.path}: shards are at resolution {manifest.resolution} "
            f"({manifest.seq_len} tokens), the run expects {expected_resolution}: rebuild the shards "
            f"with --resolution {expected_resolution}, or set the model's resolution to {manifest.resolution}")


def is_shard_dir(path) -> bool:
    """A directory of shards with their ``dataset.json`` (or the manifest's own path)."""
    return os.path.isfile(os.path.join(path, MANIFEST_NAME)) or os.path.basename(path) == MANIFEST_NAME
