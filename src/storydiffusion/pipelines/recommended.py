"""Recommended settings that travel with a model: `storydiffusion.json` in the model's folder (or hub repo).

A model folder may hold a small JSON file saying how StoryDiffusion draws best with it -- its CSA settings and
its generation defaults:

    {
      "csa": {"rate": 1.0, "layers": ["up_blocks.*"], "bank_from": "steps", "reference_noise": "step",
              "reference_strength": 1.0, "schedule": {"plain_fraction": 0.02, "stages": [[0.4, 0.7], [1.0, 0.9]]}},
      "steps": 20, "guidance": 4.0, "width": 64, "height": 64, "id_length": 2,
      "measured": "storydiffusion eval --json ... (2026-12-03)"
    }

`StoryPipeline.from_pretrained`, the command line, the web UI and `eval` (its `recommended` arm) apply it
wherever the user set nothing; a setting the user gives always wins. A model without the file keeps the
paper's defaults (`PAPER_DEFAULTS`, `CSAConfig()`). Every key is optional; an unknown key or a bad value is one
error naming the file and the key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storydiffusion.csa.attention import CSAConfig, CSASchedule
from storydiffusion.errors import StoryDiffusionError

RECOMMENDED_FILE = "storydiffusion.json"
# the generation defaults of a model without the file: the public StoryDiffusion code's
PAPER_DEFAULTS = {"steps": 50, "guidance": 5.0, "id_length": 3}
GENERATION_KEYS = ("steps", "guidance", "width", "height", "id_length")
CSA_KEYS = (
    "rate",
    "layers",
    "schedule",
    "bank_from",
    "reference_noise",
    "reference_strength",
    "subject_masks",
    "subject_only",
    "mask_dilation",
)
NOTE_KEYS = ("measured", "note")  # free text for people: how the settings were chosen


@dataclass(frozen=True)
class RecommendedSettings:
    """A model's recommended settings (`storydiffusion.json`); None fields: the paper's defaults apply."""

    csa: Mapping[str, Any] = field(default_factory=dict)  # CSAConfig fields (schedule as a mapping)
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    id_length: int | None = None
    source: str = "<recommended>"

    @classmethod
    def from_dict(cls, data: Any, source: str = "<recommended>") -> RecommendedSettings:
        """Checked: unknown keys, wrong types and values CSAConfig refuses are errors naming `source` and the key."""
        if not isinstance(data, Mapping):
            raise StoryDiffusionError(f"{source}: recommended settings are a JSON object, got {type(data).__name__}")
        for key in data:
            if key not in (*GENERATION_KEYS, "csa", *NOTE_KEYS):
                allowed = ", ".join((*GENERATION_KEYS, "csa", *NOTE_KEYS))
                raise StoryDiffusionError(f"{source}: unknown key {key!r}; allowed: {allowed}")
        csa = data.get("csa", {})
        if not isinstance(csa, Mapping):
            raise StoryDiffusionError(f"{source}: 'csa' is an object of CSA settings, got {csa!r}")
        for key in csa:
            if key not in CSA_KEYS:
                raise StoryDiffusionError(f"{source}: unknown key 'csa.{key}'; allowed: {', '.join(CSA_KEYS)}")
        generation = {}
        for key in GENERATION_KEYS:
            value = data.get(key)
            if value is None:
                continue
            kinds = (int, float) if key == "guidance" else (int,)
            if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
                kind = "a positive number" if key == "guidance" else "a positive whole number"
                raise StoryDiffusionError(f"{source}: {key!r} must be {kind}, got {value!r}")
            generation[key] = float(value) if key == "guidance" else int(value)
        settings = cls(csa=dict(csa), source=source, **generation)
        try:
            settings.csa_config()
        except (StoryDiffusionError, TypeError, ValueError) as error:
            raise StoryDiffusionError(f"{source}: 'csa': {error}") from None
        return settings

    def csa_config(self, **given: Any) -> CSAConfig:
        """The recommended CSAConfig, with `given` fields (the user's) over it."""
        fields = dict(self.csa)
        if isinstance(fields.get("schedule"), Mapping):
            schedule = dict(fields["schedule"])
            if "stages" in schedule:
                schedule["stages"] = tuple(tuple(stage) for stage in schedule["stages"])
            fields["schedule"] = CSASchedule(**schedule)
        if isinstance(fields.get("rate"), Mapping):
            fields["rate"] = {int(level): rate for level, rate in fields["rate"].items()}
        return CSAConfig(**{**fields, **given})

    def generation(self) -> dict[str, Any]:
        """The generation defaults this file sets (steps, guidance, width, height, id_length)."""
        return {key: getattr(self, key) for key in GENERATION_KEYS if getattr(self, key) is not None}

    def to_dict(self) -> dict[str, Any]:
        return {"csa": dict(self.csa), **self.generation()}


def read_recommended(model: str | Path | None) -> RecommendedSettings | None:
    """The recommended settings of `model` (a folder, or a hub id already in the local cache), or None.

    Never downloads: a hub model's file is read only when the hub cache holds it (it is fetched with the
    model's own files when the repo has one)."""
    found = read_settings_file(model)
    return None if found is None else RecommendedSettings.from_dict(*found)


def read_settings_file(model: str | Path | None) -> tuple[Any, str] | None:
    """(parsed JSON, path) of `model`'s `storydiffusion.json` -- image and video models alike -- or None.

    `model` is a folder or a hub id whose file the local hub cache already holds: this never downloads."""
    if model is None:
        return None
    folder = Path(str(model)).expanduser()
    path: Path | None = folder / RECOMMENDED_FILE if folder.is_dir() else None
    if path is None and "/" in str(model) and not folder.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(model), RECOMMENDED_FILE)
        except Exception:  # a malformed id: no cache entry
            cached = None
        path = Path(cached) if isinstance(cached, str) else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StoryDiffusionError(f"{path}: cannot read the model's recommended settings ({error})") from None


def write_recommended(folder: str | Path, settings: RecommendedSettings, **notes: str) -> Path:
    """Write `settings` (and free-text `notes`, e.g. measured=...) as the folder's `storydiffusion.json`."""
    return write_settings_file(folder, settings.to_dict(), **notes)


def write_settings_file(folder: str | Path, settings: Mapping[str, Any], **notes: str) -> Path:
    """`settings` and the NOTE_KEYS among `notes` as the folder's `storydiffusion.json` (image or video model)."""
    path = Path(folder) / RECOMMENDED_FILE
    data = {**settings, **{key: notes[key] for key in NOTE_KEYS if key in notes}}
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def csa_fields(config: CSAConfig) -> dict[str, Any]:
    """The CSA_KEYS fields of `config` as JSON values (for `write_recommended`)."""
    fields: dict[str, Any] = {}
    for key in CSA_KEYS:
        value = getattr(config, key)
        if isinstance(value, CSASchedule):
            value = {"plain_fraction": value.plain_fraction, "stages": [list(stage) for stage in value.stages]}
        elif isinstance(value, tuple):
            value = list(value)
        if value is not None:
            fields[key] = value
    return fields


__all__ = [
    "CSA_KEYS",
    "GENERATION_KEYS",
    "PAPER_DEFAULTS",
    "RECOMMENDED_FILE",
    "RecommendedSettings",
    "csa_fields",
    "read_recommended",
    "read_settings_file",
    "write_settings_file",
    "write_recommended",
]
