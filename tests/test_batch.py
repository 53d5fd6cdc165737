"""`storydiffusion batch`: inputs, the split across processes, the merged manifest, and resume after a
process dies midway -- in one process (fast) and under `accelerate launch` with two CPU processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import run_cli
from PIL import Image

from storydiffusion.app.batch import (
    BATCH_MANIFEST,
    EXIT_AFTER_CODE,
    EXIT_AFTER_ENV,
    RUNS_FILE,
    _exit_after,
    _record_run,
    assign_stories,
    collect_stories,
    read_runs,
    story_csa_config,
)
from storydiffusion.app.runner import TINY_RANDOM, RunOptions, run_settings
from storydiffusion.csa.attention import CSAConfig
from storydiffusion.errors import StoryDiffusionError
from storydiffusion.files import PARTIAL_SUFFIX
from storydiffusion.pipelines.story_pipeline import StoryPipeline
from storydiffusion.pipelines.tiny_random import tiny_sd_pipeline
from storydiffusion.story.format import StorySettings

STORIES = {  # tiny-world prompts; id_length 2, so each story's first two frames are its references
    "anna": ("[Ann] a woman", ["[Ann] in the snow", "[Ann] on the beach", "[Ann] running in the park", "[Ann] waving"]),
    "bob": ("[Bob] a boy", ["[Bob] in the snow", "[Bob] on the beach", "[Bob] sitting in the park", "[Bob] waving"]),
    "cleo": ("[Cleo] a girl", ["[Cleo] in the city", "[Cleo] on the beach", "[Cleo] jumping in the snow"]),
}
ID_LENGTH = 2
FAST = ["--model", "tiny", "--device", "cpu", "--steps", "2"]


def write_stories(folder: Path, names=tuple(STORIES)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        character, frames = STORIES[name]
        tag, description = character[1:].split("] ")
        lines = [f"characters:\n  {tag}: {description}", "frames:", *[f'  - "{f}"' for f in frames]]
        (folder / f"{name}.yaml").write_text("\n".join(lines) + f"\nid_length: {ID_LENGTH}\nseed: 1\n")
    return folder


def panel_files(out: Path) -> dict[str, list[Path]]:
    return {name: sorted((out / name).glob("panel_*.png")) for name in STORIES if (out / name).is_dir()}


def mtimes(out: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for paths in panel_files(out).values() for path in paths}


def check_complete(out: Path, names=tuple(STORIES)) -> dict:
    """Every panel of every story exactly once, in its manifest, and a complete merged manifest."""
    merged = json.loads((out / BATCH_MANIFEST).read_text())
    assert merged["complete"] and merged["done"] == merged["panels"] == sum(len(STORIES[n][1]) for n in names)
    for name in names:
        count = len(STORIES[name][1])
        assert [p.name for p in panel_files(out)[name]] == [f"panel_{i:03d}.png" for i in range(count)]
        manifest = json.loads((out / name / "manifest.json").read_text())
        assert sorted(manifest["panels"], key=int) == [str(i) for i in range(count)]
        assert merged["stories"][name]["complete"] and merged["stories"][name]["done"] == count
    return merged


# -- pure parts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("processes", [1, 2, 3, 8])
def test_assign_stories_gives_each_story_to_exactly_one_process_and_balances_frames(processes):
    sizes = [5, 10, 7, 5, 5, 8, 6, 5, 5, 7, 5, 10]
    shares = assign_stories(sizes, processes)
    assert len(shares) == processes
    assert sorted(i for share in shares for i in share) == list(range(len(sizes)))
    assert all(share == sorted(share) for share in shares)
    loads = [sum(sizes[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(sizes)  # longest first onto the least loaded
    assert assign_stories(sizes, processes) == shares  # every process computes the same split


def test_collect_stories_reads_files_folders_and_prompt_sets(tmp_path):
    folder = write_stories(tmp_path / "stories")
    (folder / "notes.txt").write_text("not a story")
    prompt_set = tmp_path / "set.yaml"
    prompt_set.write_text(
        "animals:\n- concept_token: dog\n  subject: a dog\n  style: A photo of\n"
        "  settings: [running, sleeping, eating]\n"
    )
    stories = collect_stories([folder, prompt_set, "consistory+"], {"steps": 3, "id_length": 2}, limit=6)
    assert [s.name for s in stories] == [
        "anna", "bob", "cleo", "animals_000_dog", "animals_000_phoenix", "animals_001_zebra",
    ]  # fmt: skip
    assert all(s.story.settings.steps == 3 and s.story.settings.id_length == 2 for s in stories)
    assert stories[3].story.panels[0].prompt == "A photo of a dog running"
    assert stories[3].source.startswith(f"{prompt_set}:2 ")

    with pytest.raises(StoryDiffusionError, match="would both be drawn into the folder 'anna'"):
        collect_stories([folder, folder / "anna.yaml"])
    with pytest.raises(StoryDiffusionError, match="no such file or folder"):
        collect_stories([tmp_path / "missing.yaml"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoryDiffusionError, match="holds no story files"):
        collect_stories([tmp_path / "empty"])


def test_each_story_brings_its_own_csa_settings_onto_the_batch_ones():
    config = story_csa_config(CSAConfig(rate=0.5, subject_only=True), StorySettings(rate=0.25))
    assert config.rate == 0.25 and config.subject_only  # the story's rate, the batch's (bench arm's) masks


def test_a_run_records_the_device_it_computes_on_and_that_devices_peak_memory(monkeypatch, tmp_path):
    """Under `--cpu-offload` the weights wait on the CPU (`pipe.device`) while every step runs on the GPU
    (`pipe._execution_device`). Stand-in without a GPU: a pipeline whose execution device is cuda:1."""
    pipe = tiny_sd_pipeline(seed=0)
    gpu = torch.device("cuda", 1)
    monkeypatch.setattr(type(pipe), "_execution_device", property(lambda self: gpu))
    peaks = {gpu: 123_456_789, torch.device("cuda", 0): 1}  # what torch.cuda would report per device
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peaks[torch.device(device)])
    story_pipe = StoryPipeline(pipe)
    assert story_pipe.device.type == "cpu"  # where the weights sit: not where the run computed

    state = SimpleNamespace(process_index=0, num_processes=1)
    _record_run(tmp_path, [0, 1], [], 2.5, story_pipe, state, RunOptions(model=TINY_RANDOM))
    run = read_runs(tmp_path)[0]
    assert run["device"] == "cuda:1" and run["peak_mem_bytes"] == 123_456_789
    story = collect_stories([write_stories(tmp_path / "stories", ("anna",))])[0].story
    assert run_settings(story, TINY_RANDOM, RunOptions(model=TINY_RANDOM), (), story_pipe)["device"] == "cuda"


def test_the_exit_hook_is_read_for_its_process_only(monkeypatch):
    monkeypatch.setenv(EXIT_AFTER_ENV, "1:3")
    assert _exit_after(1) == 3 and _exit_after(0) is None
    monkeypatch.setenv(EXIT_AFTER_ENV, "three")
    with pytest.raises(StoryDiffusionError, match="PROCESS:PANELS"):
        _exit_after(0)


# -- one process ---------------------------------------------------------------------------------
def test_one_process_batch_resumes_a_lost_panel_without_redrawing_the_rest(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    stories = write_stories(tmp_path / "stories", ("anna", "cleo"))
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(monkeypatch, capsys, "batch", stories, "--out", out, *FAST)
    assert code == 0, stderr
    assert "2 stories, 7/7 panels" in stdout and "process 0/1: 2 stories, 7 panels generated" in stderr
    check_complete(out, ("anna", "cleo"))
    first = {path: np.asarray(Image.open(path)) for path in mtimes(out)}

    # simulate work lost by a process that died: one frame-phase panel and its manifest entry gone
    lost = out / "anna" / "panel_003.png"
    lost.unlink()
    manifest = json.loads((out / "anna" / "manifest.json").read_text())
    del manifest["panels"]["3"]
    (out / "anna" / "manifest.json").write_text(json.dumps(manifest))
    before = mtimes(out)

    code, stdout, stderr = run_cli(monkeypatch, capsys, "batch", stories, "--out", out, *FAST)
    assert code == 0, stderr
    assert "1 panels generated, 6 already there" in stderr
    check_complete(out, ("anna", "cleo"))
    after = mtimes(out)
    assert {path: after[path] for path in before} == before  # nothing that was complete was drawn again
    assert np.array_equal(np.asarray(Image.open(lost)), first[lost])  # the lost panel, exactly as before
    runs = json.loads((out / "anna" / RUNS_FILE).read_text())
    assert [run["generated"] for run in runs] == [4, 1] and all(run["seconds"] > 0 for run in runs)


# -- two processes -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two(stories: Path, out: Path, env_extra: dict) -> subprocess.CompletedProcess:
    """`accelerate launch` with two CPU processes (torchrun under --multi_gpu; gloo between them)."""
    env = {key: value for key, value in os.environ.items() if key != EXIT_AFTER_ENV}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env_extra})
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        "-m", "storydiffusion.app.cli", "batch", str(stories), "--out", str(out), *FAST,
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def test_two_processes_split_the_stories_and_resume_after_one_dies(tmp_path):
    """~40 s on a 2-core CPU: two `accelerate launch` runs of two processes each."""
    stories = write_stories(tmp_path / "stories")
    out = tmp_path / "out"
    # split: anna (4) -> process 0, bob (4) -> process 1, cleo (3) -> process 0; process 1 dies right after
    # its third panel: bob's references and one frame are on disk, its fourth frame is not
    assert assign_stories([4, 4, 3], 2) == [[0, 2], [1]]
    crashed = launch_two(stories, out, {EXIT_AFTER_ENV: "1:3"})
    assert crashed.returncode != 0 and f"exitcode  : {EXIT_AFTER_CODE}" in crashed.stderr, crashed.stderr[-3000:]
    panels = panel_files(out)
    assert len(panels["bob"]) == 3
    assert not list(out.rglob(f"*{PARTIAL_SUFFIX}"))  # writes are atomic: no temporary file left (`.NAME.partial`)
    before = mtimes(out)
    pixels = {path: np.asarray(Image.open(path)) for path in before}
    complete_refs = {  # stories whose references were all on disk: none of their panels may be drawn again
        name for name, paths in panels.items() if all((out / name / f"panel_{i:03d}.png") in paths for i in range(2))
    }

    resumed = launch_two(stories, out, {})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "process 0/2:" in resumed.stderr and "process 1/2:" in resumed.stderr
    assert "3 stories, 11/11 panels" in resumed.stdout
    merged = check_complete(out)
    assert [merged["stories"][name]["process"] for name in ("anna", "bob", "cleo")] == [0, 1, 0]
    after = mtimes(out)
    for path, stamp in before.items():
        story, index = path.parent.name, int(path.stem.split("_")[1])
        if story in complete_refs or index >= ID_LENGTH:
            assert after[path] == stamp, f"{path} was complete and was drawn again"
        assert np.array_equal(np.asarray(Image.open(path)), pixels[path])  # a redrawn reference: same pixels
    assert "bob" in complete_refs and after[out / "bob" / "panel_003.png"] > max(before.values())
    for name in STORIES:  # each story drawn by its own process only
        assert {run["process"] for run in read_runs(out / name)} <= {merged["stories"][name]["process"]}
