"""A saved character that travels small and exact: the recipe that regenerates its identity bank.

A character file (`Name.character.json`, a few KiB) holds what the character's bank was made from: its
reference prompts, negative prompts and seeds, the token sampler's seed, size, steps, guidance, the other
pipeline arguments, the CSA settings, the bank's storage dtype and compaction, and the settings the bank
is valid for (model, UNet fingerprint and weights probe, scheduler class and config, LoRA adapters...).
Reloading it runs the character's reference phase again on exactly those inputs: on the same software and
hardware the bank comes out bit for bit the same — its sha256 digest is recorded, and checked — and so
does every frame drawn from it. The full bank (`Name.safetensors`) is an optional cache beside it.

    recipe = CharacterRecipe.from_bank(out.banks["Bob"]); recipe.save("Bob.character.json")
    bob = CharacterRecipe.load("Bob.character.json").regenerate(story).bank   # the same bank again
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from storydiffusion.csa.attention import CSAConfig, CSASchedule
from storydiffusion.csa.bank import (
    BankCompaction,
    BankSettings,
    BankStorage,
    IdentityBank,
    as_storage,
    check_bank_settings,
)
from storydiffusion.errors import BankMismatchError, StoryDiffusionError
from storydiffusion.files import write_atomically
from storydiffusion.pipelines.frames import FrameInfo

if TYPE_CHECKING:  # characters are made by a StoryPipeline, which imports this module: never at run time
    from storydiffusion.pipelines.story_pipeline import StoryPipeline

CHARACTER_FORMAT = "storydiffusion.character"
CHARACTER_FORMAT_VERSION = 1
CHARACTER_SUFFIX = ".character.json"
# arguments that report progress rather than decide pixels: a recipe leaves them out
_NOT_PIXELS = frozenset({"callback_on_step_end", "callback_on_step_end_tensor_inputs", "callback", "callback_steps"})
# arguments a recipe holds in fields of its own (output_type changes no bank: the bank is filled in the loop)
_OWN_FIELDS = frozenset({"num_inference_steps", "guidance_scale", "height", "width", "output_type"})


# -- CSA settings as JSON ----------------------------------------------------------------------------
def csa_config_to_json(config: CSAConfig) -> dict[str, Any]:
    """A `CSAConfig` as plain JSON values (tuples as lists, rate levels as string keys)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _tuples(value: Any) -> Any:
    return tuple(_tuples(item) for item in value) if isinstance(value, list) else value


def csa_config_from_json(data: Mapping[str, Any], source: str = "character file") -> CSAConfig:
    """Inverse of `csa_config_to_json`; refuses settings this version does not know."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(CSAConfig)})
    if unknown:
        raise StoryDiffusionError(
            f"{source}: field csa holds settings {unknown} this storydiffusion does not know; "
            "update storydiffusion or regenerate the character"
        )
    values = {name: _tuples(value) for name, value in data.items()}
    if isinstance(values.get("rate"), Mapping):
        values["rate"] = {int(level): float(rate) for level, rate in values["rate"].items()}
    if isinstance(values.get("schedule"), Mapping):
        values["schedule"] = CSASchedule(**values["schedule"])
    return CSAConfig(**values)


# -- the recipe --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReferenceFrame:
    """One reference frame of a character: what its image was made from."""

    prompt: str  # the full prompt (style applied, description substituted)
    negative_prompt: str
    seed: int  # its initial noise's seed


@dataclass(frozen=True)
class CharacterRecipe:
    """Everything a character's identity bank is made from; `regenerate` makes the bank again."""

    character: str
    description: str  # for subject-only sharing: the description's tokens find the subject
    references: tuple[ReferenceFrame, ...]
    sampler_seed: int  # CSA's token sampler (derived from the story seed and the character's place in it)
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    csa: Mapping[str, Any]  # the CSAConfig of the reference phase, as JSON
    bank_dtype: str
    settings: BankSettings  # model, UNet fingerprint and weights probe, scheduler and its config...
    compaction: Mapping[str, Any] = field(default_factory=dict)  # BankCompaction, as JSON
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=dict)  # the other arguments of the wrapped pipeline
    unrecorded: tuple[str, ...] = ()  # arguments a JSON file cannot hold (control images...): no regeneration
    bank_digest: str = ""  # sha256 of the bank the reference phase wrote ("" unknown)
    software: Mapping[str, str] = field(default_factory=dict)  # torch, diffusers, device, dtype: why a bank may differ
    # a character given by pictures (no reference frames): each fitted picture's pixel digest, the PNG files
    # beside the character file that hold them, the negative prompt and the seed of the noise they were read at
    pictures: tuple[str, ...] = ()
    picture_files: tuple[str, ...] = ()
    negative_prompt: str = ""
    noise_seed: int = 0
    # the pictures themselves (PIL images), carried from the bank or read from `picture_files`; not in the JSON
    picture_images: tuple[Any, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def from_bank(cls, bank: IdentityBank) -> CharacterRecipe:
        """The recipe a `StoryPipeline` bank carries, with the bank's digest."""
        if bank.recipe is None:
            raise StoryDiffusionError(
                f"the identity bank of {bank.character!r} carries no recipe (made by hand, or loaded from a file "
                "written before character files existed); save the bank itself with bank.save(...)"
            )
        recipe = cls.from_dict({**bank.recipe, "bank_digest": bank.digest})
        return dataclasses.replace(recipe, picture_images=tuple(getattr(bank, "pictures", None) or ()))

    # -- JSON ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(dataclasses.replace(self, picture_images=()))
        del data["picture_images"]
        data["settings"] = dataclasses.asdict(self.settings)
        return {"format": CHARACTER_FORMAT, "version": CHARACTER_FORMAT_VERSION, **json.loads(json.dumps(data))}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "character recipe") -> CharacterRecipe:
        data = {k: v for k, v in data.items() if k not in ("format", "version")}
        names = {f.name for f in dataclasses.fields(cls)}
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing, unknown = sorted(required - set(data)), sorted(set(data) - names)
        if missing or unknown:
            problem = f"missing field {missing[0]!r}" if missing else f"unknown field {unknown[0]!r}"
            raise StoryDiffusionError(f"{source}: {problem}; regenerate the character file with this storydiffusion")
        try:
            data["references"] = tuple(ReferenceFrame(**reference) for reference in data["references"])
            data["settings"] = BankSettings.from_json(json.dumps(data["settings"]))
            data["unrecorded"] = tuple(data.get("unrecorded", ()))
            data["pictures"] = tuple(data.get("pictures", ()))
            data["picture_files"] = tuple(data.get("picture_files", ()))
            return cls(**data)
        except (TypeError, ValueError) as error:
            raise StoryDiffusionError(f"{source}: a malformed field ({error}); regenerate the character file") from None

    def save(self, path: str | Path) -> Path:
        """Write the character file (through a temporary name: never half a file); a picture character's
        pictures go beside it as PNG files (`Name.picture-1.png`, ...), which it names."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        recipe = self
        if self.pictures:
            if len(self.picture_images) != len(self.pictures):
                raise StoryDiffusionError(
                    f"the recipe of {self.character!r} holds {len(self.pictures)} picture digests but "
                    f"{len(self.picture_images)} pictures; make it with CharacterRecipe.from_bank(bank)"
                )
            stem = path.name.removesuffix(CHARACTER_SUFFIX) if path.name.endswith(CHARACTER_SUFFIX) else path.stem
            names = tuple(f"{stem}.picture-{i + 1}.png" for i in range(len(self.pictures)))
            for name, image in zip(names, self.picture_images):
                write_atomically(path.with_name(name), lambda target, image=image: image.save(target, format="PNG"))
            recipe = dataclasses.replace(self, picture_files=names)
        text = json.dumps(recipe.to_dict(), indent=1, ensure_ascii=False) + "\n"
        write_atomically(path, lambda target: target.write_text(text, encoding="utf-8"))
        return path

    @classmethod
    def load(cls, path: str | Path) -> CharacterRecipe:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise StoryDiffusionError(f"cannot read character file {path}: {error.strerror or error}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise StoryDiffusionError(f"character file {path} is not JSON ({error})") from None
        if not isinstance(data, dict) or data.get("format") != CHARACTER_FORMAT:
            raise StoryDiffusionError(f"{path} is not a storydiffusion character file (format {CHARACTER_FORMAT!r})")
        if data.get("version") != CHARACTER_FORMAT_VERSION:
            raise StoryDiffusionError(
                f"character file {path} has version {data.get('version')!r}; this storydiffusion reads version "
                f"{CHARACTER_FORMAT_VERSION}: regenerate the character"
            )
        recipe = cls.from_dict(data, source=f"character file {path}")
        return recipe._with_pictures_beside(path) if recipe.pictures else recipe

    def _with_pictures_beside(self, path: Path) -> CharacterRecipe:
        """The recipe with its pictures read from the PNG files beside the character file, each checked against
        its digest (a changed picture would make another character)."""
        from PIL import Image

        from storydiffusion.pipelines.pictures import pixels_digest

        if len(self.picture_files) != len(self.pictures):
            raise BankMismatchError(
                f"character file {path}: field picture_files names {len(self.picture_files)} files for "
                f"{len(self.pictures)} pictures; save the character again"
            )
        images = []
        for index, (name, digest) in enumerate(zip(self.picture_files, self.pictures)):
            file = path.with_name(name)
            try:
                with Image.open(file) as opened:
                    image = opened.convert("RGB")
            except OSError as error:
                raise StoryDiffusionError(
                    f"character file {path}: cannot read its picture {index + 1} ({file}): {error}; keep the "
                    "character's PNG files beside its character file"
                ) from None
            if pixels_digest(image) != digest:
                raise BankMismatchError(
                    f"character file {path}: field pictures[{index}]: {file} is not the picture the character was "
                    "made from (its pixels changed); restore it or make the character again from the new picture"
                )
            images.append(image)
        return dataclasses.replace(self, picture_images=tuple(images))

    # -- regeneration ----------------------------------------------------------------------------------
    def regenerate(
        self, story: StoryPipeline, *, output_type: str = "latent", source: str | None = None
    ) -> RegeneratedCharacter:
        """Run the character's reference phase again on `story`'s model: the bank (stored as `story` stores
        banks, in the recipe's dtype and compaction) and the reference images (`output_type`; latents by
        default, which skips decoding and changes nothing in the bank).

        Refuses, naming the field, a model, UNet, scheduler or adapters other than the recipe's."""
        where = source or "character recipe"
        if self.unrecorded:
            raise StoryDiffusionError(
                f"{where}: {self.character!r} was made with pipeline arguments a character file cannot hold "
                f"({', '.join(self.unrecorded)}), so it cannot be regenerated; reuse its full bank file instead"
            )
        clone = type(story)(  # a StoryPipeline like `story`, with the recipe's CSA settings and bank storage
            story.pipe,
            csa_config_from_json(self.csa, where),
            bank_dtype=self.bank_dtype,
            bank_device=story.bank_device,
            bank_storage=story.bank_storage,
            bank_compaction=BankCompaction(**self.compaction),
        )
        settings = clone.bank_settings(
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            height=self.height,
            width=self.width,
            id_length=len(self.references),
        )
        problems = self.settings.mismatches(settings)
        if problems:
            raise BankMismatchError(
                f"{where}: {self.character!r} was made with another model or scheduler — "
                + "; ".join(problems).replace("bank=", "recipe=")
                + f". Load the model it was made with ({self.settings.model or 'see its settings'}) to regenerate it"
            )
        if self.pictures:
            return self._regenerate_from_pictures(clone, settings, where)
        infos = [
            FrameInfo(i, reference.prompt, reference.negative_prompt, reference.seed, (self.character,), "reference")
            for i, reference in enumerate(self.references)
        ]
        images: list[Any] = [None] * len(infos)
        common = dict(
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            height=self.height,
            width=self.width,
            output_type=output_type,
            **self.pipeline_kwargs,
        )
        with clone.csa.installed(clone.denoiser):
            indices = list(range(len(infos)))
            bank = clone.reference_phase(
                self.character, self.description, indices, infos, self.sampler_seed, settings, common, images
            )
            clone.csa.reset()
        return RegeneratedCharacter(bank, images, _check_digest(self, bank, story, where))

    def _regenerate_from_pictures(self, clone: StoryPipeline, settings: BankSettings, where: str):
        from storydiffusion.pipelines.pictures import fit_picture

        if len(self.picture_images) != len(self.pictures):
            raise StoryDiffusionError(
                f"{where}: {self.character!r} is made from {len(self.pictures)} pictures, and "
                f"{len(self.picture_images)} are at hand; load it with CharacterRecipe.load(path) beside its PNG files"
            )
        pictures = [
            fit_picture(image, self.height, self.width, f"picture {i + 1} of {self.character!r}")[0]
            for i, image in enumerate(self.picture_images)
        ]
        for index, (picture, digest) in enumerate(zip(pictures, self.pictures)):
            if picture.digest != digest:
                raise BankMismatchError(
                    f"{where}: field pictures[{index}]: picture {index + 1} of {self.character!r} is not the one it "
                    "was made from; restore it or make the character again"
                )
        common = dict(
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            height=self.height,
            width=self.width,
            output_type="latent",
            **self.pipeline_kwargs,
        )
        with clone.csa.installed(clone.denoiser):
            bank = clone.picture_bank(
                self.character, self.description, pictures, settings, common, self.negative_prompt,
                self.sampler_seed, self.noise_seed,
            )  # fmt: skip
            clone.csa.reset()
        images = [picture.image for picture in pictures]
        return RegeneratedCharacter(bank, images, _check_digest(self, bank, clone, where))


def _check_digest(recipe: CharacterRecipe, bank: IdentityBank, story: StoryPipeline, where: str) -> bool | None:
    """Whether the regenerated bank is the recorded one (None: none recorded); warns, saying why, when not."""
    exact = bank.digest == recipe.bank_digest if recipe.bank_digest else None
    if exact is False:
        now = software_info(story)
        differs = [f"{k}: then {v!r}, now {now.get(k)!r}" for k, v in recipe.software.items() if now.get(k) != v]
        warnings.warn(
            f"{where}: the regenerated bank of {recipe.character!r} differs from the original "
            f"({'; '.join(differs) or 'same software and device: nondeterministic kernels?'}); its frames will "
            "be close to the original run's, not equal",
            stacklevel=3,
        )
    return exact


@dataclass
class RegeneratedCharacter:
    bank: IdentityBank
    images: list[Any]  # the reference images again (latents by default)
    exact: bool | None  # bank digest equal to the recorded one (None: the recipe recorded none)


def software_info(story: StoryPipeline) -> dict[str, str]:
    """What besides the recipe decides a bank's bits: library versions, device and dtype."""
    import diffusers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": story.device.type,
        "dtype": str(story.denoiser.dtype).removeprefix("torch."),
    }


def character_recipe(
    story: StoryPipeline,
    name: str,
    description: str,
    infos: Sequence[FrameInfo],
    sampler_seed: int,
    settings: BankSettings,
    common: Mapping[str, Any],
    control_images: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """The recipe of the bank a reference phase with these inputs writes (no digest yet), as JSON."""
    kwargs, unrecorded = {}, ["control_images"] if control_images is not None else []
    for key, value in common.items():
        if key in _OWN_FIELDS or key in _NOT_PIXELS:
            continue
        try:
            kwargs[key] = json.loads(json.dumps(value))
        except (TypeError, ValueError):  # images, tensors, embeddings: not for a small text file
            unrecorded.append(key)
    recipe = CharacterRecipe(
        character=name,
        description=description,
        references=tuple(ReferenceFrame(info.prompt, info.negative_prompt, info.seed) for info in infos),
        sampler_seed=sampler_seed,
        num_inference_steps=int(common["num_inference_steps"]),
        guidance_scale=float(common["guidance_scale"]),
        height=int(common["height"]),
        width=int(common["width"]),
        csa=csa_config_to_json(story.csa.config),
        bank_dtype=story.bank_dtype,
        settings=settings,
        compaction=dataclasses.asdict(story.bank_compaction),
        pipeline_kwargs=kwargs,
        unrecorded=tuple(unrecorded),
        software=software_info(story),
    )
    data = recipe.to_dict()
    del data["bank_digest"]  # known once the phase has run: `from_bank` adds it
    return data


def picture_recipe(
    story: StoryPipeline,
    name: str,
    description: str,
    pictures: Sequence[Any],
    negative_prompt: str,
    sampler_seed: int,
    noise_seed: int,
    settings: BankSettings,
    common: Mapping[str, Any],
    control_images: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """The recipe of a bank made from pictures (`pipelines.pictures.Picture`, fitted), as JSON (no digest yet)."""
    data = character_recipe(story, name, description, (), sampler_seed, settings, common, control_images)
    digests = [picture.digest for picture in pictures]
    data.update(pictures=digests, negative_prompt=negative_prompt, noise_seed=noise_seed)
    return data


# -- files: a character file or a full bank ----------------------------------------------------------
def is_character_file(path: str | Path) -> bool:
    return Path(path).name.endswith(".json")


def character_file_name(name: str) -> str:
    return f"{name}{CHARACTER_SUFFIX}"


def cache_beside(path: str | Path) -> Path:
    """Where a character file's optional full bank lies: `Name.safetensors` in the same folder."""
    path = Path(path)
    stem = path.name.removesuffix(CHARACTER_SUFFIX) if path.name.endswith(CHARACTER_SUFFIX) else path.stem
    return path.with_name(f"{stem}.safetensors")


def saved_character_name(path: str | Path) -> str:
    """The character a character file or a bank file holds."""
    if is_character_file(path):
        return CharacterRecipe.load(path).character
    return IdentityBank.character_in(path)


def load_character(
    path: str | Path,
    story: StoryPipeline,
    expected: BankSettings,
    storage: BankStorage | str = "memory",
) -> IdentityBank:
    """A saved character's bank for a run with settings `expected`: a bank file is read; a character file's
    bank is read from the cache beside it when that holds the same bank (equal digest), else regenerated."""
    if not is_character_file(path):
        return IdentityBank.load(path, expected=expected, storage=storage)
    recipe = CharacterRecipe.load(path)
    check_bank_settings(recipe.character, recipe.settings, expected, source=str(path))  # before minutes of work
    cache = cache_beside(path)
    if recipe.bank_digest and cache.is_file():
        metadata = IdentityBank.read_metadata(cache)
        if metadata.get("digest") == recipe.bank_digest and metadata.get("character") == recipe.character:
            return IdentityBank.load(cache, expected=expected, storage=as_storage(storage))
    bank = recipe.regenerate(story, source=f"character file {path}").bank
    bank.check_compatible(expected, source=str(path))
    return bank
