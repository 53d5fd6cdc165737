"""Recommended settings of a video model: `storydiffusion.json` in a TransitionPipeline's folder.

The same file name as an image model's (`pipelines.recommended`), with the transition's own keys:

    {
      "keyframe_tokens": "finished", "keyframe_strength": 4.0,
      "num_frames": 8, "steps": 20, "guidance": 1.0,
      "measured": "storydiffusion eval-video --clips 24 (2026-12-03)"
    }

`TransitionPipeline.from_pretrained` reads it; a call (and `storydiffusion video`, the web UI's video tab) takes
each setting from it wherever the caller gives none, and the pipeline's own defaults (`CALL_DEFAULTS`) where the
file is silent or absent. Every key is optional; an unknown key or a bad value is one error naming the file and
the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from storydiffusion.errors import StoryDiffusionError
from storydiffusion.pipelines.recommended import NOTE_KEYS, read_settings_file, write_settings_file
from storydiffusion.video.unet import keyframe_settings_problem

# a TransitionPipeline call's defaults where neither the caller nor the model's file sets a value
CALL_DEFAULTS = {"num_frames": 8, "steps": 25, "guidance": 1.0, "keyframe_tokens": "noisy", "keyframe_strength": 1.0}


@dataclass(frozen=True)
class VideoRecommendedSettings:
    """A video model's recommended settings; None fields: `CALL_DEFAULTS` apply."""

    keyframe_tokens: str | None = None  # "noisy" or "finished" (TransitionPipeline's keyframe_tokens)
    keyframe_strength: float | None = None
    num_frames: int | None = None
    steps: int | None = None
    guidance: float | None = None
    source: str = "<recommended>"

    @classmethod
    def from_dict(cls, data: Any, source: str = "<recommended>") -> VideoRecommendedSettings:
        """Checked: unknown keys and bad values are errors naming `source` and the key."""
        if not isinstance(data, Mapping):
            raise StoryDiffusionError(f"{source}: recommended settings are a JSON object, got {type(data).__name__}")
        for key in data:
            if key not in (*CALL_DEFAULTS, *NOTE_KEYS):
                allowed = ", ".join((*CALL_DEFAULTS, *NOTE_KEYS))
                raise StoryDiffusionError(f"{source}: unknown key {key!r} for a video model; allowed: {allowed}")
        values: dict[str, Any] = {}
        tokens, strength = data.get("keyframe_tokens"), data.get("keyframe_strength")
        problem = keyframe_settings_problem(tokens, strength)
        if problem:
            raise StoryDiffusionError(f"{source}: {problem}")
        if tokens is not None:
            values["keyframe_tokens"] = tokens
        if strength is not None:
            values["keyframe_strength"] = float(strength)
        guidance = data.get("guidance")
        if guidance is not None:
            number = not isinstance(guidance, bool) and isinstance(guidance, int | float) and guidance < float("inf")
            if not (number and guidance >= 0):
                raise StoryDiffusionError(f"{source}: 'guidance' must be a number >= 0 (1: off), got {guidance!r}")
            values["guidance"] = float(guidance)
        for key, least in (("num_frames", 2), ("steps", 1)):
            value = data.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise StoryDiffusionError(f"{source}: {key!r} must be a whole number >= {least}, got {value!r}")
            values[key] = value
        return cls(source=source, **values)

    def settings(self) -> dict[str, Any]:
        """The settings this file sets (CALL_DEFAULTS keys), without the ones it leaves to the defaults."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name in CALL_DEFAULTS}
        return {key: value for key, value in values.items() if value is not None}

    def to_dict(self) -> dict[str, Any]:
        return self.settings()


def read_video_recommended(model: str | Path | None) -> VideoRecommendedSettings | None:
    """The recommended settings of video model `model` (a folder, or a hub id in the local cache), or None."""
    found = read_settings_file(model)
    return None if found is None else VideoRecommendedSettings.from_dict(*found)


def write_video_recommended(folder: str | Path, settings: VideoRecommendedSettings, **notes: str) -> Path:
    """Write `settings` (and free-text `notes`, e.g. measured=...) as the folder's `storydiffusion.json`."""
    return write_settings_file(folder, settings.to_dict(), **notes)


def call_settings(recommended: VideoRecommendedSettings | None, **given: Any) -> dict[str, Any]:
    """Every CALL_DEFAULTS key: the caller's value where not None, else the model's recommended, else the default."""
    unknown = set(given) - set(CALL_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown transition settings {sorted(unknown)}")
    file = recommended.settings() if recommended is not None else {}
    return {
        key: given[key] if given.get(key) is not None else file.get(key, default)
        for key, default in CALL_DEFAULTS.items()
    }


__all__ = [
    "CALL_DEFAULTS",
    "VideoRecommendedSettings",
    "call_settings",
    "read_video_recommended",
    "write_video_recommended",
]
