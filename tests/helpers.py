"""Helpers shared by the test modules (importable because pytest puts tests/ on sys.path)."""

import json
import sys
from pathlib import Path

import numpy as np

from storydiffusion.app import cli


def run_cli(monkeypatch, capsys, *args):
    """Call the real entry point with `args`; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["storydiffusion", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as stop:
        code = stop.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def world_story_folder(folder: Path, count: int, seed: int = 2) -> Path:
    """A story run's folder as `storydiffusion story` leaves it: `count` tiny-world beach panels and the manifest."""
    from storydiffusion.world import render as world

    rng = np.random.default_rng(seed)
    panels = {}
    for i in range(count):
        panel = world.sample_panel(rng, scene="beach")
        world.render_panel(panel).save(folder / f"panel_{i:02d}.png")
        panels[str(i)] = {"index": i, "file": f"panel_{i:02d}.png", "prompt": panel.caption, "caption": ""}
    (folder / "manifest.json").write_text(json.dumps({"format": "storydiffusion.run", "panels": panels}))
    return folder
