"""The `storydiffusion` command end to end on a tiny model folder: files, metadata, resume, errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import run_cli
from PIL import Image

from storydiffusion.app import runner

STORY_YAML = """\
characters:
  Bob: a man with red hair, black suit
  Ann: a woman with a green hat
frames:
  - "[Bob] at home #Bob at home."
  - "[Bob] on a bus"
  - "[Ann] reads a book #Ann reads."
  - "[Ann] in the rain"
  - "[Bob] and [Ann] dance #They dance."
  - "[NC] an empty street"
style: Comic book
seed: 3
steps: 2
size: 64x64
id_length: 2
"""
FAST = ["--device", "cpu"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from storydiffusion.pipelines.tiny_random import tiny_sd_pipeline

    path = tmp_path_factory.mktemp("model") / "tiny-sd"
    tiny_sd_pipeline(seed=0).save_pretrained(path)
    return path


@pytest.fixture
def story_file(tmp_path):
    path = tmp_path / "story.yaml"
    path.write_text(STORY_YAML)
    return path


def panel_pixels(out):
    return [np.asarray(Image.open(p)) for p in sorted(out.glob("panel_*.png"))]


def test_story_file_end_to_end(monkeypatch, capsys, tmp_path, model_dir, story_file):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(monkeypatch, capsys, "story", story_file, "--model", model_dir, "--out", out, *FAST)
    assert code == 0, stderr
    assert "6 panels generated" in stdout
    panels = sorted(out.glob("panel_*.png"))
    assert len(panels) == 6
    first = Image.open(panels[0])
    assert first.size == (64, 64)
    assert first.text["storydiffusion:prompt"].startswith("comic a man with red hair, black suit at home")
    assert first.text["storydiffusion:seed"] == "3" and first.text["storydiffusion:model"] == str(model_dir)
    assert json.loads(first.text["storydiffusion:csa"])["rate"] == 0.5
    assert "photograph" in first.text["storydiffusion:negative_prompt"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [manifest["panels"][str(i)]["file"] for i in range(6)] == [p.name for p in panels]
    assert manifest["panels"]["4"]["characters"] == ["Bob", "Ann"] and manifest["panels"]["0"]["role"] == "reference"
    assert manifest["panels"]["1"]["caption"] == "Bob on a bus"
    assert (out / "banks" / "Bob.safetensors").is_file() and (out / "banks" / "Ann.safetensors").is_file()
    assert (out / "page_01.png").is_file() and (out / "comic.pdf").read_bytes().startswith(b"%PDF")


def test_text_boxes_end_to_end(monkeypatch, capsys, tmp_path, model_dir):
    (tmp_path / "chars.txt").write_text("[Bob] a man with red hair\n")
    (tmp_path / "frames.txt").write_text("[Bob] at home\n[Bob] on a bus\n[NC] a street #The end.\n")
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        monkeypatch, capsys, "story", "--characters", tmp_path / "chars.txt", "--frames", tmp_path / "frames.txt",
        "--model", model_dir, "--out", out, "--steps", "2", "--width", "64", "--height", "64", "--id-length", "2",
        "--layout", "grid", "--rows", "1", "--cols", "3", *FAST,
    )  # fmt: skip
    assert code == 0, stderr
    assert len(list(out.glob("panel_*.png"))) == 3 and (out / "comic.pdf").is_file()


def test_a_saved_character_is_reused_with_bank(monkeypatch, capsys, tmp_path, model_dir):
    (tmp_path / "chars.txt").write_text("[Bob] a man with red hair\n")
    (tmp_path / "first.txt").write_text("[Bob] at home\n[Bob] on a bus\n")
    (tmp_path / "later.txt").write_text("[Bob] at the beach\n[NC] a street\n")
    common = [
        "--characters",
        tmp_path / "chars.txt",
        "--model",
        model_dir,
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--id-length",
        "2",
        *FAST,
    ]
    first = tmp_path / "first"
    assert run_cli(monkeypatch, capsys, "story", "--frames", tmp_path / "first.txt", "--out", first, *common)[0] == 0
    bank = first / "banks" / "Bob.safetensors"
    later = tmp_path / "later"
    code, stdout, stderr = run_cli(
        monkeypatch, capsys, "story", "--frames", tmp_path / "later.txt", "--out", later, "--bank", bank, *common
    )
    assert code == 0, stderr
    manifest = json.loads((later / "manifest.json").read_text())
    assert manifest["panels"]["0"]["role"] != "reference"  # Bob came from the bank, not new reference frames
    code, _, stderr = run_cli(
        monkeypatch,
        capsys,
        "story",
        "--frames",
        tmp_path / "later.txt",
        "--out",
        tmp_path / "x",
        "--bank",
        tmp_path / "missing.safetensors",
        *common,
    )
    assert code == 1 and "missing.safetensors" in stderr


def test_resume_after_an_interrupted_run(monkeypatch, capsys, tmp_path, model_dir, story_file):
    whole = tmp_path / "whole"
    assert run_cli(monkeypatch, capsys, "story", story_file, "--model", model_dir, "--out", whole, *FAST)[0] == 0

    interrupted = tmp_path / "interrupted"
    real_save = runner.save_panel
    calls = []

    def crash_on_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(runner, "save_panel", crash_on_fourth)
    code, _, _ = run_cli(monkeypatch, capsys, "story", story_file, "--model", model_dir, "--out", interrupted, *FAST)
    assert code != 0  # Ctrl-C after three panels
    assert len(list(interrupted.glob("panel_*.png"))) == 3 and not list(interrupted.glob(".*partial"))
    monkeypatch.setattr(runner, "save_panel", real_save)

    code, stdout, stderr = run_cli(monkeypatch, capsys, "story", story_file, "--model", model_dir, "--out", interrupted,
                                   *FAST)  # fmt: skip
    assert code == 0, stderr
    assert "3 already there" in stdout
    manifest = json.loads((interrupted / "manifest.json").read_text())
    assert sorted(manifest["panels"]) == [str(i) for i in range(6)]
    assert len(list(interrupted.glob("panel_*.png"))) == 6
    for resumed, uninterrupted in zip(panel_pixels(interrupted), panel_pixels(whole)):
        assert np.array_equal(resumed, uninterrupted)  # same pixels as a run that never stopped

    code, stdout, _ = run_cli(monkeypatch, capsys, "story", story_file, "--model", model_dir, "--out", interrupted,
                              *FAST)  # fmt: skip
    assert code == 0 and "0 panels generated, 6 already there" in stdout


def test_changed_setting_is_reported_not_mixed(monkeypatch, capsys, tmp_path, model_dir, story_file):
    out = tmp_path / "out"
    assert run_cli(monkeypatch, capsys, "story", story_file, "--model", model_dir, "--out", out, *FAST)[0] == 0
    before = panel_pixels(out)
    code, _, stderr = run_cli(
        monkeypatch, capsys, "story", story_file, "--model", model_dir, "--out", out, "--steps", "3", *FAST
    )
    assert code == 1 and "steps: 2 -> 3" in stderr and "--overwrite" in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert all(np.array_equal(a, b) for a, b in zip(before, panel_pixels(out)))
    code, stdout, _ = run_cli(
        monkeypatch, capsys, "story", story_file, "--model", model_dir, "--out", out, "--steps", "3", "--overwrite",
        *FAST,
    )  # fmt: skip
    assert code == 0 and "6 panels generated" in stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["story", "{story}", "--steps", "0"], 2, "--steps"),
        (["story", "{story}", "--style", "Watercolor"], 1, "Watercolor"),
        (["story", "{missing}"], 1, "missing.yaml"),
        (["story", "{story}", "--frames", "{story}"], 1, "not both"),
        (["story"], 1, "give either a STORY file"),
        (["story", "{story}", "--model", "{tmp}/no-such-model"], 1, "cannot load model"),
        (["story", "{story}", "--device", "tpu"], 1, "--device"),
        (["story", "{story}", "--cpu-offload"], 1, "--cpu-offload"),
        (["story", "{story}", "--layout", "spiral"], 1, "spiral"),
        (["story", "{story}", "--rate", "1.5"], 2, "--rate"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(monkeypatch, capsys, tmp_path, story_file, args, code, message):
    fill = {"story": story_file, "missing": tmp_path / "missing.yaml", "tmp": tmp_path}
    args = [a.format(**fill) for a in args]
    got, _, stderr = run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "out")
    assert got == code, stderr
    assert message in stderr and "Traceback" not in stderr
    if code == 1:
        assert len(stderr.strip().splitlines()) == 1


def test_story_format_error_names_file_and_line(monkeypatch, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(STORY_YAML.replace('"[NC] an empty street"', '"[Eve] waves"'))
    code, _, stderr = run_cli(monkeypatch, capsys, "story", bad, "--out", tmp_path / "out", *FAST)
    assert code == 1 and "bad.yaml" in stderr and "line 10" in stderr and "Eve" in stderr


def test_demo_runs_offline(monkeypatch, capsys, tmp_path):
    code, stdout, stderr = run_cli(monkeypatch, capsys, "demo", "--out", tmp_path / "demo", "--steps", "2")
    assert code == 0, stderr
    assert len(list((tmp_path / "demo").glob("panel_*.png"))) == 6 and (tmp_path / "demo" / "comic.pdf").is_file()
    settings = json.loads((tmp_path / "demo" / "manifest.json").read_text())["settings"]
    assert settings["rate"] == 1.0  # the tiny model's best rate (benchmarks/tiny_csa_sweep.py)


def test_story_file_pictures_make_the_character_and_a_changed_picture_is_not_mixed(
    monkeypatch, capsys, tmp_path, model_dir
):
    """`images:` in a story file (relative to it) make the character's bank: it has no reference frames, its
    frames read the picture, and a resumed run with another picture is reported, not mixed."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "bob.png")
    story = STORY_YAML.replace("  Bob: a man with red hair, black suit", "  Bob: {description: a man, images: bob.png}")
    path = tmp_path / "story.yaml"
    path.write_text(story)
    out = tmp_path / "out"
    code, _, stderr = run_cli(monkeypatch, capsys, "story", path, "--model", model_dir, "--out", out, *FAST)
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["panels"]["0"]["role"] == "frame" and manifest["panels"]["2"]["role"] == "reference"
    recorded = manifest["settings"]["pictures"]
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "bob.png")
    code, _, stderr = run_cli(monkeypatch, capsys, "story", path, "--model", model_dir, "--out", out, *FAST)
    assert code != 0 and "pictures" in stderr
    code, _, stderr = run_cli(
        monkeypatch, capsys, "story", path, "--model", model_dir, "--out", out, "--overwrite", *FAST
    )
    assert code == 0, stderr
    assert json.loads((out / "manifest.json").read_text())["settings"]["pictures"] != recorded


def test_character_image_option_draws_the_character_as_the_story_files_images_do(
    monkeypatch, capsys, tmp_path, model_dir
):
    """`--character-image Bob=bob.png` gives the same panels as `images: bob.png` in the story file, and bad
    values are one line naming the option."""
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "bob.png")
    in_file = tmp_path / "in_file.yaml"
    in_file.write_text(
        STORY_YAML.replace(
            "  Bob: a man with red hair, black suit",
            '  Bob: {description: "a man with red hair, black suit", images: bob.png}',
        )
    )
    plain = tmp_path / "plain.yaml"
    plain.write_text(STORY_YAML)
    code, _, stderr = run_cli(
        monkeypatch, capsys, "story", in_file, "--model", model_dir, "--out", tmp_path / "a", *FAST
    )
    assert code == 0, stderr
    picture = str(tmp_path / "bob.png")
    code, _, stderr = run_cli(
        monkeypatch, capsys, "story", plain, "--model", model_dir, "--out", tmp_path / "b",
        "--character-image", f"Bob={picture}", *FAST,
    )  # fmt: skip
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["panels"]["0"]["role"] == "frame"  # Bob has no reference frames: his bank is the picture
    for index in range(6):
        a, b = (np.asarray(Image.open(tmp_path / out / f"panel_{index:03d}.png")) for out in ("a", "b"))
        assert np.array_equal(a, b), index

    for value, expected in (
        (f"Zed={picture}", "no character [Zed]"),
        ("Bob=missing.png", "does not exist"),
        ("Bob", "write NAME=PICTURE"),
    ):
        code, _, stderr = run_cli(
            monkeypatch, capsys, "story", plain, "--model", model_dir, "--out", tmp_path / "c",
            "--character-image", value, *FAST,
        )  # fmt: skip
        assert code == 1 and expected in stderr and "Traceback" not in stderr, stderr


def test_a_malformed_story_file_is_refused_before_torch_loads(tmp_path):
    """The story is read and checked first: a mistake in it is one line at once, not after seconds of importing
    torch and diffusers (checked in a fresh interpreter: torch is never imported)."""
    bad = tmp_path / "story.yaml"
    bad.write_text("characters:\n  Bob: x\nframes: [\n")
    script = (
        "import sys\nfrom storydiffusion.app import cli\n"
        f"sys.argv = ['storydiffusion', 'story', {str(bad)!r}, '--out', {str(tmp_path / 'out')!r}]\n"
        "try:\n    cli.main()\nexcept SystemExit as stop:\n    print('exit', stop.code)\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "exit 1" in done.stdout and "torch imported: False" in done.stdout, done.stdout + done.stderr
    assert done.stderr.startswith(f"error: {bad}, line 4: YAML syntax error")


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["story", "--stepz", "3"], 2, "error: No such option: --stepz"),
        (["story", "--steps", "0", "s.yaml"], 2, "error: Invalid value for '--steps'"),
        (["nosuch"], 2, "error: No such command 'nosuch'"),
        (["story", "missing.yaml"], 1, "error: missing.yaml"),
    ],
)
def test_every_error_is_one_line_starting_the_same_way(monkeypatch, capsys, args, code, expected):
    """A bad option (click's code 2) and a bad story (1) both print one line starting `error:`."""
    got, _, stderr = run_cli(monkeypatch, capsys, *args)
    assert got == code and stderr.startswith(expected) and len(stderr.strip().splitlines()) == 1, stderr
