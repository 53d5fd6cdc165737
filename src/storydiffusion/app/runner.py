"""A story run on disk: load the model, generate the panels, write everything, resume when re-run.

The output folder holds each panel as PNG (prompt, negative prompt, seed, model and CSA settings
in PNG text chunks), the characters' files (`banks/Name.character.json`, the small recipe that
regenerates a bank exactly, and beside it the full bank `banks/Name.safetensors` as a cache when it is
small or asked for), `manifest.json`, and the comic pages + PDF.
Every file is written through a temporary name and the manifest is updated after every panel, so
an interrupted run loses at most the panel in flight. Re-running the same story into the same
folder skips the panels already there; a changed setting is reported instead of mixing panels
made under different settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from storydiffusion.csa.attention import CSAConfig
from storydiffusion.csa.bank import BankSettings, IdentityBank
from storydiffusion.errors import StoryDiffusionError
from storydiffusion.files import remove_partials, write_atomically
from storydiffusion.pipelines.characters import (
    CharacterRecipe,
    character_file_name,
    is_character_file,
    load_character,
    saved_character_name,
)
from storydiffusion.pipelines.loading import auto_dtype, checkpoint_kind, dtype_kwargs
from storydiffusion.pipelines.recommended import RecommendedSettings, csa_fields, read_recommended
from storydiffusion.pipelines.story_pipeline import FrameInfo, StoryPipeline
from storydiffusion.story.comic import ComicLayout, check_captions, make_comic, save_comic
from storydiffusion.story.format import Story, StorySettings

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "storydiffusion.run"
TINY_RANDOM = "tiny-random"  # built-in untrained SD1.5-layout model, for offline smoke runs
# every built-in untrained model, by short name -> the `pipelines.tiny_random` builder (offline smoke runs
# of each architecture StoryPipeline drives)
TINY_RANDOM_MODELS = {
    TINY_RANDOM: "tiny_sd_pipeline",
    "tiny-random-sdxl": "tiny_sdxl_pipeline",
    "tiny-random-flux": "tiny_flux_pipeline",
    "tiny-random-sd3": "tiny_sd3_pipeline",
}
TINY_RANDOM_DITS = {"tiny-random-flux": "flux", "tiny-random-sd3": "sd3"}
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda", "mps")
BANK_CACHES = ("auto", "always", "never")
BANK_CACHE_LIMIT = 256 << 20  # bank_cache "auto": the full bank is written beside its character file up to this


def default_model() -> str:
    """The shipped tiny model ("tiny"), or the random one when a checkout lacks its weights."""
    from storydiffusion.world.models import TINY, tiny_model_available

    return TINY if tiny_model_available() else TINY_RANDOM


@dataclass
class RunOptions:
    """How to run a story (what to run is the `Story` and its settings)."""

    model: str = field(default_factory=default_model)  # hub id, folder, "tiny" or a `TINY_RANDOM_MODELS` name
    device: str = "auto"  # auto: cuda, then mps, then cpu
    dtype: str = "auto"  # auto: float32 on the CPU; on a GPU bfloat16 for Flux/SD3 where it has it, else float16
    cpu_offload: bool = False  # diffusers' model CPU offload (the GPU holds one component at a time)
    vae_slicing: bool = False
    vae_tiling: bool = False
    bank_dtype: str = "int8"
    bank_storage: str = "auto"  # identity banks in RAM ("memory"), on disk ("disk"), or by size ("auto")
    # the full bank beside each character file: "auto" when at most BANK_CACHE_LIMIT bytes, "always", "never"
    bank_cache: str = "auto"
    layout: ComicLayout = field(default_factory=ComicLayout)
    overwrite: bool = False  # ignore what the folder holds instead of resuming
    progress: bool = True


@dataclass
class RunResult:
    out: Path
    panels: list[Path]
    generated: list[int]  # panel indices made by this run
    skipped: list[int]  # panel indices already on disk
    pages: list[Path]
    pdf: Path
    banks: dict[str, Path]  # the full banks written (bank_cache)
    characters: dict[str, Path] = field(default_factory=dict)  # the character files (small, exact)


# -- model loading -------------------------------------------------------------------------------
def pick_device(device: str) -> str:
    import torch

    if device not in DEVICES:
        raise StoryDiffusionError(f"--device {device!r} is not one of {DEVICES}")
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise StoryDiffusionError("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise StoryDiffusionError("--device mps: Apple's MPS backend is not available; use --device cpu")
    return device


def pick_dtype(dtype: str, device: str, model: str | None = None) -> Any:
    """The torch dtype `--dtype` names; "auto" by device and by `model`'s denoiser (`auto_dtype`)."""
    import torch

    if dtype not in DTYPES:
        raise StoryDiffusionError(f"--dtype {dtype!r} is not one of {DTYPES}")
    if dtype == "auto":
        if model is None or model in TINY_RANDOM_MODELS:
            kind = TINY_RANDOM_DITS.get(model, "unet")
        else:
            from storydiffusion.world.models import resolve_model

            kind = checkpoint_kind(resolve_model(model))
        return auto_dtype(device, kind)
    return getattr(torch, dtype)


def load_story_pipeline(model: str, options: RunOptions, csa_config: CSAConfig) -> StoryPipeline:
    """The model as a StoryPipeline on the chosen device, with the chosen memory options."""
    import torch

    device = pick_device(options.device)
    dtype = pick_dtype(options.dtype, device, model)
    if options.cpu_offload and device == "cpu":  # checked before minutes of loading, not after
        raise StoryDiffusionError("--cpu-offload moves models between a GPU and the CPU; it needs --device cuda")
    if model in TINY_RANDOM_MODELS:
        from storydiffusion.pipelines import tiny_random

        pipe = getattr(tiny_random, TINY_RANDOM_MODELS[model])(seed=0)
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        from diffusers import DiffusionPipeline

        from storydiffusion.world.models import resolve_model

        try:
            pipe = DiffusionPipeline.from_pretrained(resolve_model(model), **dtype_kwargs(dtype))
        except (OSError, ValueError) as error:
            hint = (
                "" if Path(model).exists() else " (no such folder; a hub id needs the network and HF_HUB_OFFLINE unset)"
            )
            raise StoryDiffusionError(f"cannot load model {model!r}{hint}: {str(error).splitlines()[0]}") from error
    story = StoryPipeline(
        pipe,
        csa_config,
        bank_dtype=options.bank_dtype,
        bank_storage=options.bank_storage,
        recommended=model_recommended(model),
    )
    if options.cpu_offload:
        # plain "cuda" offloads to GPU 0; under `accelerate launch` each process's current GPU is its own
        pipe.enable_model_cpu_offload(device=f"cuda:{torch.cuda.current_device()}" if device == "cuda" else device)
    else:
        pipe.to(device)
    if options.vae_slicing:
        pipe.vae.enable_slicing()
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=not options.progress, leave=False)
    return story


def execution_device(pipeline: StoryPipeline) -> Any:
    """The device the pipeline computes on: diffusers' `_execution_device`, which under model CPU offload is
    the GPU each component is moved to, where `pipeline.device` names the CPU its weights wait on."""
    return getattr(pipeline.pipe, "_execution_device", pipeline.device)


# -- the run -------------------------------------------------------------------------------------
def run_settings(
    story: Story,
    model: str,
    options: RunOptions,
    bank_files: Sequence[str | Path] = (),
    pipeline: StoryPipeline | None = None,
) -> dict[str, Any]:
    """Everything that decides the panels' pixels; a resumed run must match it exactly. Device and dtype
    are recorded as resolved (`auto` means different things on different machines): those of `pipeline`
    when one is given, else what `options` resolve to here."""
    s = story.settings
    rate = {str(k): v for k, v in s.rate.items()} if isinstance(s.rate, dict) else s.rate
    if pipeline is not None:
        device, dtype = execution_device(pipeline).type, str(pipeline.denoiser.dtype).removeprefix("torch.")
    else:
        device = pick_device(options.device)
        dtype = str(pick_dtype(options.dtype, device, model)).removeprefix("torch.")
    settings = {
        "model": model,
        "device": device,
        "dtype": dtype,
        "style": s.style,
        "seed": s.seed,
        "steps": s.steps,
        "guidance": s.guidance,
        "width": s.width,
        "height": s.height,
        "id_length": s.id_length,
        "rate": rate,
        "negative_prompt": s.negative_prompt,
        "same_initial_noise": s.same_initial_noise,
        "bank_dtype": options.bank_dtype,
        "characters": story.character_descriptions(),
    }
    if s.regional_prompts:  # only then, so folders made before this setting existed still resume
        settings["regional_prompts"] = True
    csa = pipeline.csa.config if pipeline is not None else story_csa_config(story, model_recommended(model))
    other_csa = {  # CSA settings a model's storydiffusion.json changed: only then, so older folders still resume
        key: value for key, value in csa_fields(csa).items()
        if key not in ("rate",) and value != csa_fields(CSAConfig()).get(key)
    }  # fmt: skip
    if other_csa:
        settings["csa"] = other_csa
    if bank_files:  # only then, so runs without given banks resume folders made before this key existed
        settings["banks"] = sorted(_file_digest(Path(path)) for path in bank_files)
    pictures = story.character_images()
    if pictures:  # a resumed run never mixes panels drawn from other pictures
        settings["pictures"] = {name: [_file_digest(path) for path in paths] for name, paths in pictures.items()}
    return settings


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as file:  # in chunks: a full SDXL bank is gigabytes
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as error:
        raise StoryDiffusionError(f"cannot read bank file {path}: {error.strerror or error}") from None
    return digest.hexdigest()[:16]


def load_bank_files(
    paths: Sequence[str | Path],
    expected: BankSettings,
    pipeline: StoryPipeline | None = None,
    storage: str = "memory",
) -> dict[str, IdentityBank]:
    """Saved characters to reuse, keyed by the character each file holds; refuses two for one name.

    A path is a full bank (`Name.safetensors`) or a character file (`Name.character.json`), whose bank is
    read from the cache beside it or regenerated on `pipeline`."""
    banks: dict[str, IdentityBank] = {}
    for path in paths:
        if pipeline is None:
            bank = IdentityBank.load(path, expected=expected, storage=storage)
        else:
            bank = load_character(path, pipeline, expected, storage)
        if bank.character in banks:
            raise StoryDiffusionError(f"two bank files hold character {bank.character!r}; give one per character")
        banks[bank.character] = bank
    return banks


# The story settings a saved character records. A run that leaves one unset takes the character's; one that sets
# it otherwise is refused: a character is drawn again as it was made (its bank holds tokens of that size, loop
# length, guidance and CSA rate, on that model).
CHARACTER_SETTINGS = ("model", "steps", "guidance", "width", "height", "rate")


def saved_character_settings(path: str | Path) -> dict[str, Any]:
    """The story settings (`CHARACTER_SETTINGS`) a saved character was made with, as `StorySettings` holds them:
    all of them from a character file or a bank that carries its recipe, the model and size from one without."""
    path = Path(path)
    if is_character_file(path):
        recipe = CharacterRecipe.load(path)
    else:
        metadata = IdentityBank.read_metadata(path)
        if "recipe" not in metadata:
            made = BankSettings.from_json(metadata["settings"])
            return _as_story_settings({"model": made.model, "width": made.width, "height": made.height})
        recipe = CharacterRecipe.from_dict(json.loads(metadata["recipe"]), source=f"bank file {path}")
    return _as_story_settings(
        {
            "model": recipe.settings.model,
            "steps": recipe.num_inference_steps,
            "guidance": recipe.guidance_scale,
            "width": recipe.width,
            "height": recipe.height,
            "rate": recipe.csa.get("rate"),
        }
    )


def _as_story_settings(values: dict[str, Any]) -> dict[str, Any]:
    """`values` normalised as `StorySettings` holds them (a float guidance, integer rate levels); unknown ones
    (None, an unnamed model) left out."""
    known = {name: value for name, value in values.items() if value not in (None, "")}
    settings = StorySettings(**known)
    return {name: getattr(settings, name) for name in known}


def _same_setting(name: str, a: Any, b: Any) -> bool:
    if name == "model":  # "tiny" and the shipped folder it stands for are one model
        from storydiffusion.world.models import resolve_model

        return resolve_model(a) == resolve_model(b)
    return a == b


def with_character_settings(story: Story, bank_files: Sequence[str | Path], default_model: str) -> Story:
    """`story` with its saved characters' settings (`CHARACTER_SETTINGS`) for those it does not set itself.

    A setting the story's author set (`Story.given_settings`: a story file's field, a command-line option) that
    differs from a character's, or two characters made with different values, is one `StoryDiffusionError`
    naming the values and the way out. `default_model` is what a story without a model runs (`RunOptions.model`):
    it stays when the character was made with it."""
    if not bank_files:
        return story
    given = story.given_settings()
    made: dict[str, tuple[Any, Path, str]] = {}  # setting -> (value, the file, its character)
    for path in map(Path, bank_files):
        character = saved_character_name(path)
        for name, value in saved_character_settings(path).items():
            if name not in made:
                made[name] = (value, path, character)
                continue
            first, first_path, first_character = made[name]
            if not _same_setting(name, first, value):
                raise StoryDiffusionError(
                    f"saved characters {first_character!r} ({first_path}) and {character!r} ({path}) were made with "
                    f"{name}={first!r} and {name}={value!r}; one run draws every character at one {name}: make one "
                    f"of them again with the other's"
                )
    updates: dict[str, Any] = {}
    conflicts: dict[tuple[str, Path], list[tuple[str, Any, Any]]] = {}  # (character, file) -> its conflicts
    for name, (value, path, character) in made.items():
        current = getattr(story.settings, name)
        if name in given:
            if not _same_setting(name, current, value):
                conflicts.setdefault((character, path), []).append((name, value, current))
        elif name != "model" or not _same_setting(name, current or default_model, value):
            updates[name] = value
    if conflicts:
        count = sum(len(found) for found in conflicts.values())
        raise StoryDiffusionError(
            "; ".join(
                f"saved character {character!r} ({path}) was made with "
                + " and ".join(f"{name}={value!r}" for name, value, _ in found)
                + ", but this run sets "
                + " and ".join(f"{name}={current!r} ({given[name]})" for name, _, current in found)
                for (character, path), found in conflicts.items()
            )
            + (
                ": leave it out (or give the character's value) to draw the character as it was made, or make the "
                "character again with it"
                if count == 1
                else ": leave them out (or give the character's values) to draw the character as it was made, or make "
                "the character again with them"
            )
        )
    if not updates:
        return story
    return dataclasses.replace(story, settings=dataclasses.replace(story.settings, **updates))


def resolve_settings(
    story: Story, options: RunOptions, bank_files: Sequence[str | Path] = (), pipeline: StoryPipeline | None = None
) -> Story:
    """The settings a story runs with, checked: its own, then its saved characters' (`with_character_settings`),
    then its model's recommended ones (`with_recommended_settings`), then the paper's defaults."""
    story = with_character_settings(story, bank_files, options.model)
    model = story.settings.model or options.model
    recommended = model_recommended(model, pipeline)
    story = with_recommended_settings(story, recommended, keep=_character_setting_names(bank_files))
    story.validate(banked=[saved_character_name(path) for path in bank_files])  # with the final id_length
    return story


def model_recommended(model: str, pipeline: StoryPipeline | None = None) -> RecommendedSettings | None:
    """The recommended settings of `model` (its folder's `storydiffusion.json`), or those `pipeline` holds."""
    if pipeline is not None and pipeline.recommended is not None:
        return pipeline.recommended
    if model in TINY_RANDOM_MODELS:
        return None
    from storydiffusion.world.models import resolve_model

    return read_recommended(resolve_model(model))


def with_recommended_settings(story: Story, recommended: RecommendedSettings | None, keep: Sequence[str] = ()) -> Story:
    """`story` with the model's recommended steps, guidance, size, id_length and CSA rate for those its author did
    not set (`Story.given_settings`) and `keep` (settings a saved character decides) does not name."""
    if recommended is None:
        return story
    given = {*story.given_settings(), *keep}
    # RecommendedSettings' generation fields share StorySettings' names
    updates = {name: value for name, value in recommended.generation().items() if name not in given}
    if "rate" not in given and "rate" in recommended.csa:
        updates["rate"] = recommended.csa["rate"]
    if not updates:
        return story
    return dataclasses.replace(story, settings=dataclasses.replace(story.settings, **updates))


def story_csa_config(story: Story, recommended: RecommendedSettings | None = None) -> CSAConfig:
    """The CSA settings a story runs with: the model's recommended ones, with the story's rate and regional
    prompts over them."""
    base = recommended or RecommendedSettings()
    return base.csa_config(rate=story.settings.rate, regional_prompts=story.settings.regional_prompts)


def _character_setting_names(bank_files: Sequence[str | Path]) -> list[str]:
    return sorted({name for path in bank_files for name in saved_character_settings(Path(path))})


def _panel_record(info: FrameInfo, caption: str, file: str) -> dict[str, Any]:
    return {
        "index": info.index,
        "file": file,
        "prompt": info.prompt,
        "negative_prompt": info.negative_prompt,
        "seed": info.seed,
        "characters": list(info.characters),
        "caption": caption,
        "role": info.role,
    }


def _same_panel(record: dict[str, Any], info: FrameInfo) -> bool:
    return (
        record.get("prompt") == info.prompt
        and record.get("negative_prompt") == info.negative_prompt
        and record.get("seed") == info.seed
        and tuple(record.get("characters", ())) == info.characters
    )


def save_panel(image: Image.Image, record: dict[str, Any], settings: dict[str, Any], path: Path) -> None:
    """A panel PNG carrying its prompt, negative prompt, seed, model and CSA settings as text chunks."""
    text = PngInfo()
    for key in ("prompt", "negative_prompt", "seed", "characters", "caption"):
        value = record[key]
        text.add_text(f"storydiffusion:{key}", value if isinstance(value, str) else json.dumps(value))
    text.add_text("storydiffusion:model", settings["model"])
    csa = {k: settings[k] for k in ("rate", "id_length", "steps", "guidance", "style", "bank_dtype")}
    text.add_text("storydiffusion:csa", json.dumps(csa))
    write_atomically(path, lambda target: image.save(target, format="PNG", pnginfo=text))


class Manifest:
    """`manifest.json`: the run's settings, every finished panel, the banks and the comic files."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"format": MANIFEST_FORMAT, "version": 1, "settings": settings, "panels": {}}
        self.data["banks"] = {}

    @classmethod
    def open(cls, out: Path, settings: dict[str, Any], overwrite: bool) -> Manifest:
        """The folder's manifest if it is a resumable run of these settings; refuses a different run."""
        manifest = cls(out / MANIFEST, settings)
        if overwrite or not manifest.path.exists():
            return manifest
        try:
            previous = json.loads(manifest.path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise StoryDiffusionError(f"{manifest.path} is not readable JSON ({error}); use --overwrite") from error
        if previous.get("format") != MANIFEST_FORMAT:
            raise StoryDiffusionError(f"{manifest.path} is not a storydiffusion run manifest; choose another --out")
        changed = [
            f"{key}: {previous['settings'].get(key)!r} -> {value!r}"
            for key, value in settings.items()
            if previous.get("settings", {}).get(key) != value
        ]
        if changed:
            raise StoryDiffusionError(
                f"{out} holds panels made with other settings ({'; '.join(changed)}); "
                "re-run with the same settings to resume, or use --overwrite or another --out"
            )
        manifest.data["panels"] = previous.get("panels", {})
        manifest.data["banks"] = previous.get("banks", {})
        return manifest

    def done(self, info: FrameInfo, out: Path) -> bool:
        record = self.data["panels"].get(str(info.index))
        return record is not None and _same_panel(record, info) and (out / record["file"]).is_file()

    def add_panel(self, record: dict[str, Any]) -> None:
        self.data["panels"][str(record["index"])] = record
        self.write()

    def write(self) -> None:
        text = json.dumps(self.data, indent=2, ensure_ascii=False) + "\n"
        write_atomically(self.path, lambda target: target.write_text(text))


def run_story(
    story: Story,
    out: str | Path,
    options: RunOptions | None = None,
    pipeline: StoryPipeline | None = None,
    bank_files: Sequence[str | Path] = (),
    on_panel: Callable[[int, Path], None] | None = None,
) -> RunResult:
    """Generate (or finish) `story` into the folder `out`; see the module docstring.

    `bank_files`: saved characters (`banks/Name.character.json` of an earlier run, or a full bank
    `Name.safetensors`) drawn from their files instead of new reference frames; their model, size, steps,
    guidance and CSA rate are the run's where the story sets none (`with_character_settings`).
    `on_panel(index, path)` is called as soon as a panel's file is written.
    """
    options = options or RunOptions()
    if options.bank_cache not in BANK_CACHES:
        raise StoryDiffusionError(f"--bank-cache {options.bank_cache!r} is not one of {BANK_CACHES}")
    out = Path(out)
    story = resolve_settings(story, options, bank_files, pipeline)  # before the settings are recorded
    model = story.settings.model or options.model
    recommended = model_recommended(model, pipeline)
    settings = run_settings(story, model, options, bank_files, pipeline)
    s = story.settings
    check_captions([panel.caption for panel in story.panels], options.layout)  # before minutes of drawing
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.open(out, settings, options.overwrite)
    for folder in (out, out / "banks"):  # what a run killed outright (SIGKILL) left mid-write: this run owns them
        remove_partials(folder)

    csa_config = story_csa_config(story, recommended)
    story_pipe = pipeline or load_story_pipeline(model, options, csa_config)
    frames = story.to_frames()
    infos = StoryPipeline.frame_infos(frames, seed=s.seed, same_initial_noise=s.same_initial_noise)
    skip = {info.index for info in infos if manifest.done(info, out)}

    # A saved bank is reused only when all of its character's reference panels are on disk, so a
    # resumed run draws exactly what an uninterrupted one would have.
    bank_settings = story_pipe.bank_settings(
        num_inference_steps=s.steps,
        guidance_scale=s.guidance,
        height=s.height,
        width=s.width,
        id_length=s.id_length,
    )
    given = load_bank_files(bank_files, bank_settings, story_pipe, options.bank_storage)
    references = StoryPipeline.reference_frames(frames, s.id_length, exclude=set(given))
    banks: dict[str, IdentityBank] = dict(given)
    for name, indices in references.items():
        path = out / "banks" / f"{name}.safetensors"
        if (
            path.is_file()
            and set(indices) <= skip
            and manifest.data["banks"].get(name, {}).get("references") == indices
        ):
            banks[name] = IdentityBank.load(path, expected=bank_settings, storage=options.bank_storage)

    def on_frame(info: FrameInfo, image: Image.Image) -> None:
        file = f"panel_{info.index:03d}.png"
        record = _panel_record(info, story.panels[info.index].caption, file)
        save_panel(image, record, settings, out / file)
        manifest.add_panel(record)
        if on_panel is not None:
            on_panel(info.index, out / file)

    def on_bank(name: str, bank: IdentityBank) -> None:
        character_file = f"banks/{character_file_name(name)}"
        CharacterRecipe.from_bank(bank).save(out / character_file)
        entry = {"character_file": character_file, "bytes": bank.nbytes, "references": references[name]}
        if options.bank_cache == "always" or (options.bank_cache == "auto" and bank.nbytes <= BANK_CACHE_LIMIT):
            bank.save(out / "banks" / f"{name}.safetensors")
            entry["file"] = f"banks/{name}.safetensors"
        else:  # an older cache of this character would not match its new character file
            (out / "banks" / f"{name}.safetensors").unlink(missing_ok=True)
        manifest.data["banks"][name] = entry
        manifest.write()

    if len(skip) < len(frames):
        story_pipe(
            story.character_descriptions(),
            frames,
            id_length=s.id_length,
            num_inference_steps=s.steps,
            guidance_scale=s.guidance,
            height=s.height,
            width=s.width,
            seed=s.seed,
            same_initial_noise=s.same_initial_noise,
            banks=banks,
            character_images=story.character_images(),
            skip_frames=skip,
            on_frame=on_frame,
            on_bank=on_bank,
            progress=options.progress,
        )

    # The comic is remade from the files on disk, so a resumed run's pages hold every panel.
    records = [manifest.data["panels"][str(i)] for i in range(len(frames))]
    images = [Image.open(out / r["file"]).convert("RGB") for r in records]
    pages = make_comic(images, [r["caption"] for r in records], options.layout)
    page_paths, pdf = save_comic(pages, out)
    manifest.data["comic"] = {"pages": [p.name for p in page_paths], "pdf": pdf.name}
    manifest.write()
    return RunResult(
        out=out,
        panels=[out / r["file"] for r in records],
        generated=sorted(set(range(len(frames))) - skip),
        skipped=sorted(skip),
        pages=page_paths,
        pdf=pdf,
        banks={name: out / entry["file"] for name, entry in manifest.data["banks"].items() if "file" in entry},
        characters={
            name: out / entry["character_file"]
            for name, entry in manifest.data["banks"].items()
            if "character_file" in entry
        },
    )
