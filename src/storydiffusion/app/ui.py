"""The web UI: a Gradio app that turns a story into panels, comic pages, a PDF and a zip of the run.

`storydiffusion ui` serves it. The server side is a `StoryApp`: it owns the loaded pipeline, the
folder the runs are written to and the event handlers; `StoryApp.build()` lays the page out from
them (no module globals). Every click of Generate writes its run into a fresh folder of its own and
the page keeps its last run in a `gr.State`, so two browser sessions never see each other's files.

    app = StoryApp(model="tiny")
    demo = app.build()                 # a gr.Blocks; or app.launch(host, port) to serve it
    for update in app.generate(make_story(characters, frames, steps=8)):
        print(len(update.panels), "of", update.total)
"""

from __future__ import annotations

import html
import re
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from queue import Queue
from typing import Any

import gradio as gr
import yaml

from storydiffusion.app.runner import (
    TINY_RANDOM,
    TINY_RANDOM_MODELS,
    RunOptions,
    RunResult,
    default_model,
    load_story_pipeline,
    model_recommended,
    run_story,
    story_csa_config,
)
from storydiffusion.csa.attention import CSAConfig
from storydiffusion.errors import StoryDiffusionError
from storydiffusion.pipelines.characters import saved_character_name
from storydiffusion.pipelines.story_pipeline import StoryPipeline
from storydiffusion.story.comic import ComicLayout
from storydiffusion.story.examples import DEMO_CHARACTERS, DEMO_FRAMES
from storydiffusion.story.format import Story, StoryFormatError, StorySettings
from storydiffusion.story.styles import DEFAULT_STYLE, style_names
from storydiffusion.world.models import TINY, TINY_SIZE, tiny_model_available

RUN_DIR = "story"  # a run's files, inside its folder; also the top folder of its zip
STORY_FILE = "story.yaml"  # the run's story and settings, for `storydiffusion story story.yaml`
RUN_MAX_AGE_S = 24 * 3600  # a served app deletes runs older than this (their files, banks and zips)

SYNTAX = """\
**Characters**: one per line, `[Name] description`.

**Frames**: one panel per line.
- `[Name]` stands for that character's description; a frame may name several characters.
- `[NC]` marks a panel without characters.
- Text after the last `#` is the panel's caption.
- Blank lines and lines starting with `//` are skipped.

A character's first *id_length* frames that show it alone are its reference frames: they are drawn
together, and every later frame naming it borrows from them, so it stays the same person.

**CSA rate**: the share of the other images' tokens each image attends to, from 0 to 1 (`0.5`), or
one rate per resolution level (`2: 0.5, 4: 0.5`). **Size**: `WxH` in multiples of 8; empty for the
model's own size.
"""

# One-click stories in the tiny model's grammar (`storydiffusion.world.render`): a kind, a pose and a
# scene; the look comes from the reference frames. The first is the `storydiffusion demo` story.
EXAMPLES = [
    [DEMO_CHARACTERS, DEMO_FRAMES],
    [
        "[Mia] a woman\n",
        "[Mia], walking in the city #Mia goes out.\n"
        "[Mia], running on a beach #She runs by the sea.\n"
        "[Mia], sitting in a room #Home again.\n"
        "[NC] a forest at night #The end.\n",
    ],
]


@dataclass
class RunUpdate:
    """Where a run stands: the panels finished so far and, on the last update, everything it wrote."""

    run_dir: Path  # the run's folder: its files under story/, its zip
    panels: list[tuple[Path, str]]  # finished panels in story order, with their captions
    total: int  # panels in the story
    seconds: float
    result: RunResult | None = None  # set on the last update
    zip: Path | None = None  # the whole run as one file, on the last update


# -- the form -> a story -------------------------------------------------------------------------
def parse_rate(text: str | float) -> float | dict[int, float]:
    """The CSA rate field: one number (`0.5`) or per resolution level (`2: 0.5, 4: 0.5`); unchecked values."""
    if isinstance(text, int | float):
        return float(text)
    text = str(text).strip()
    try:
        if ":" not in text:
            return float(text)
        rates = {}
        for item in text.split(","):
            level, rate = item.split(":")
            rates[int(level)] = float(rate)
        return rates
    except ValueError:
        raise StoryFormatError(
            f"the CSA rate is a number from 0 to 1 (0.5) or level: rate pairs (2: 0.5, 4: 0.5), got {text!r}",
            "Settings",
            None,
            "rate",
        ) from None


def parse_size(text: str) -> tuple[int | None, int | None]:
    """The size field: `WxH`, one number for a square, or empty for the model's own size."""
    text = (text or "").strip()
    if not text:
        return None, None
    match = re.fullmatch(r"(\d+)\s*(?:[xX×]\s*(\d+))?", text)
    if match is None:
        raise StoryFormatError(f"size is WxH (e.g. 64x64) or empty, got {text!r}", "Settings", None, "size")
    width = int(match.group(1))
    return width, int(match.group(2) or width)


def _whole(value: Any) -> Any:
    """Gradio's sliders and numbers may send 8.0 for 8; StorySettings wants whole numbers as int."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def make_story(
    characters: str,
    frames: str,
    *,
    style: str = DEFAULT_STYLE,
    model: str | None = None,
    id_length: int = 2,
    rate: str | float = "0.5",
    steps: int = 20,
    guidance: float = 4.0,
    size: str = "",
    seed: int = 0,
    banked: Sequence[str] = (),
    pictures: Mapping[str, Sequence[str | Path]] | None = None,
) -> Story:
    """The story the form describes; raises StoryFormatError naming the box and line, or the setting.
    `banked`: characters that come from uploaded bank files (they need no reference frames); `pictures`:
    character name -> uploaded pictures (those of names the Characters box no longer defines are ignored)."""
    width, height = parse_size(size)
    try:
        settings = StorySettings(
            style=style,
            seed=_whole(seed),
            steps=_whole(steps),
            guidance=guidance,
            width=width,
            height=height,
            id_length=_whole(id_length),
            rate=parse_rate(rate),
            model=model,
        )
    except StoryFormatError as error:  # "<settings>" means the settings fields of this page
        raise StoryFormatError(error.message, "Settings", None, error.field) from None
    defined = set(character_names(characters))
    return Story.from_text(
        characters,
        frames,
        settings,
        characters_source="Characters",
        frames_source="Frames",
        banked=banked,
        # every setting is on the form, so the user set each (the model's recommended ones only fill it first)
        given=[name for name in FORM_SETTINGS if name not in ("width", "height") or width],
        pictures={name: list(files) for name, files in (pictures or {}).items() if name in defined and files},
    )


FORM_SETTINGS = ("style", "seed", "steps", "guidance", "width", "height", "id_length", "rate", "model")


def character_names(text: str) -> list[str]:
    """The names the Characters box defines, in order (`[Name] description` lines; anything else skipped:
    the box is checked when Generate is clicked)."""
    names = (re.match(r"\s*\[([^\]]+)\]", line) for line in (text or "").splitlines())
    # spaces as the story parser reads them: "[ Big  Bob ]" is [Big Bob]
    return list(dict.fromkeys(" ".join(match.group(1).split()) for match in names if match and match.group(1).strip()))


def story_yaml(story: Story, folder: Path | None = None) -> str:
    """The story as a story file (frames as written, settings), so a run can be repeated from its zip;
    pictures inside `folder` (where the file goes) are named relative to it, as story files name them."""

    def picture(path: Path) -> str:
        inside = folder is not None and Path(path).is_relative_to(folder)
        return Path(path).relative_to(folder).as_posix() if inside else str(path)

    s = story.settings
    data: dict[str, Any] = {
        "characters": {
            name: {"description": c.description, "images": [picture(path) for path in c.images]}
            if c.images
            else c.description
            for name, c in story.characters.items()
        },
        "frames": [panel.text for panel in story.panels],
        "style": s.style,
        "seed": s.seed,
        "steps": s.steps,
        "guidance": s.guidance,
        "id_length": s.id_length,
        "rate": s.rate,
    }
    if s.width and s.height:
        data["size"] = f"{s.width}x{s.height}"
    if s.negative_prompt:
        data["negative_prompt"] = s.negative_prompt
    if s.model:
        data["model"] = s.model
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def keep_pictures(story: Story, out: Path) -> Story:
    """The story with its characters' pictures copied into `out/pictures/` (uploads are temporary files), so
    the run's story file (`story_yaml(story, out)`) and zip repeat the run."""
    characters = dict(story.characters)
    for name, character in story.characters.items():
        if not character.images:
            continue
        folder = out / "pictures"
        folder.mkdir(exist_ok=True)
        kept = []
        for number, path in enumerate(character.images, start=1):
            slug = re.sub(r"[^A-Za-z0-9_-]+", "_", name) or "character"
            target = folder / f"{slug}-{number}{Path(path).suffix.lower() or '.png'}"
            shutil.copyfile(path, target)
            kept.append(target)
        characters[name] = replace(character, images=tuple(kept))
    return replace(story, characters=characters) if characters != story.characters else story


def _markdown_text(text: str) -> str:
    """User text (a frame, an error naming one) shown literally in a gr.Markdown."""
    return re.sub(r"([\\`*_\[\]#|])", r"\\\1", html.escape(text, quote=False))


# -- the server side -----------------------------------------------------------------------------
class StoryApp:
    """The web UI's server side: the loaded model, the runs' folder and the event handlers.

    One pipeline is loaded at a time (the last model asked for) and shared by all sessions. A diffusers
    pipeline is not safe to run twice at once (the scheduler's timesteps and CSA's processors are set
    on it per call), so generation holds `self._lock`: concurrent sessions queue instead of sharing a
    pipeline mid-call, which on one GPU costs nothing (it runs one story at a time anyway), while a
    pipeline per session would multiply the memory by the number of users.
    """

    def __init__(
        self,
        model: str | None = None,
        root: str | Path | None = None,
        options: RunOptions | None = None,
        defaults: Mapping[str, Any] | None = None,
        video_model: str = TINY,
        flf2v_model: str | None = None,
        video_backend: str = "smp",
    ) -> None:
        self.model = model or default_model()
        self.video_model = video_model  # the TransitionPipeline of the video tab, loaded on first use
        # The video tab's backends, each loaded on first use: smp always, flf2v when the server was given a
        # model for it (like the image models, what it loads is the server owner's choice, not the page's)
        self.video_models = {"smp": video_model, **({"flf2v": flf2v_model} if flf2v_model else {})}
        if video_backend not in self.video_models:
            raise StoryDiffusionError(
                f"video backend {video_backend!r} is not served: choose one of {list(self.video_models)} "
                "(flf2v needs a model: --flf2v-model)"
            )
        self.video_backend = video_backend  # the one the tab starts on
        # The page offers the model the server was started with and the shipped ones, not any path
        # or hub id: what the server loads is its owner's choice.
        shipped = [TINY] if tiny_model_available() else []
        self.models = list(dict.fromkeys([self.model, *shipped, TINY_RANDOM]))
        self.options = options or RunOptions(progress=False)
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="storydiffusion-ui-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.defaults = {**self.model_defaults(self.model), **(defaults or {})}
        self._lock = threading.Lock()
        self._loaded: tuple[str, Any] | None = None  # (model name, diffusers pipeline)
        self._videos: dict[str, Any] = {}  # backend name -> loaded backend, once the video tab asks for it

    @staticmethod
    def model_defaults(model: str) -> dict[str, Any]:
        """The form's starting values: the model's recommended settings (its storydiffusion.json) where it has
        them, else the tiny model's own size and guidance, or SDXL-like ones."""
        common = {"id_length": 2, "rate": "0.5", "seed": 0, "characters": "", "frames": ""}
        if model == TINY or model in TINY_RANDOM_MODELS:
            values = {
                **common,
                "style": DEFAULT_STYLE,
                "steps": 20,
                "guidance": 4.0,
                "size": f"{TINY_SIZE}x{TINY_SIZE}",
            }
        else:
            values = {**common, "style": "Comic book", "steps": 30, "guidance": 5.0, "size": ""}
        recommended = model_recommended(model)
        if recommended is not None:
            values.update({key: value for key in ("steps", "guidance", "id_length")
                           if (value := getattr(recommended, key)) is not None})  # fmt: skip
            if recommended.width and recommended.height:
                values["size"] = f"{recommended.width}x{recommended.height}"
            if isinstance(recommended.csa.get("rate"), int | float):
                values["rate"] = str(recommended.csa["rate"])
        return values

    # -- generation ----------------------------------------------------------------------------
    def _pipeline(self, model: str) -> Any:
        """The diffusers pipeline of `model`, loaded on first use; call with `self._lock` held."""
        if self._loaded is None or self._loaded[0] != model:
            self._loaded = None  # let the previous model go before loading the next
            self._loaded = (model, load_story_pipeline(model, self.options, CSAConfig()).pipe)
        return self._loaded[1]

    def preload(self) -> None:
        """Load the default model now, so the first Generate does not wait for it."""
        with self._lock:
            self._pipeline(self.model)

    def served_model(self, story: Story) -> str:
        """The model `story` asks for (default: the app's); raises unless the page offers it."""
        model = story.settings.model or self.model
        if model not in self.models:
            raise StoryDiffusionError(f"model {model!r} is not served here; choose one of {self.models}")
        return model

    def new_run_dir(self) -> Path:
        """A fresh folder for one run: every Generate of every session gets its own. Runs older than
        RUN_MAX_AGE_S go, so a server that stays up does not fill its disk."""
        for old in self.root.glob("run-*"):
            if time.time() - old.stat().st_mtime > RUN_MAX_AGE_S:
                shutil.rmtree(old, ignore_errors=True)
        path = self.root / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def generate(self, story: Story, bank_files: Sequence[str | Path] = ()) -> Iterator[RunUpdate]:
        """Run `story` into a fresh folder, yielding an update as each panel finishes and a last one
        with the run's result and zip. `bank_files`: saved characters to reuse (see `run_story`)."""
        model = self.served_model(story)
        run_dir = self.new_run_dir()
        out = run_dir / RUN_DIR
        out.mkdir()
        story = keep_pictures(story, out)
        (out / STORY_FILE).write_text(story_yaml(story, out), encoding="utf-8")
        s = story.settings
        options = replace(self.options, model=model, layout=ComicLayout(seed=s.seed), progress=False)
        events: Queue[tuple[str, Any]] = Queue()

        def work() -> None:  # in a thread, so this generator can yield while panels are drawn
            try:
                with self._lock:
                    # a fresh StoryPipeline per run: its CSA settings (the rate) are this story's
                    recommended = model_recommended(model)
                    pipe = StoryPipeline(
                        self._pipeline(model),
                        story_csa_config(story, recommended),
                        bank_dtype=options.bank_dtype,
                        bank_storage=options.bank_storage,
                        recommended=recommended,
                    )
                    result = run_story(
                        story,
                        out,
                        options,
                        pipeline=pipe,
                        bank_files=list(bank_files),
                        on_panel=lambda index, path: events.put(("panel", (index, path))),
                    )
                events.put(("done", result))
            except BaseException as error:  # handed to the generator, which raises it in the caller
                events.put(("error", error))

        started = time.perf_counter()
        threading.Thread(target=work, name=f"storydiffusion-{run_dir.name}", daemon=True).start()
        finished: dict[int, Path] = {}
        captions = [panel.caption for panel in story.panels]

        def update(**extra: Any) -> RunUpdate:
            panels = [(finished[i], captions[i]) for i in sorted(finished)]
            return RunUpdate(run_dir, panels, len(captions), time.perf_counter() - started, **extra)

        while True:
            kind, value = events.get()
            if kind == "error":
                raise value
            if kind == "panel":
                finished[value[0]] = value[1]
                yield update()
                continue
            result: RunResult = value
            finished.update(enumerate(result.panels))
            yield update(result=result, zip=zip_run(run_dir))
            return

    # -- event handlers: form values in, component values out (`outputs` in build) -----------------
    def on_generate(
        self,
        characters: str,
        frames: str,
        style: str,
        model: str,
        id_length: float,
        rate: str,
        steps: float,
        guidance: float,
        size: str,
        seed: float,
        bank_files: Sequence[str] | None,
        pictures: Mapping[str, Sequence[str]] | None = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio finds the tracker by this default
    ) -> Iterator[tuple[Any, ...]]:
        """Generate: yields (message, panels, pages, pdf, zip, banks, session) as the run goes.
        `pictures`: character name -> uploaded pictures (the session's `on_pictures` state).

        A mistake in the story or the settings becomes a message in the page, never a traceback.
        """
        keep = gr.update()  # leave a component as it is
        try:
            story = make_story(
                characters,
                frames,
                style=style,
                model=model,
                id_length=id_length,
                rate=rate,
                steps=steps,
                guidance=guidance,
                size=size,
                seed=seed,
                banked=[saved_character_name(path) for path in bank_files or ()],
                pictures=pictures,
            )
            self.served_model(story)
            total = len(story.panels)
            progress((0, total), desc="panels", unit="panels")
            yield _message(f"Drawing {total} panels..."), [], [], None, None, None, keep
            for update in self.generate(story, bank_files or ()):
                progress((len(update.panels), total), desc="panels", unit="panels")
                panels = [(str(path), caption) for path, caption in update.panels]
                if update.result is None:
                    text = f"{len(update.panels)} of {total} panels done ({update.seconds:.0f} s)..."
                    yield _message(text), panels, keep, keep, keep, keep, keep
                    continue
                result = update.result
                banks = [str(path) for path in result.characters.values()]  # the small files, not the banks
                session = {"out": str(result.out), "panels": panels, "banks": banks}
                text = f"{total} panels, {len(result.pages)} comic page(s) in {update.seconds:.1f} s."
                drawn_from = [
                    f"{name} from {len(c.images)} picture{'s' if len(c.images) > 1 else ''}"
                    for name, c in story.characters.items()
                    if c.images
                ]
                if drawn_from:
                    text += f" Drawn from pictures: {', '.join(drawn_from)}."
                pages = [str(path) for path in result.pages]
                yield _message(text), panels, pages, str(result.pdf), str(update.zip), banks or None, session
        except StoryDiffusionError as error:
            yield _message(str(error), error=True), keep, keep, keep, keep, keep, keep

    @staticmethod
    def on_pictures(
        name: str, files: Sequence[str] | str | None, pictures: Mapping[str, Sequence[str]] | None
    ) -> dict[str, list[str]]:
        """Pictures of character `name` uploaded (or cleared): the session's name -> pictures, updated."""
        updated = {key: list(value) for key, value in (pictures or {}).items() if key != name}
        files = [files] if isinstance(files, str) else list(files or ())
        if files:
            updated[name] = [str(path) for path in files]
        return updated

    def on_reuse(self, session: Mapping[str, Any] | None) -> tuple[Any, str]:
        """Reuse this session's last characters: its run's character files go to the upload box."""
        if not session or not session.get("banks"):
            return gr.update(), _message("Generate a story with characters first; its banks are then reusable.")
        names = ", ".join(saved_character_name(path) for path in session["banks"])
        return session["banks"], _message(f"The next run reuses {names}: same settings (size, steps, guidance).")

    # -- the video tab ---------------------------------------------------------------------------------
    def _video_pipeline(self, backend: str = "smp") -> Any:
        """The video tab's `backend` (smp or flf2v), loaded on first use; call with `self._lock` held."""
        if backend not in self.video_models:
            raise StoryDiffusionError(
                f"video backend {backend!r} is not served here; choose one of {list(self.video_models)}"
            )
        if backend not in self._videos:
            from storydiffusion.app.video_runner import load_backend

            o = self.options  # the server's device and memory options, as for the image model
            model = self.video_models[backend]
            loaded = load_backend(backend, model, o.device, o.dtype, cpu_offload=o.cpu_offload, vae_tiling=o.vae_tiling)
            loaded.set_progress_bar_config(disable=True)
            self._videos[backend] = loaded
        return self._videos[backend]

    @staticmethod
    def _last_run(session: Mapping[str, Any] | None) -> Path:
        if not session or not session.get("out"):
            raise StoryDiffusionError("generate a story first: the video tab animates its panels")
        return Path(session["out"])

    def transition_video(
        self,
        session: Mapping[str, Any] | None,
        start: int,
        end: int,
        settings: Any,
        fps: float | None = None,
        backend: str = "smp",
    ) -> Path:
        """A transition between panels `start` and `end` (1-based) of this session's last run, as MP4;
        `fps` defaults to the backend's (8 for smp, the model's own for flf2v)."""
        from storydiffusion.app.video_runner import run_transition, story_panels

        out = self._last_run(session)
        panels = story_panels(out)
        for name, number in (("From panel", start), ("To panel", end)):
            if not 1 <= int(number) <= len(panels):
                raise StoryDiffusionError(f"{name} is {int(number)}: the story has panels 1 to {len(panels)}")
        (start_file, _), (end_file, prompt) = panels[int(start) - 1], panels[int(end) - 1]
        tag = "" if backend == "smp" else f"_{backend}"  # one backend's clip never overwrites another's
        target = out.parent / "video" / f"transition_{int(start)}_{int(end)}_seed{settings.seed}{tag}.mp4"
        with self._lock:
            return run_transition(self._video_pipeline(backend), start_file, end_file, prompt, target, settings, fps)

    def story_video(
        self,
        session: Mapping[str, Any] | None,
        settings: Any,
        fps: float | None = None,
        backend: str = "smp",
        on_transition: Any = None,
    ) -> Path:
        """Every pair of consecutive panels of this session's last run chained into one MP4."""
        from storydiffusion.app.video_runner import run_story_video

        out = self._last_run(session)
        target = out.parent / ("story.mp4" if backend == "smp" else f"story_{backend}.mp4")
        with self._lock:
            pipe = self._video_pipeline(backend)
            path, _ = run_story_video(pipe, out, target, settings, fps, on_transition=on_transition)
        return path

    def on_video(
        self,
        session: Mapping[str, Any] | None,
        whole_story: bool,
        start: float,
        end: float,
        frames: float,
        steps: float,
        seed: float,
        motion: str,
        backend: str = "smp",
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio finds the tracker by this default
    ) -> tuple[str, Any]:
        """Animate: (message, video file) for a transition or the whole story; mistakes become messages.

        Guidance and keyframe attention are the backend's: for smp the video model's recommended settings (the
        tiny model: no guidance, the finished keyframes read), for flf2v its model's own guidance.
        """
        from storydiffusion.app.video_runner import TransitionSettings

        try:
            started = time.perf_counter()
            # guidance and keyframe attention: the backend's (smp: the video model's recommended settings)
            settings = TransitionSettings(num_frames=int(frames), steps=int(steps), seed=int(seed), motion=motion)

            def advance(done: int, total: int) -> None:
                progress((done, total), desc="transitions", unit="transitions")

            path = (
                self.story_video(session, settings, backend=backend, on_transition=advance)
                if whole_story
                else self.transition_video(session, int(start), int(end), settings, backend=backend)
            )
            return _message(f"Wrote {path.name} in {time.perf_counter() - started:.1f} s."), str(path)
        except StoryDiffusionError as error:
            return _message(str(error), error=True), None

    @staticmethod
    def video_frames_for(backend: str) -> dict[str, Any]:
        """The frames slider for `backend`: smp's 8 of at most 16; for flf2v 9 (= 4k+1 for Wan and 8k+1 for
        LTX: a valid count for both, and a short preview) of up to 161 (LTX's own length)."""
        return {"value": 8, "maximum": 16} if backend == "smp" else {"value": 9, "maximum": 161}

    def on_video_backend(self, backend: str) -> Any:
        """A backend chosen: the frames slider moves to a count it makes."""
        return gr.update(**self.video_frames_for(backend))

    # -- the page ------------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        """The page: the story tab (boxes, settings, results, characters to reuse) and the video tab."""
        d = self.defaults
        # delete_cache: Gradio's copies of the files it served go after a day too, and at shutdown
        with gr.Blocks(title="StoryDiffusion", analytics_enabled=False, delete_cache=(3600, RUN_MAX_AGE_S)) as demo:
            session = gr.State(None)  # this browser session's last run: {"out", "panels", "banks"}
            pictures = gr.State({})  # this browser session's uploaded pictures: character name -> files
            gr.Markdown("# StoryDiffusion\nCharacters and one line per scene in; consistent panels and a comic out.")
            with gr.Tabs():
                with gr.Tab("Story"):
                    with gr.Row():
                        with gr.Column(scale=3):
                            characters = gr.Textbox(
                                d["characters"], label="Characters", lines=3, placeholder="[Bob] a man with red hair"
                            )
                            frames = gr.Textbox(
                                d["frames"], label="Frames", lines=8, placeholder="[Bob], walking in the city #Caption"
                            )
                        with gr.Column(scale=2):
                            gr.Markdown(SYNTAX)
                    gr.Examples(EXAMPLES, inputs=[characters, frames], label="Example stories (one click)")
                    with gr.Accordion("Settings", open=True):
                        with gr.Row():
                            style = gr.Dropdown(style_names(), value=d["style"], label="Style")
                            model = gr.Dropdown(self.models, value=self.model, label="Model")
                            size = gr.Textbox(d["size"], label="Size", placeholder="WxH; empty: the model's own")
                            seed = gr.Number(d["seed"], label="Seed", precision=0, minimum=0)
                        with gr.Row():
                            id_length = gr.Slider(1, 6, d["id_length"], step=1, label="id_length (reference frames)")
                            rate = gr.Textbox(d["rate"], label="CSA rate", placeholder="0.5 or 2: 0.5, 4: 0.5")
                            steps = gr.Slider(1, 100, d["steps"], step=1, label="Steps")
                            guidance = gr.Slider(0.0, 15.0, d["guidance"], step=0.5, label="Guidance")
                    with gr.Accordion("Reuse characters", open=False):
                        bank_upload = gr.File(
                            label="Characters to reuse (Name.character.json from an earlier run, or a full bank "
                            "Name.safetensors)",
                            file_count="multiple",
                            file_types=[".json", ".safetensors"],
                            elem_id="bank-upload",
                        )
                        reuse = gr.Button("Reuse this session's last characters", size="sm")
                    with gr.Accordion("Characters from pictures", open=False):
                        gr.Markdown(
                            "A character with pictures is drawn from them: its look is read from the pictures "
                            "(resized and centre-cropped to the panel size) and it needs no reference frames."
                        )

                        @gr.render(inputs=[characters], triggers=[characters.change, demo.load])
                        def picture_uploads(text: str) -> None:
                            names = character_names(text)
                            if not names:
                                gr.Markdown("Define characters in the Characters box first.")
                            for name in names:
                                upload = gr.File(
                                    label=f"Pictures of [{name}]",
                                    file_count="multiple",
                                    file_types=["image"],
                                    key=f"pictures-{name}",
                                    elem_classes=["character-pictures"],
                                )
                                upload.change(partial(self.on_pictures, name), [upload, pictures], [pictures])

                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    message = gr.Markdown(elem_id="message")
                    panels = gr.Gallery(label="Panels", columns=6, object_fit="contain", elem_id="panels")
                    pages = gr.Gallery(label="Comic pages", columns=2, object_fit="contain", elem_id="pages")
                    with gr.Row():
                        pdf = gr.File(label="Comic (PDF)", elem_id="pdf")
                        archive = gr.File(label="Run (zip)", elem_id="zip")
                        banks = gr.File(label="Characters (character files)", file_count="multiple", elem_id="banks")
                with gr.Tab("Video"):
                    gr.Markdown(
                        "Animate the last story you generated here: a transition between two of its panels, "
                        "or every pair of consecutive panels chained into one video (the next panel's prompt "
                        "says what happens). Backends: **smp**, this project's Semantic Motion Predictor and "
                        "transition model; **flf2v**, a diffusers first/last-frame video model (Wan: 4k+1 "
                        "frames, LTX: 8k+1), where the server offers one."
                    )
                    with gr.Row():
                        whole_story = gr.Checkbox(False, label="Whole story (all panels in order)")
                        start_panel = gr.Number(1, label="From panel", precision=0, minimum=1)
                        end_panel = gr.Number(2, label="To panel", precision=0, minimum=1)
                    with gr.Row():
                        video_frames = gr.Slider(3, 16, 8, step=1, label="Frames per transition")
                        video_steps = gr.Slider(1, 50, 10, step=1, label="Steps")
                        video_seed = gr.Number(0, label="Seed", precision=0, minimum=0)
                        motion = gr.Radio(["smp", "linear"], value="smp", label="Motion")
                        video_backend = gr.Dropdown(
                            list(self.video_models), value=self.video_backend, label="Backend", elem_id="video-backend"
                        )
                    animate = gr.Button("Animate", variant="primary", elem_id="animate")
                    video_message = gr.Markdown(elem_id="video-message")
                    video = gr.Video(label="Video", elem_id="video")

            inputs = [
                *(characters, frames, style, model, id_length, rate, steps, guidance, size, seed, bank_upload),
                pictures,
            ]
            outputs = [message, panels, pages, pdf, archive, banks, session]
            # one generation at a time per app (see the class docstring); the rest wait in the queue
            generate.click(self.on_generate, inputs, outputs, concurrency_limit=1, concurrency_id="generate")
            reuse.click(self.on_reuse, [session], [bank_upload, message])
            video_inputs = [
                *(session, whole_story, start_panel, end_panel, video_frames, video_steps, video_seed, motion),
                video_backend,
            ]
            video_backend.change(self.on_video_backend, [video_backend], [video_frames])
            animate.click(
                self.on_video, video_inputs, [video_message, video], concurrency_limit=1, concurrency_id="generate"
            )
        return demo

    def launch(self, host: str = "127.0.0.1", port: int = 7860, block: bool = True, **kwargs: Any) -> gr.Blocks:
        """Serve the page on host:port (no share link, no analytics); `block=False` returns at once."""
        demo = self.build()
        demo.queue(default_concurrency_limit=4)
        demo.launch(
            server_name=host,
            server_port=port,
            share=False,
            prevent_thread_lock=not block,
            allowed_paths=[str(self.root)],
            **kwargs,
        )
        return demo

    def close(self) -> None:
        """Delete the runs' folder if this app made it."""
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)


def zip_run(run_dir: Path) -> Path:
    """A zip of the run's files, without the full identity banks: those are caches (an SDXL character's is
    gigabytes) that its small character file in banks/ regenerates exactly."""
    archive = run_dir / "storydiffusion-run.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted((run_dir / RUN_DIR).rglob("*")):
            relative = path.relative_to(run_dir)
            if path.is_file() and not (relative.parent.name == "banks" and path.suffix == ".safetensors"):
                zipped.write(path, relative.as_posix())
    return archive


def _message(text: str, error: bool = False) -> str:
    return f"**Error:** {_markdown_text(text)}" if error else _markdown_text(text)


def serve(
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    video_model: str = TINY,
    flf2v_model: str | None = None,
    video_backend: str = "smp",
) -> None:
    """`storydiffusion ui`: load the model, serve the page until interrupted, then delete the runs.
    `flf2v_model`: also offer the flf2v backend in the video tab, with this model."""
    app = StoryApp(model, video_model=video_model, flf2v_model=flf2v_model, video_backend=video_backend)
    try:
        app.preload()
        app.launch(host, port)
    finally:
        app.close()
