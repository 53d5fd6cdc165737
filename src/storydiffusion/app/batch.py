"""Many stories, one or many processes: `storydiffusion batch INPUT... --out DIR`.

Inputs are story files, folders of them (their .yaml/.yml/.json files, in name order) and prompt-set files
such as ConsiStory+ (`story.prompt_sets`; `consistory+` names the shipped copy): every story goes into its
own folder `DIR/NAME/` (a story file's stem, a prompt-set entry's `category_index_token`) through the
resumable `runner.run_story`, which writes each panel and the story's manifest as soon as the panel is done.

Splitting across processes. The unit of work is one story: its reference frames are drawn together and
write the identity bank every later frame reads, so a story stays on one process. `accelerate launch
--num_processes N ...` starts N copies of the same command; each asks `accelerate.PartialState()` for its
index and takes its share from `assign_stories` (longest stories first, each onto the least-loaded
process), which every process computes alike from the inputs alone — nothing is sent between processes
until the end, and no story is ever drawn by two. Run without `accelerate launch` it is one process doing
everything.

Resuming. Re-running the same command into the same DIR resumes every story (`run_story` skips the panels
on disk and refuses changed settings); a process that died midway loses at most the panel in flight.
With another process count the split changes, which is harmless: a story's state lives in its folder.
A reference panel whose sibling references were lost is drawn again (same pixels): the reference phase
ties its images, and the bank is only reused when all of them are on disk.

The merged manifest `DIR/batch.json` is rebuilt from the stories' own manifests, never updated in place:
process 0 writes it (atomically) when it starts, after each of its stories, and once more after every
process is done (`wait_for_everyone`). A process that dies leaves the last complete copy; the next run
rewrites it from what the folders hold. Each story folder also gets `runs.json`: per run that drew
panels, the seconds its panels took and the peak memory (what `bench` reports).

Testing hook: `STORYDIFFUSION_BATCH_EXIT_AFTER=P:N` makes process P exit at once (exit code 75, no
clean-up, as a crash would) right after writing its N-th panel of the run; the tests kill a run midway
with it.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from storydiffusion.app.runner import (
    MANIFEST,
    Manifest,
    RunOptions,
    execution_device,
    load_story_pipeline,
    model_recommended,
    resolve_settings,
    run_settings,
    run_story,
)
from storydiffusion.csa.attention import CSAConfig
from storydiffusion.errors import StoryDiffusionError
from storydiffusion.files import write_atomically
from storydiffusion.pipelines.recommended import RecommendedSettings
from storydiffusion.pipelines.story_pipeline import StoryPipeline
from storydiffusion.story.format import STORY_SUFFIXES, Story, StorySettings
from storydiffusion.story.prompt_sets import PROMPT_SETS, is_prompt_set, read_prompt_set

BATCH_MANIFEST = "batch.json"
BATCH_FORMAT = "storydiffusion.batch"
RUNS_FILE = "runs.json"  # in each story folder: one record per run that drew panels
EXIT_AFTER_ENV = "STORYDIFFUSION_BATCH_EXIT_AFTER"  # testing hook "P:N", see the module docstring
EXIT_AFTER_CODE = 75
# The final barrier waits for the slowest process; the default (10 min on NCCL) is shorter than one SDXL
# story, so a fast process would be killed there while the others are still drawing.
BARRIER_TIMEOUT = timedelta(hours=12)
_NOT_INPUTS = (BATCH_MANIFEST, MANIFEST, RUNS_FILE)  # files a folder of stories may hold that are no stories


@dataclass(frozen=True)
class BatchStory:
    """One story of a batch and the folder (under the batch's DIR) it is drawn into."""

    name: str  # folder name, unique in the batch
    story: Story
    source: str  # where it came from, for messages and batch.json


@dataclass
class BatchResult:
    """What one process did (`manifest`: the merged manifest, on process 0 only)."""

    out: Path
    process_index: int
    num_processes: int
    stories: list[str]  # this process's stories
    generated: int  # panels this process drew in this run
    skipped: int  # panels of its stories already on disk
    manifest: dict[str, Any] | None = None


# -- inputs --------------------------------------------------------------------------------------
def collect_stories(
    inputs: Sequence[str | Path], overrides: Mapping[str, Any] | None = None, limit: int | None = None
) -> list[BatchStory]:
    """Every story of `inputs` (story files, folders of them, prompt-set files or names such as
    `consistory+`), in order, with `overrides` applied to each story's settings; the first `limit`."""
    if not inputs:
        raise StoryDiffusionError("give at least one INPUT: a story file, a folder of them, or a prompt set")
    stories: list[BatchStory] = []
    for given in inputs:
        stories.extend(_read_input(given, overrides or {}))
    if limit is not None:
        stories = stories[:limit]
    seen: dict[str, str] = {}
    for item in stories:
        if item.name in seen:
            raise StoryDiffusionError(
                f"{item.source} and {seen[item.name]} would both be drawn into the folder {item.name!r}; "
                "rename one of the files (a story's folder is its file name without the suffix)"
            )
        seen[item.name] = item.source
    return stories


def _read_input(given: str | Path, overrides: Mapping[str, Any]) -> list[BatchStory]:
    if str(given) in PROMPT_SETS:
        return _prompt_set_stories(PROMPT_SETS[str(given)], overrides)
    path = Path(given)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if _is_story_file(p))
        if not files:
            raise StoryDiffusionError(f"{path}/ holds no story files ({', '.join(STORY_SUFFIXES)})")
        return [item for file in files for item in _read_file(file, overrides)]
    if not path.exists():
        names = ", ".join(PROMPT_SETS)
        raise StoryDiffusionError(f"input {str(given)!r}: no such file or folder (or a prompt set name: {names})")
    return _read_file(path, overrides)


def _is_story_file(path: Path) -> bool:
    # hidden: an editor's backup, or the `.NAME.partial` (files.partial_path) of a write that was killed
    hidden = path.name.startswith(".")
    return path.is_file() and path.suffix.lower() in STORY_SUFFIXES and not hidden and path.name not in _NOT_INPUTS


def _read_file(path: Path, overrides: Mapping[str, Any]) -> list[BatchStory]:
    if path.suffix.lower() in (".yaml", ".yml", ".json") and _holds_prompt_set(path):
        return _prompt_set_stories(path, overrides)
    story = Story.from_file(path, overrides)  # raises StoryFormatError naming file, line and field
    return [BatchStory(path.stem, story, str(path))]


def _holds_prompt_set(path: Path) -> bool:
    """Whether the file parses as a prompt set; anything else (a story, or a broken file whose error the
    story reader explains) goes to `Story.from_file`."""
    try:
        return is_prompt_set(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False


def _prompt_set_stories(path: Path, overrides: Mapping[str, Any]) -> list[BatchStory]:
    settings = StorySettings(**overrides)
    return [
        BatchStory(entry.name, entry.to_story(settings), f"{entry.source}:{entry.line} {entry.category}[{entry.index}]")
        for entry in read_prompt_set(path)
    ]


# -- the split -----------------------------------------------------------------------------------
def assign_stories(sizes: Sequence[int], num_processes: int) -> list[list[int]]:
    """Story indices for each process: the longest story first, each onto the least-loaded process (ties:
    the lower index), each share in input order. Deterministic, so every process computes the same split."""
    if num_processes < 1:
        raise StoryDiffusionError(f"num_processes must be >= 1, got {num_processes}")
    loads = [0] * num_processes
    shares: list[list[int]] = [[] for _ in range(num_processes)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        process = min(range(num_processes), key=lambda p: (loads[p], p))
        shares[process].append(index)
        loads[process] += sizes[index]
    return [sorted(share) for share in shares]


def batch_state(device: str = "auto") -> Any:
    """This process's `accelerate.PartialState` (one process when not started by `accelerate launch`).

    Processes that draw on the CPU (`device` cpu, or no GPU) join through gloo: accelerate only finds a
    CPU process group when told `cpu=True`, and would otherwise let every process believe it is alone."""
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if state.num_processes != launched:  # two processes drawing the same stories would overwrite each other
        raise StoryDiffusionError(
            f"the launcher started {launched} processes but accelerate sees {state.num_processes}; "
            "launch with `accelerate launch --num_processes N` (on CPUs add --multi_gpu, which uses torchrun)"
        )
    return state


# -- memory --------------------------------------------------------------------------------------
def reset_peak_memory(device: Any) -> None:
    """Start counting peak memory afresh (CUDA's allocator peak; the process's peak RSS where Linux allows)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:  # Linux >= 4.0: writing 5 resets VmHWM, the peak resident set size
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_accelerator_bytes(device: Any) -> int | None:
    """Peak bytes allocated on the CUDA device since the last reset; None on other devices."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))


def peak_rss_bytes() -> int:
    """The process's peak resident set size (VmHWM on Linux; getrusage's high-water mark elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


# -- what the folders hold -------------------------------------------------------------------------
def panels_on_disk(folder: Path) -> set[int]:
    """Indices of the panels the story folder's manifest lists and whose files exist (empty when none)."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
        panels = data.get("panels", {})
        return {int(key) for key, record in panels.items() if (folder / record["file"]).is_file()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()  # no run yet, or a manifest run_story itself will refuse with a message


def read_runs(folder: Path) -> list[dict[str, Any]]:
    """The story folder's run records (`runs.json`), oldest first."""
    try:
        runs = json.loads((folder / RUNS_FILE).read_text())
    except (OSError, ValueError):
        return []
    return runs if isinstance(runs, list) else []


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    write_atomically(path, lambda target: target.write_text(text))


def batch_manifest(out: Path, stories: Sequence[BatchStory], shares: Sequence[Sequence[int]]) -> dict[str, Any]:
    """The merged manifest, rebuilt from every story folder's own manifest and run records."""
    process_of = {index: process for process, share in enumerate(shares) for index in share}
    entries: dict[str, Any] = {}
    for index, item in enumerate(stories):
        folder = out / item.name
        done = panels_on_disk(folder)
        runs = read_runs(folder)
        entries[item.name] = {
            "source": item.source,
            "folder": item.name,
            "manifest": f"{item.name}/{MANIFEST}" if (folder / MANIFEST).is_file() else None,
            "process": process_of.get(index),
            "panels": len(item.story.panels),
            "done": len(done),
            "complete": len(done) == len(item.story.panels),
            "generated": sum(int(run.get("generated", 0)) for run in runs),
            "seconds": sum(float(run.get("seconds", 0.0)) for run in runs),
        }
    total = sum(entry["panels"] for entry in entries.values())
    done_total = sum(entry["done"] for entry in entries.values())
    return {
        "format": BATCH_FORMAT,
        "version": 1,
        "num_processes": len(shares),
        "stories": entries,
        "panels": total,
        "done": done_total,
        "complete": done_total == total,
    }


def write_batch_manifest(out: Path, stories: Sequence[BatchStory], shares: Sequence[Sequence[int]]) -> dict[str, Any]:
    manifest = batch_manifest(out, stories, shares)
    _write_json(out / BATCH_MANIFEST, manifest)
    return manifest


# -- the run -------------------------------------------------------------------------------------
class PipelineCache:
    """The model of one process, loaded once for all its stories (one model at a time: a batch whose stories
    name several models loads each in turn). Each story gets a `StoryPipeline` over the same diffusers
    pipeline with its own CSA settings."""

    def __init__(self, options: RunOptions) -> None:
        self.options = dataclasses.replace(options, progress=False)  # no step bars: one bar per process instead
        self.model: str | None = None
        self.loaded: StoryPipeline | None = None

    def get(self, model: str, csa_config: CSAConfig) -> StoryPipeline:
        if model != self.model:
            self.release()
            self.loaded = load_story_pipeline(model, self.options, csa_config)
            self.model = model
        assert self.loaded is not None
        return StoryPipeline(
            self.loaded.pipe,
            csa_config,
            bank_dtype=self.options.bank_dtype,
            bank_storage=self.options.bank_storage,
            recommended=self.loaded.recommended,
        )

    def release(self) -> None:
        import torch

        self.loaded, self.model = None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _exit_after(process_index: int) -> int | None:
    """The testing hook: how many panels this process writes before it exits, or None."""
    value = os.environ.get(EXIT_AFTER_ENV)
    if not value:
        return None
    process, sep, count = value.partition(":")
    if not sep or not process.strip().isdigit() or not count.strip().isdigit() or int(count) < 1:
        raise StoryDiffusionError(f"{EXIT_AFTER_ENV}={value!r}: write PROCESS:PANELS, e.g. 1:3 (a testing hook)")
    return int(count) if int(process) == process_index else None


def story_csa_config(base: CSAConfig, settings: StorySettings) -> CSAConfig:
    """`base` with the CSA settings a story sets itself (`rate`, and any other `CSAConfig` field that
    `StorySettings` has), as `run_story` builds them when it loads its own pipeline."""
    shared = {f.name for f in dataclasses.fields(CSAConfig)} & {f.name for f in dataclasses.fields(StorySettings)}
    return dataclasses.replace(base, **{name: getattr(settings, name) for name in sorted(shared)})


def _model_of(item: BatchStory, options: RunOptions) -> str:
    return item.story.settings.model or options.model


def run_batch(
    stories: Sequence[BatchStory],
    out: str | Path,
    options: RunOptions | None = None,
    *,
    state: Any = None,
    csa_config: CSAConfig | None = None,
    pipelines: PipelineCache | None = None,
    on_panel: Callable[[str, int, Path], None] | None = None,
) -> BatchResult:
    """Draw this process's share of `stories` into `out/NAME/` (see the module docstring).

    `csa_config`: the CSA settings of every story (`story_csa_config`: its `rate`, and any other CSA field a story
    sets, come from the story); default `CSAConfig()`.
    `pipelines`: a cache to share the loaded model with later calls (`bench` runs several arms).
    `on_panel(story name, index, path)` is called as each panel is written. Call it on every process.
    """
    from tqdm.auto import tqdm

    options = options or RunOptions()
    state = state if state is not None else batch_state()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shares = assign_stories([len(item.story.panels) for item in stories], state.num_processes)
    index, count = state.process_index, state.num_processes
    # grouped by model, so each is loaded once; input order within a model
    mine = sorted((stories[i] for i in shares[index]), key=lambda item: _model_of(item, options))
    if state.is_main_process:
        write_batch_manifest(out, stories, shares)  # what the folders hold before this run
    exit_after = _exit_after(index)
    run_options = dataclasses.replace(options, progress=False)  # one bar per process instead of the story's
    pipelines = pipelines or PipelineCache(run_options)
    # the CSA settings of each model: those given, else the model's recommended ones (its storydiffusion.json)
    base_csa = {model: csa_config or (model_recommended(model) or RecommendedSettings()).csa_config()
                for model in {_model_of(item, options) for item in mine}}  # fmt: skip
    done_before = {item.name: panels_on_disk(out / item.name) for item in mine}
    written = 0
    generated = skipped = 0
    checked: set[str] = set()

    with tqdm(
        total=sum(len(item.story.panels) for item in mine),
        initial=0 if options.overwrite else sum(len(done) for done in done_before.values()),
        desc=f"process {index}/{count}",
        unit="panel",
        position=state.local_process_index,
        disable=not options.progress,
        dynamic_ncols=True,
    ) as bar:
        for item in mine:
            model = _model_of(item, options)
            story_pipe = pipelines.get(model, story_csa_config(base_csa[model], item.story.settings))
            if model not in checked:  # every folder of this model checked before minutes of drawing
                _check_folders([s for s in mine if _model_of(s, options) == model], out, run_options, story_pipe)
                checked.add(model)
            counted = set() if options.overwrite else set(done_before[item.name])
            started = last = time.perf_counter()

            def panel_done(panel: int, path: Path, name: str = item.name, counted: set[int] = counted) -> None:
                nonlocal last, written
                last = time.perf_counter()
                if panel not in counted:  # a reference panel drawn again is not progress
                    counted.add(panel)
                    bar.update(1)
                if on_panel is not None:
                    on_panel(name, panel, path)
                written += 1
                if exit_after is not None and written >= exit_after:
                    os._exit(EXIT_AFTER_CODE)  # the testing hook: die as a crash would, no clean-up

            result = run_story(item.story, out / item.name, run_options, pipeline=story_pipe, on_panel=panel_done)
            generated += len(result.generated)
            skipped += len(result.skipped)
            _record_run(out / item.name, result.generated, result.skipped, last - started, story_pipe, state, options)
            bar.update(len(item.story.panels) - len(counted | set(result.skipped)))
            if state.is_main_process:
                write_batch_manifest(out, stories, shares)

    state.wait_for_everyone()
    manifest = write_batch_manifest(out, stories, shares) if state.is_main_process else None
    return BatchResult(out, index, count, [item.name for item in mine], generated, skipped, manifest)


def _check_folders(items: Sequence[BatchStory], out: Path, options: RunOptions, pipeline: StoryPipeline) -> None:
    """Refuse now, not after hours of other stories, a folder that holds a run with other settings."""
    if options.overwrite:
        return
    for item in items:
        story = resolve_settings(item.story, options, (), pipeline)
        settings = run_settings(story, _model_of(item, options), options, (), pipeline)
        Manifest.open(out / item.name, settings, overwrite=False)


def _record_run(
    folder: Path,
    generated: Sequence[int],
    skipped: Sequence[int],
    seconds: float,
    pipeline: StoryPipeline,
    state: Any,
    options: RunOptions,
) -> None:
    """Append this run to the folder's `runs.json` (only its owner process writes it)."""
    if not generated:
        return  # nothing drawn: nothing timed
    runs = [] if options.overwrite else read_runs(folder)
    device = execution_device(pipeline)  # under --cpu-offload the GPU, where `pipeline.device` says cpu
    runs.append(
        {
            "process": state.process_index,
            "num_processes": state.num_processes,
            "device": str(device),
            "generated": len(generated),
            "skipped": len(skipped),
            "seconds": round(seconds, 4),  # from the story's start to its last panel written: no comic pages
            "peak_mem_bytes": peak_accelerator_bytes(device),
            "peak_rss_bytes": peak_rss_bytes(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    _write_json(folder / RUNS_FILE, runs)
