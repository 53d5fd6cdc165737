"""Writing frames as files people can open: GIF (Pillow), MP4 (H.264 through PyAV), a PNG per frame.

Files are written through a temporary name (`files.write_atomically`), so an interrupted export
never leaves a broken video behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from storydiffusion.errors import StoryDiffusionError
from storydiffusion.files import write_atomically

VIDEO_SUFFIXES = (".mp4", ".gif")


def _check(frames: Sequence[Image.Image], fps: float) -> None:
    if not frames:
        raise StoryDiffusionError("no frames to write")
    if len({frame.size for frame in frames}) != 1:
        raise StoryDiffusionError(f"frames differ in size: {sorted({f.size for f in frames})}")
    if not fps > 0:
        raise StoryDiffusionError(f"fps={fps} must be > 0")


def _write_gif(frames: Sequence[Image.Image], path: Path, fps: float) -> None:
    first, *rest = [frame.convert("RGB") for frame in frames]
    first.save(path, format="GIF", save_all=True, append_images=rest, duration=round(1000 / fps), loop=0)


def _even(image: Image.Image) -> Image.Image:
    """H.264 in yuv420p needs even sides: pad one pixel by repeating the edge where needed."""
    width, height = image.size
    if width % 2 == 0 and height % 2 == 0:
        return image
    array = np.asarray(image)
    return Image.fromarray(np.pad(array, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge"))


def _write_mp4(frames: Sequence[Image.Image], path: Path, fps: float) -> None:
    from fractions import Fraction

    import av  # PyAV: ffmpeg's codecs without an ffmpeg binary

    images = [_even(frame.convert("RGB")) for frame in frames]
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = images[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}  # near-lossless: tiny frames are mostly edges
        for image in images:
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode())  # flush


def write_video(frames: Sequence[Image.Image], path: str | Path, fps: float = 8.0) -> Path:
    """Write `frames` to `path` as MP4 or GIF (by its suffix); returns the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        endings = " or ".join(VIDEO_SUFFIXES)
        raise StoryDiffusionError(f"cannot write video {str(path)!r}: the file name must end in {endings}")
    _check(frames, fps)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = _write_gif if suffix == ".gif" else _write_mp4
    write_atomically(path, lambda partial: writer(frames, partial, fps))
    return path


def read_video(path: str | Path) -> list[Image.Image]:
    """The frames of an MP4 or GIF (or any container ffmpeg reads) as RGB images."""
    import av

    try:
        with av.open(str(path)) as container:
            return [frame.to_image().convert("RGB") for frame in container.decode(video=0)]
    except (av.error.FFmpegError, OSError) as error:
        raise StoryDiffusionError(f"cannot read video {str(path)!r}: {error}") from error


def write_frames(frames: Sequence[Image.Image], folder: str | Path, prefix: str = "frame") -> list[Path]:
    """One PNG per frame, `prefix_000.png`...; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, frame in enumerate(frames):
        path = folder / f"{prefix}_{index:03d}.png"
        write_atomically(path, lambda partial, frame=frame: frame.save(partial, format="PNG"))
        paths.append(path)
    return paths
