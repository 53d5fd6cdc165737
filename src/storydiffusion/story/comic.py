"""Comic pages: story panels with captions laid out on pages, saved as PNG pages and one PDF.

Layouts (`ComicLayout.kind`):

- ``"grid"``    — `rows` × `cols` equal cells per page, filled in reading order.
- ``"four"``    — yonkoma, the Japanese four-panel strip: 4 full-width rows per page, read top to bottom.
- ``"classic"`` — 3 rows per page of 1, 2 or 3 panels each, with unequal widths inside a row; the pattern
  is drawn from `random.Random(layout.seed)`, so a seed and a panel count always give the same pages.
  The last page never holds a lone panel unless the comic has only one.

Rows keep the same height on every page, so a short last page leaves blank space at its bottom rather
than stretching its panels.

Each panel's cell has a thin black border, its image above and a white caption strip below. Images are
letterboxed: scaled to fit the image area with their aspect ratio kept and centred on the page background,
so no part of a picture is ever cropped. Captions are never dropped or cut: the font shrinks step by step
down to `MIN_FONT_SIZE`, then the caption strip grows (and the image area shrinks); a caption that still
cannot fit raises `StoryDiffusionError`.

Geometry (`plan_pages`, `split_panel`, `fit_caption`) is pure and tested without drawing anything.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from io import BytesIO
from pathlib import Path
from typing import Literal

from PIL import Image, ImageColor, ImageDraw, ImageFont

from storydiffusion.errors import StoryDiffusionError
from storydiffusion.files import write_atomically

FONT_FILE = "DejaVuSans.ttf"  # shipped in storydiffusion/assets/fonts, licence beside it
LAYOUT_KINDS = ("grid", "four", "classic")
FOUR_PANEL_ROWS = 4  # yonkoma: four panels stacked in one column
CLASSIC_ROWS_PER_PAGE = 3
# classic rows: panel width weights, one tuple per possible row shape
CLASSIC_ROW_SHAPES: dict[int, tuple[tuple[int, ...], ...]] = {
    1: ((1,),),
    2: ((1, 1), (2, 1), (1, 2), (3, 2), (2, 3)),
    3: ((1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)),
}
CLASSIC_ROW_SIZE_WEIGHTS = (1, 3, 2)  # how often a classic row holds 1, 2 or 3 panels
BORDER_WIDTH = 2  # px, the black line around each panel
CAPTION_PADDING = 8  # px between the caption text and the strip's edges
CAPTION_LINES = 2  # the caption strip holds this many lines at the layout's font size before fitting
MIN_FONT_SIZE = 12  # px, the smallest font a caption shrinks to
FONT_STEP = 2  # px, how much the font shrinks per fitting step
MIN_IMAGE_HEIGHT = 32  # px of image a growing caption strip must leave
MIN_PANEL_SIZE = 48  # px, the smallest panel side a layout may produce
PDF_RESOLUTION = 150  # dpi; the default page_size is A4 at this resolution


@dataclass(frozen=True)
class ComicLayout:
    """How panels go on pages. Sizes are in pixels."""

    kind: Literal["grid", "four", "classic"] = "classic"
    rows: int = 2  # grid only: rows of panels per page
    cols: int = 2  # grid only: panels per row
    page_size: tuple[int, int] = (1240, 1754)  # (width, height): A4 portrait at 150 dpi
    margin: int = 48  # blank border around each page
    gutter: int = 24  # blank space between neighbouring panels
    caption_font_size: int = 28  # starting size; long captions shrink towards MIN_FONT_SIZE
    background: str = "white"  # page colour, any PIL colour name or "#rrggbb"
    seed: int = 0  # classic only: picks the row pattern

    def __post_init__(self) -> None:
        if self.kind not in LAYOUT_KINDS:
            raise StoryDiffusionError(f"kind={self.kind!r} is not a comic layout: use one of {LAYOUT_KINDS}.")
        for name in ("rows", "cols"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise StoryDiffusionError(f"{name}={value!r} must be an integer >= 1 (panels per page along it).")
        if isinstance(self.page_size, list):  # e.g. read from JSON; a tuple keeps the layout hashable
            object.__setattr__(self, "page_size", tuple(self.page_size))
        if (
            not isinstance(self.page_size, tuple)
            or len(self.page_size) != 2
            or not all(isinstance(side, int) for side in self.page_size)
        ):
            raise StoryDiffusionError(
                f"page_size={self.page_size!r} must be (width, height) in integer pixels, e.g. (1240, 1754)."
            )
        for name in ("margin", "gutter"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise StoryDiffusionError(f"{name}={value!r} must be an integer >= 0 (pixels).")
        width, height = self.page_size
        if width <= 2 * self.margin or height <= 2 * self.margin:
            raise StoryDiffusionError(
                f"page_size={self.page_size} must be larger than twice margin={self.margin} on both sides: "
                "use a larger page or a smaller margin."
            )
        if not isinstance(self.caption_font_size, int) or self.caption_font_size < MIN_FONT_SIZE:
            raise StoryDiffusionError(
                f"caption_font_size={self.caption_font_size!r} must be an integer >= {MIN_FONT_SIZE} (pixels)."
            )
        try:
            ImageColor.getrgb(self.background)
        except (ValueError, AttributeError) as error:
            raise StoryDiffusionError(
                f"background={self.background!r} is not a colour: use a name such as 'white' or '#rrggbb'."
            ) from error
        if not isinstance(self.seed, int):
            raise StoryDiffusionError(f"seed={self.seed!r} must be an integer.")
        panel_width, panel_height = _smallest_panel(self)
        if min(panel_width, panel_height) < MIN_PANEL_SIZE:
            raise StoryDiffusionError(
                f"page_size={self.page_size} with margin={self.margin} and gutter={self.gutter} leaves panels as "
                f"small as {panel_width}x{panel_height} px for kind={self.kind!r}"
                + (f" (rows={self.rows}, cols={self.cols})" if self.kind == "grid" else "")
                + f"; panels need at least {MIN_PANEL_SIZE} px a side: use a larger page_size, a smaller "
                "margin or gutter, or fewer rows/cols."
            )


@dataclass(frozen=True)
class PanelBox:
    """A panel's cell on the page (image, caption strip and border), in pixels from the top-left corner."""

    x: int
    y: int
    width: int
    height: int

    @property
    def right(self) -> int:
        return self.x + self.width

    @property
    def bottom(self) -> int:
        return self.y + self.height


@dataclass(frozen=True)
class CaptionFit:
    """How a caption is drawn in its panel: the wrapped lines, their font size and the strip's height."""

    lines: tuple[str, ...]
    font_size: int
    height: int  # px of the panel given to the caption strip, padding included (0: no caption)


# ----------------------------------------------------------------------------------------------------------
# Geometry


def _spans(total: int, weights: Sequence[int], gutter: int) -> list[tuple[int, int]]:
    """(offset, size) of spans sharing `total` px in proportion to `weights`, `gutter` px apart."""
    free = total - gutter * (len(weights) - 1)
    cuts = [free * sum(weights[:i]) // sum(weights) for i in range(len(weights) + 1)]
    return [(cuts[i] + gutter * i, cuts[i + 1] - cuts[i]) for i in range(len(weights))]


def _content_size(layout: ComicLayout) -> tuple[int, int]:
    """Width and height of the page inside its margins."""
    width, height = layout.page_size
    return width - 2 * layout.margin, height - 2 * layout.margin


def _page_shape(layout: ComicLayout) -> tuple[int, tuple[tuple[int, ...], ...]]:
    """Rows per page and the row shapes (panel width weights) the layout can use."""
    if layout.kind == "grid":
        return layout.rows, ((1,) * layout.cols,)
    if layout.kind == "four":
        return FOUR_PANEL_ROWS, ((1,),)
    return CLASSIC_ROWS_PER_PAGE, tuple(shape for shapes in CLASSIC_ROW_SHAPES.values() for shape in shapes)


def _smallest_panel(layout: ComicLayout) -> tuple[int, int]:
    """The narrowest width and lowest height any panel of this layout can get."""
    width, height = _content_size(layout)
    rows_per_page, shapes = _page_shape(layout)
    narrowest = min(size for shape in shapes for _, size in _spans(width, shape, layout.gutter))
    lowest = min(size for _, size in _spans(height, (1,) * rows_per_page, layout.gutter))
    return narrowest, lowest


def _page_boxes(rows: Sequence[tuple[int, ...]], rows_per_page: int, layout: ComicLayout) -> list[PanelBox]:
    """Boxes of one page whose rows (top to bottom) have the given width weights."""
    width, height = _content_size(layout)
    row_spans = _spans(height, (1,) * rows_per_page, layout.gutter)
    boxes = []
    for (y, row_height), shape in zip(row_spans, rows):
        for x, panel_width in _spans(width, shape, layout.gutter):
            boxes.append(PanelBox(layout.margin + x, layout.margin + y, panel_width, row_height))
    return boxes


def _classic_rows(num_panels: int, rng: random.Random) -> list[tuple[int, ...]]:
    """Row shapes holding exactly `num_panels` panels, drawn from `rng`."""
    rows = []
    left = num_panels
    while left:
        size = min(rng.choices((1, 2, 3), weights=CLASSIC_ROW_SIZE_WEIGHTS)[0], left)
        rows.append(rng.choice(CLASSIC_ROW_SHAPES[size]))
        left -= size
    return rows


def _paginate(rows: list[tuple[int, ...]], rows_per_page: int) -> list[list[tuple[int, ...]]]:
    """Rows grouped into pages; a lone panel on the last page takes the previous page's last row along."""
    pages = [rows[i : i + rows_per_page] for i in range(0, len(rows), rows_per_page)]
    if len(pages) > 1 and sum(map(len, pages[-1])) == 1:
        pages[-1].insert(0, pages[-2].pop())
    return pages


def plan_pages(num_panels: int, layout: ComicLayout) -> list[list[PanelBox]]:
    """Where each panel goes: one list of boxes per page, panels in reading order. Deterministic."""
    if not isinstance(num_panels, int) or num_panels < 1:
        raise StoryDiffusionError(f"num_panels={num_panels!r} must be an integer >= 1.")
    rows_per_page, shapes = _page_shape(layout)
    if layout.kind == "classic":
        pages = _paginate(_classic_rows(num_panels, random.Random(layout.seed)), rows_per_page)
        return [_page_boxes(rows, rows_per_page, layout) for rows in pages]
    # grid and four: every page is the same full grid, the last one filled only as far as needed
    full_page = _page_boxes([shapes[0]] * rows_per_page, rows_per_page, layout)
    return [full_page[: num_panels - start] for start in range(0, num_panels, len(full_page))]


def split_panel(box: PanelBox, caption_height: int) -> tuple[PanelBox, PanelBox]:
    """The image area and the caption strip inside a panel's border; the strip is `caption_height` px tall."""
    inner_width = box.width - 2 * BORDER_WIDTH
    image_height = box.height - 2 * BORDER_WIDTH - caption_height
    image_area = PanelBox(box.x + BORDER_WIDTH, box.y + BORDER_WIDTH, inner_width, image_height)
    caption_area = PanelBox(image_area.x, image_area.bottom, inner_width, caption_height)
    return image_area, caption_area


# ----------------------------------------------------------------------------------------------------------
# Captions


@lru_cache(maxsize=1)
def _font_bytes() -> bytes:
    return (files("storydiffusion") / "assets" / "fonts" / FONT_FILE).read_bytes()


@lru_cache(maxsize=32)
def load_font(size: int) -> ImageFont.FreeTypeFont:
    """The shipped DejaVu Sans at `size` px."""
    return ImageFont.truetype(BytesIO(_font_bytes()), size)


def line_height(font: ImageFont.FreeTypeFont) -> int:
    """Vertical distance between two caption lines."""
    ascent, descent = font.getmetrics()
    return ascent + descent


def _break_word(word: str, font: ImageFont.FreeTypeFont, max_width: float) -> list[str]:
    """A word too long for one line, cut into pieces that fit (at least one character each)."""
    pieces = [""]
    for char in word:
        if pieces[-1] and font.getlength(pieces[-1] + char) > max_width:
            pieces.append("")
        pieces[-1] += char
    return pieces


def wrap_caption(text: str, font: ImageFont.FreeTypeFont, max_width: float) -> list[str]:
    """`text` word-wrapped to lines at most `max_width` px wide; newlines start new lines, no word is lost."""
    lines = []
    for paragraph in text.strip().splitlines():
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
            *full, line = _break_word(word, font, max_width)
            lines.extend(full)
        lines.append(line)
    return lines


def _strip_height(num_lines: int, font: ImageFont.FreeTypeFont) -> int:
    return num_lines * line_height(font) + 2 * CAPTION_PADDING


def fit_caption(text: str, box: PanelBox, layout: ComicLayout) -> CaptionFit:
    """Lines, font size and strip height that show all of `text` in `box`.

    The strip holds `CAPTION_LINES` lines at the layout's font size; a longer caption first shrinks the
    font by `FONT_STEP` down to `MIN_FONT_SIZE`, then grows the strip, leaving at least `MIN_IMAGE_HEIGHT`
    px of image. Raises `StoryDiffusionError` when even that cannot hold it.
    """
    if not text.strip():
        return CaptionFit((), layout.caption_font_size, 0)
    text_width = box.width - 2 * BORDER_WIDTH - 2 * CAPTION_PADDING
    room = box.height - 2 * BORDER_WIDTH - MIN_IMAGE_HEIGHT  # the tallest strip this panel allows
    strip = min(_strip_height(CAPTION_LINES, load_font(layout.caption_font_size)), room)
    sizes = [*range(layout.caption_font_size, MIN_FONT_SIZE, -FONT_STEP), MIN_FONT_SIZE]
    for size in sizes:
        font = load_font(size)
        lines = wrap_caption(text, font, text_width)
        needed = _strip_height(len(lines), font)
        if needed <= strip:
            return CaptionFit(tuple(lines), size, strip)
    if needed > room:
        preview = text if len(text) <= 40 else text[:40] + "..."
        raise StoryDiffusionError(
            f"caption {preview!r} ({len(text)} characters) needs {needed} px at font size {MIN_FONT_SIZE} "
            f"but its {box.width}x{box.height} px panel has room for {room}: shorten the caption, or give "
            "panels more room (larger page_size, fewer rows/cols, a smaller margin)."
        )
    return CaptionFit(tuple(lines), MIN_FONT_SIZE, needed)


def check_captions(captions: Sequence[str], layout: ComicLayout = ComicLayout()) -> None:
    """Raise `StoryDiffusionError` naming the panel if a caption cannot fit its box in `layout`: checked
    before any panel is drawn, so a long caption never fails a run after all of its panels are made."""
    boxes = [box for page in plan_pages(len(captions), layout) for box in page]
    for index, (caption, box) in enumerate(zip(captions, boxes)):
        try:
            fit_caption(caption, box, layout)
        except StoryDiffusionError as error:
            raise StoryDiffusionError(f"frame {index + 1}: {error}") from None


# ----------------------------------------------------------------------------------------------------------
# Drawing


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` scaled to fit inside `width` × `height` with its aspect ratio kept (RGBA)."""
    scale = min(width / image.width, height / image.height)
    size = (max(1, min(width, round(image.width * scale))), max(1, min(height, round(image.height * scale))))
    return image.convert("RGBA").resize(size, Image.Resampling.LANCZOS)


def _draw_caption(draw: ImageDraw.ImageDraw, fit: CaptionFit, area: PanelBox) -> None:
    """The caption's lines centred in black on a white strip."""
    draw.rectangle((area.x, area.y, area.right - 1, area.bottom - 1), fill="white")
    font = load_font(fit.font_size)
    step = line_height(font)
    top = area.y + (area.height - step * len(fit.lines)) // 2
    for i, line in enumerate(fit.lines):
        draw.text((area.x + area.width / 2, top + i * step), line, font=font, fill="black", anchor="ma")


def render_page(
    images: Sequence[Image.Image], captions: Sequence[str], boxes: Sequence[PanelBox], layout: ComicLayout
) -> Image.Image:
    """One page: each image letterboxed into its box above its caption strip, inside a black border.

    Panels sharing a row get the same caption strip height, so their images stay aligned.
    """
    if not len(images) == len(captions) == len(boxes):
        raise StoryDiffusionError(
            f"render_page got {len(images)} images, {len(captions)} captions and {len(boxes)} boxes: "
            "pass one image and one caption per box."
        )
    fits = [fit_caption(caption, box, layout) for caption, box in zip(captions, boxes)]
    row_strip: dict[tuple[int, int], int] = {}
    for box, fit in zip(boxes, fits):
        row_strip[box.y, box.height] = max(row_strip.get((box.y, box.height), 0), fit.height)

    page = Image.new("RGB", layout.page_size, layout.background)
    draw = ImageDraw.Draw(page)
    for image, box, fit in zip(images, boxes, fits):
        image_area, caption_area = split_panel(box, row_strip[box.y, box.height])
        picture = fit_image(image, image_area.width, image_area.height)
        offset = (
            image_area.x + (image_area.width - picture.width) // 2,
            image_area.y + (image_area.height - picture.height) // 2,
        )
        page.paste(picture, offset, picture)
        if fit.lines:
            _draw_caption(draw, fit, caption_area)
        draw.rectangle((box.x, box.y, box.right - 1, box.bottom - 1), outline="black", width=BORDER_WIDTH)
    return page


def make_comic(
    images: Sequence[Image.Image], captions: Sequence[str], layout: ComicLayout = ComicLayout()
) -> list[Image.Image]:
    """All pages of the comic: `images[i]` with `captions[i]`, in reading order."""
    # 1. Check inputs
    if len(images) == 0:
        raise StoryDiffusionError("images is empty: a comic needs at least one panel image.")
    if len(captions) != len(images):
        raise StoryDiffusionError(
            f"got {len(images)} images but {len(captions)} captions: pass one caption per image ('' for none)."
        )
    for i, (image, caption) in enumerate(zip(images, captions)):
        if not isinstance(image, Image.Image) or min(image.size) < 1:
            raise StoryDiffusionError(f"images[{i}]={image!r} must be a non-empty PIL.Image.Image.")
        if not isinstance(caption, str):
            raise StoryDiffusionError(f"captions[{i}]={caption!r} must be a string ('' for no caption).")
    # 2. Lay out and draw the pages
    pages = []
    start = 0
    for boxes in plan_pages(len(images), layout):
        end = start + len(boxes)
        pages.append(render_page(images[start:end], captions[start:end], boxes, layout))
        start = end
    return pages


# ----------------------------------------------------------------------------------------------------------
# Files


def save_comic(pages: Sequence[Image.Image], out_dir: str | Path, stem: str = "page") -> tuple[list[Path], Path]:
    """Write `{stem}_01.png`, `{stem}_02.png`, ... and `comic.pdf` (all pages) into `out_dir`."""
    if len(pages) == 0:
        raise StoryDiffusionError("pages is empty: pass the pages from make_comic().")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    digits = max(2, len(str(len(pages))))
    png_paths = []
    for number, page in enumerate(pages, start=1):
        path = out_dir / f"{stem}_{number:0{digits}d}.png"
        write_atomically(path, lambda target, page=page: page.save(target, format="PNG"))
        png_paths.append(path)
    rgb = [page.convert("RGB") for page in pages]
    pdf_path = out_dir / "comic.pdf"
    write_atomically(
        pdf_path,
        lambda target: rgb[0].save(
            target, format="PDF", save_all=True, append_images=rgb[1:], resolution=PDF_RESOLUTION
        ),
    )
    return png_paths, pdf_path
