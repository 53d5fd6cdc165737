"""`storydiffusion bench consistory+`: the public ConsiStory+ prompt set through `batch`, in several arms, scored.

Protocol (what 1Prompt1Story's benchmark script does, where it says): each of the 192 subjects is one story
(`story.prompt_sets`: the subject is its character, each setting a frame whose prompt is
`"{style} {subject} {setting}"`), every subject with the same seed (42, the script's fixed seed), SDXL at
its default size, 50 steps. Its first `id_length` (3) frames are its reference frames; the file fixes no
id_length, 3 is the public StoryDiffusion demo's default.

Arms (same seeds, same frames):
    vanilla           CSA at rate 0: no token borrowed, every image attends only to itself
    csa               Consistent Self-Attention, rate 0.5, the default schedule and layers
    csa_shared_noise  csa, every frame from the same initial noise (the public code's consistency prior)
    csa_masked        csa with `CSAConfig(subject_only=True)`: the reference images lend (and the bank keeps)
                      only the tokens inside each one's inferred subject mask. A ConsiStory+ frame names one
                      subject, so the multi-character masks (`subject_masks="infer"`, on in every arm) never
                      apply; subject-only sharing is where masks change a one-subject story.

Scores, from the panels on disk (so a resumed run scores every panel), each named with its scale:
    clip_t_clipscore   CLIP-T on the published scale: mean over frames of CLIPScore = 2.5 * max(cos, 0), the
                       cosine between CLIP(image) and CLIP(its benchmark prompt)
    clip_t_cosine      the same cosines, raw (a good match reads 0.25-0.40)
    clip_i_cosine      CLIP-I: mean over subjects of the mean pairwise cosine between the CLIP image embeddings
                       of its frames (the published scale: a raw cosine)
    dreamsim_distance  mean over subjects of the mean pairwise DreamSim distance (1 - cosine of DreamSim
                       embeddings; lower: more alike) of its frames, when the `dreamsim` package and its weights
                       load; else null and `dreamsim_note` says why
    s_per_image     seconds of drawing per image on one process (from each story's start to its last
                    panel written; runs killed midway are not timed)
    peak_mem_bytes  peak `torch.cuda.max_memory_allocated` over the arm's processes (weights included), on the
                    device each computed on (the GPU under --cpu-offload); null off CUDA, with `peak_rss_bytes`,
                    the processes' peak resident memory, beside it

The published protocol, and why CLIP-T is rescaled. ConsiStory (Tewel et al., "Training-Free Consistent
Text-to-Image Generation", SIGGRAPH 2024) measures prompt alignment with CLIPScore (Hessel et al., "CLIPScore: A
Reference-free Evaluation Metric for Image Captioning", EMNLP 2021: CLIP-S = w * max(cos, 0) with w = 2.5,
which stretches the usual image-text cosines to about 0 to 1), and subject consistency with DreamSim (Fu et al.
2023) and CLIP-I, the cosine between image embeddings, on images whose backgrounds were removed (CarveKit).
1Prompt1Story (Liu et al., "One-Prompt-One-Story", ICLR 2025, Table 1) scores ConsiStory+ that way: CLIP-T
0.89-0.91 is CLIPScore (2.5 x a cosine of ~0.36; raw cosines read 0.2-0.4, x100 would read 20-40); CLIP-I
0.82-0.91 and DreamSim 0.20-0.53 are a raw cosine and a raw distance (CLIP-I at 2.5 x cosine would put frames
of one subject at a cosine of ~0.35, far below what CLIP gives such pairs). So `PUBLISHED` holds those figures
under the keys of the scales they are on, and only CLIP-T needs a transform. Figures also depend on the CLIP
backbone (Hessel et al. use ViT-B/32; `--clip-model` picks ours, ViT-L/14 by default for real checkpoints) and
on the background removal, which is not done here: identity scores read higher than under the published
protocol.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from storydiffusion.app.batch import (
    BatchStory,
    PipelineCache,
    batch_state,
    collect_stories,
    read_runs,
    reset_peak_memory,
    run_batch,
)
from storydiffusion.app.runner import MANIFEST, TINY_RANDOM_MODELS, RunOptions
from storydiffusion.csa.attention import CSAConfig
from storydiffusion.errors import StoryDiffusionError
from storydiffusion.files import write_atomically

ARMS = ("vanilla", "csa", "csa_shared_noise", "csa_masked")
BENCH_JSON = "bench.json"
LARGE_CLIP = "openai/clip-vit-large-patch14"  # the usual CLIP-T / CLIP-I backbone for real checkpoints
CLIPSCORE_WEIGHT = 2.5  # Hessel et al. 2021: CLIPScore = 2.5 * max(cos, 0)
# ConsiStory+ scores published with 1Prompt1Story (SDXL, 50 steps), on the scales named by their keys
PUBLISHED = {
    "1Prompt1Story": {"clip_t_clipscore": 0.8942, "clip_i_cosine": 0.9117, "dreamsim_distance": 0.1993},
    "StoryDiffusion": {"clip_t_clipscore": 0.8877, "clip_i_cosine": 0.8755, "dreamsim_distance": 0.3212},
    "vanilla SDXL": {"clip_t_clipscore": 0.9074, "clip_i_cosine": 0.8165, "dreamsim_distance": 0.5292},
}
# the table's score columns: key, header (with its scale)
SCORE_COLUMNS = (
    ("clip_t_clipscore", "CLIP-T, CLIPScore 2.5·max(cos, 0) ↑"),
    ("clip_t_cosine", "CLIP-T, cosine ↑"),
    ("clip_i_cosine", "CLIP-I, cosine ↑"),
    ("dreamsim_distance", "DreamSim distance ↓"),
)
CLIP_BATCH = 32  # images embedded per CLIP call


@dataclass(frozen=True)
class BenchSettings:
    """What every arm shares (the arms differ in CSA settings and initial noise only)."""

    steps: int = 50  # the published table's
    guidance: float = 5.0  # diffusers' SDXL default
    seed: int = 42  # 1Prompt1Story's benchmark script: one fixed seed for every subject
    id_length: int = 3  # reference frames per subject (5-10 frames each)
    rate: float = 0.5  # CSA sampling rate of the csa arms
    width: int | None = None  # None: the model's default size (SDXL 1024)
    height: int | None = None
    limit: int | None = None  # the first `limit` subjects only (a smoke run)
    arms: tuple[str, ...] = ARMS

    def __post_init__(self) -> None:
        unknown = [arm for arm in self.arms if arm not in ARMS]
        if unknown or not self.arms:
            raise StoryDiffusionError(f"--arms {','.join(self.arms)!r}: choose among {', '.join(ARMS)}")


def arm_setup(arm: str, settings: BenchSettings) -> tuple[CSAConfig, dict[str, Any]]:
    """The arm's CSA settings and the story settings it overrides (see the module docstring)."""
    if arm == "vanilla":
        return CSAConfig(rate=0.0), {"rate": 0.0, "same_initial_noise": False}
    if arm == "csa":
        return CSAConfig(rate=settings.rate), {"rate": settings.rate, "same_initial_noise": False}
    if arm == "csa_shared_noise":
        return CSAConfig(rate=settings.rate), {"rate": settings.rate, "same_initial_noise": True}
    if arm == "csa_masked":
        return CSAConfig(rate=settings.rate, subject_only=True), {"rate": settings.rate, "same_initial_noise": False}
    raise StoryDiffusionError(f"arm {arm!r} is not one of {', '.join(ARMS)}")


def arm_stories(prompt_set: str | Path, arm: str, settings: BenchSettings) -> tuple[CSAConfig, list[BatchStory]]:
    config, overrides = arm_setup(arm, settings)
    shared = {
        "steps": settings.steps,
        "guidance": settings.guidance,
        "seed": settings.seed,
        "id_length": settings.id_length,
        "width": settings.width,
        "height": settings.height,
    }
    overrides = {**{k: v for k, v in shared.items() if v is not None}, **overrides}
    return config, collect_stories([prompt_set], overrides, settings.limit)


def default_clip(model: str) -> str:
    """`auto`: the tiny CLIP for the shipped and random tiny models, ViT-L/14 for real checkpoints."""
    return "tiny" if model == "tiny" or model in TINY_RANDOM_MODELS else LARGE_CLIP


# -- scoring -------------------------------------------------------------------------------------
def clipscore(cosine: float) -> float:
    """CLIPScore of one image and its text (Hessel et al. 2021): 2.5 * max(cos, 0), the published CLIP-T scale."""
    return CLIPSCORE_WEIGHT * max(cosine, 0.0)


def pairwise_mean(embeddings: Any) -> float:
    """Mean cosine similarity over all pairs of unit-norm rows (B >= 2)."""
    pairs = list(combinations(range(embeddings.shape[0]), 2))
    return sum(float(embeddings[i] @ embeddings[j]) for i, j in pairs) / len(pairs)


class DreamSimScorer:
    """Mean pairwise DreamSim distance (1 - cosine of DreamSim embeddings) of a set of images."""

    def __init__(self, model: Any, preprocess: Any, device: Any) -> None:
        self.model, self.preprocess, self.device = model, preprocess, device

    def mean_distance(self, images: Sequence[Any]) -> float:
        import torch

        with torch.no_grad():
            batch = torch.cat([self.preprocess(image) for image in images]).to(self.device)
            embeddings = torch.nn.functional.normalize(self.model.embed(batch).float(), dim=-1).cpu()
        return 1.0 - pairwise_mean(embeddings)


def load_dreamsim(device: Any, cache_dir: str | Path | None = None) -> tuple[DreamSimScorer | None, str | None]:
    """(scorer, None) when the `dreamsim` package and its weights load; else (None, why not)."""
    try:
        from dreamsim import dreamsim
    except ImportError:
        return None, (
            "DreamSim not measured: the dreamsim package is not installed (pip install dreamsim; "
            "it downloads its weights on first use, or reads them from --dreamsim-cache)"
        )
    try:
        kwargs = {"cache_dir": str(cache_dir)} if cache_dir is not None else {}
        model, preprocess = dreamsim(pretrained=True, device=str(device), **kwargs)
    except Exception as error:  # a download or file error of a third-party loader: said in the output, not hidden
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return None, f"DreamSim not measured: its weights could not be loaded ({reason}); give --dreamsim-cache"
    return DreamSimScorer(model, preprocess, device), None


def story_panels(folder: Path, item: BatchStory) -> list[Path]:
    """The story's panel files in frame order; refuses a story whose run is not finished."""
    try:
        panels = json.loads((folder / MANIFEST).read_text())["panels"]
        files = [folder / panels[str(i)]["file"] for i in range(len(item.story.panels))]
    except (OSError, ValueError, KeyError, TypeError):
        files = []
    if not files or not all(path.is_file() for path in files):
        raise StoryDiffusionError(
            f"{folder} does not hold all {len(item.story.panels)} panels of {item.source}; re-run the same "
            "command to finish it (it resumes)"
        )
    return files


def score_arm(
    folder: Path, stories: Sequence[BatchStory], clip: Any, dreamsim: DreamSimScorer | None, dreamsim_note: str | None
) -> dict[str, Any]:
    """One arm's scores from its folder (see the module docstring)."""
    import torch
    from PIL import Image

    clip_t: list[float] = []
    clip_i: list[float] = []
    distances: list[float] = []
    for item in stories:
        files = story_panels(folder / item.name, item)
        images = [Image.open(path).convert("RGB") for path in files]
        prompts = [panel.prompt for panel in item.story.panels]  # the benchmark's prompt, without any style
        chunks = [images[i : i + CLIP_BATCH] for i in range(0, len(images), CLIP_BATCH)]
        image_embeddings = torch.cat([clip.image_embeddings(chunk) for chunk in chunks])  # (frames, D), unit norm
        text_embeddings = clip.text_embeddings(prompts)
        clip_t.extend((image_embeddings * text_embeddings).sum(-1).tolist())
        clip_i.append(pairwise_mean(image_embeddings))
        if dreamsim is not None:
            distances.append(dreamsim.mean_distance(images))

    runs = [run for item in stories for run in read_runs(folder / item.name)]
    timed = sum(int(run.get("generated", 0)) for run in runs)
    seconds = sum(float(run.get("seconds", 0.0)) for run in runs)
    peaks = [run["peak_mem_bytes"] for run in runs if run.get("peak_mem_bytes") is not None]
    rss = [run["peak_rss_bytes"] for run in runs if run.get("peak_rss_bytes") is not None]
    result: dict[str, Any] = {
        "clip_t_clipscore": sum(clipscore(cosine) for cosine in clip_t) / len(clip_t),  # per image, then the mean
        "clip_t_cosine": sum(clip_t) / len(clip_t),
        "clip_i_cosine": sum(clip_i) / len(clip_i),
        "dreamsim_distance": sum(distances) / len(distances) if dreamsim is not None else None,
        "s_per_image": seconds / timed if timed else None,
        "peak_mem_bytes": max(peaks) if peaks else None,
        "peak_rss_bytes": max(rss) if rss else None,
        "subjects": len(stories),
        "frames": len(clip_t),
        "images_timed": timed,
    }
    if dreamsim is None:
        result["dreamsim_note"] = dreamsim_note
    if not timed:
        result["s_per_image_note"] = "no run of this arm was timed (every panel was drawn by a run that was killed)"
    if not peaks:
        result["peak_mem_note"] = (
            "no CUDA device drew this arm: peak accelerator memory is torch.cuda.max_memory_allocated; "
            "peak_rss_bytes is the processes' peak resident memory"
        )
    return result


# -- the run -------------------------------------------------------------------------------------
def run_bench(
    prompt_set: str | Path,
    out: str | Path,
    settings: BenchSettings,
    options: RunOptions,
    clip_model: str = "auto",
    dreamsim_cache: str | Path | None = None,
    state: Any = None,
) -> dict[str, Any] | None:
    """Draw every arm through `run_batch` (this process's share), then, on process 0, score them.

    Returns `{arm: {clip_t_clipscore, clip_t_cosine, clip_i_cosine, dreamsim_distance, s_per_image,
    peak_mem_bytes, ...}}` on process 0, None on the others. Re-running resumes every arm."""
    from storydiffusion.clip_score import ClipScorer
    from storydiffusion.world.models import resolve_clip

    state = state if state is not None else batch_state()
    out = Path(out)
    pipelines = PipelineCache(options)
    arms: dict[str, list[BatchStory]] = {}
    for arm in settings.arms:
        config, stories = arm_stories(prompt_set, arm, settings)
        reset_peak_memory(state.device)  # each arm's peak on its own (the weights stay counted)
        run_batch(stories, out / arm, options, state=state, csa_config=config, pipelines=pipelines)
        arms[arm] = stories
    pipelines.release()
    if not state.is_main_process:
        return None
    clip = ClipScorer(resolve_clip(default_clip(options.model) if clip_model == "auto" else clip_model), state.device)
    dreamsim, note = load_dreamsim(state.device, dreamsim_cache)
    return {arm: score_arm(out / arm, stories, clip, dreamsim, note) for arm, stories in arms.items()}


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _bytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def markdown_table(result: Mapping[str, Mapping[str, Any]], header: str = "") -> str:
    """The arms' scores as a markdown table (each score column names its scale), the published ConsiStory+ rows
    below on the same scales, and notes."""
    lines = [header, ""] if header else []
    titles = [title for _, title in SCORE_COLUMNS]
    lines += [
        f"| arm | {' | '.join(titles)} | s / image | peak accelerator memory | peak RSS |",
        "|---" * (len(titles) + 4) + "|",
    ]
    for arm, scores in result.items():
        figures = " | ".join(_number(scores.get(key)) for key, _ in SCORE_COLUMNS)
        lines.append(
            f"| {arm} | {figures} | {_number(scores['s_per_image'], 2)} | {_bytes(scores['peak_mem_bytes'])} "
            f"| {_bytes(scores.get('peak_rss_bytes'))} |"
        )
    for name, published in PUBLISHED.items():
        figures = " | ".join(f"{published[key]:.3f}" if key in published else "—" for key, _ in SCORE_COLUMNS)
        lines.append(f"| *published: {name}* | {figures} | | | |")
    notes = dict.fromkeys(
        note for scores in result.values() for key, note in scores.items() if key.endswith("_note") and note
    )
    lines += [""] + [f"- {note}" for note in notes] if notes else []
    return "\n".join(lines) + "\n"


def write_result(result: Mapping[str, Any], path: Path, header: str = "") -> tuple[Path, Path]:
    """`path` (JSON) and the markdown table beside it (`.md`); both written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1) + "\n"
    write_atomically(path, lambda target: target.write_text(text))
    table = path.with_suffix(".md")
    markdown = markdown_table(result, header)
    write_atomically(table, lambda target: target.write_text(markdown))
    return path, table
