"""Comic pages: layout geometry as pure functions, captions checked on rendered pixels, PNG/PDF files."""

import itertools
import re
from importlib.resources import files

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from storydiffusion.errors import StoryDiffusionError
from storydiffusion.story.comic import (
    BORDER_WIDTH,
    CAPTION_LINES,
    CAPTION_PADDING,
    FOUR_PANEL_ROWS,
    MIN_FONT_SIZE,
    ComicLayout,
    PanelBox,
    fit_caption,
    line_height,
    load_font,
    make_comic,
    plan_pages,
    render_page,
    save_comic,
    split_panel,
    wrap_caption,
)

# a small page keeps rendering fast: 2x2 cells of 180x260 px
SMALL = {"page_size": (400, 560), "margin": 16, "gutter": 8, "caption_font_size": 16}
RED = (220, 30, 30)
LONG_CAPTION = (
    "Antidisestablishmentarianismsupercalifragilistic begins a caption that goes on and on: "
    + " ".join(f"word{i}" for i in range(20))
    + " THE-END"
)


def _dark_pixels(page: Image.Image, area: PanelBox, threshold: int = 96) -> int:
    """How many pixels of `area` are darker than `threshold` (text is black, panels here are not)."""
    crop = page.crop((area.x, area.y, area.right, area.bottom)).convert("L")
    return sum(crop.histogram()[:threshold])


def _solid(color=RED, size=(64, 64)) -> Image.Image:
    return Image.new("RGB", size, color)


# ----------------------------------------------------------------------------------------------------------
# Geometry

_PAGES = [
    {},  # A4 portrait at 150 dpi
    {"page_size": (600, 800), "margin": 16, "gutter": 8},
    {"page_size": (1754, 1240), "margin": 0, "gutter": 0},  # landscape, panels touching
]


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(["grid", "four", "classic"]),
    num_panels=st.integers(1, 30),
    rows=st.integers(1, 4),
    cols=st.integers(1, 4),
    seed=st.integers(0, 2**32),
    page=st.sampled_from(_PAGES),
)
def test_plan_pages_places_every_panel_inside_margins_without_overlap(kind, num_panels, rows, cols, seed, page):
    layout = ComicLayout(kind=kind, rows=rows, cols=cols, seed=seed, **page)
    pages = plan_pages(num_panels, layout)
    assert sum(map(len, pages)) == num_panels
    assert all(pages), "no empty page"
    assert pages == plan_pages(num_panels, layout), "deterministic"
    width, height = layout.page_size
    capacity = {"grid": rows * cols, "four": FOUR_PANEL_ROWS, "classic": 9}[kind]
    for boxes in pages:
        assert len(boxes) <= capacity
        for box in boxes:
            assert box.width > 0 and box.height > 0
            assert box.x >= layout.margin and box.y >= layout.margin
            assert box.right <= width - layout.margin and box.bottom <= height - layout.margin
        for a, b in itertools.combinations(boxes, 2):
            apart_x = a.right + layout.gutter <= b.x or b.right + layout.gutter <= a.x
            apart_y = a.bottom + layout.gutter <= b.y or b.bottom + layout.gutter <= a.y
            assert apart_x or apart_y, f"{a} and {b} overlap or are closer than gutter={layout.gutter}"
    if kind == "classic" and num_panels > 1:
        assert all(len(boxes) > 1 for boxes in pages), "a lone panel on a page"


def test_grid_and_four_shapes():
    grid = plan_pages(5, ComicLayout(kind="grid", rows=2, cols=2))
    assert [len(boxes) for boxes in grid] == [4, 1]
    assert grid[1][0] == grid[0][0], "a partial page keeps the grid's cells"
    assert len({box.x for box in grid[0]}) == 2 and len({box.y for box in grid[0]}) == 2

    four = plan_pages(6, ComicLayout(kind="four"))
    assert [len(boxes) for boxes in four] == [4, 2]
    assert len({(box.x, box.width) for box in four[0]}) == 1, "one column"
    assert [box.y for box in four[0]] == sorted(box.y for box in four[0]), "read top to bottom"


def test_classic_is_seeded():
    plans = [plan_pages(12, ComicLayout(kind="classic", seed=seed)) for seed in range(10)]
    assert plans[3] == plan_pages(12, ComicLayout(kind="classic", seed=3))
    assert len({repr(plan) for plan in plans}) > 1, "different seeds give different layouts"
    widths = {box.width for plan in plans for boxes in plan for box in boxes}
    assert len(widths) > 3, "rows of 1, 2 and 3 panels with unequal widths"


def test_split_panel_stays_inside_the_border():
    box = PanelBox(10, 20, 200, 300)
    image_area, caption_area = split_panel(box, 50)
    assert (image_area.x, image_area.y) == (10 + BORDER_WIDTH, 20 + BORDER_WIDTH)
    assert caption_area.y == image_area.bottom and caption_area.height == 50
    assert caption_area.bottom == box.bottom - BORDER_WIDTH
    assert image_area.right == caption_area.right == box.right - BORDER_WIDTH


# ----------------------------------------------------------------------------------------------------------
# Font and captions


def test_shipped_font_loads_from_the_package():
    fonts = files("storydiffusion") / "assets" / "fonts"
    assert (fonts / "DejaVuSans.ttf").is_file()
    assert "Bitstream" in (fonts / "DejaVu-LICENSE.txt").read_text(encoding="utf-8")
    font = load_font(20)
    assert font.getname() == ("DejaVu Sans", "Book")
    assert font.size == 20


def test_wrap_caption_fits_width_and_keeps_every_word():
    font = load_font(16)
    text = "a cat and a dog walk to the sea\nunder an ultramarinecoloredcloudlesssky"
    lines = wrap_caption(text, font, 80)
    assert all(font.getlength(line) <= 80 for line in lines)
    assert "".join("".join(lines).split()) == "".join(text.split())
    assert lines[:2] == ["a cat and", "a dog"], "greedy: as many words as fit"
    assert any(line.startswith("under") for line in lines), "a newline starts a new line"
    assert wrap_caption("", font, 80) == [] and wrap_caption("  \n ", font, 80) == []
    assert wrap_caption("x", font, 1) == ["x"], "a glyph wider than the line still goes in"


def test_long_caption_shrinks_then_grows_the_strip_and_is_fully_drawn():
    layout = ComicLayout(kind="grid", **SMALL)
    box = plan_pages(1, layout)[0][0]
    nominal = CAPTION_LINES * line_height(load_font(layout.caption_font_size)) + 2 * CAPTION_PADDING

    short = fit_caption("a cat", box, layout)
    assert short == fit_caption("a cat", box, layout)
    assert (short.lines, short.font_size, short.height) == (("a cat",), layout.caption_font_size, nominal)

    fit = fit_caption(LONG_CAPTION, box, layout)
    assert fit.font_size == MIN_FONT_SIZE and fit.height > nominal
    assert "".join("".join(fit.lines).split()) == "".join(LONG_CAPTION.split()), "nothing dropped"
    text_width = box.width - 2 * BORDER_WIDTH - 2 * CAPTION_PADDING
    font = load_font(MIN_FONT_SIZE)
    assert all(font.getlength(line) <= text_width for line in fit.lines)
    assert len(fit.lines) * line_height(font) + 2 * CAPTION_PADDING <= fit.height

    page = render_page([_solid()], [LONG_CAPTION], [box], layout)
    image_area, caption_area = split_panel(box, fit.height)
    assert image_area.height > 0 and page.getpixel((image_area.x + image_area.width // 2, image_area.y + 5)) == RED
    step = line_height(font)
    last_line_top = caption_area.y + (caption_area.height - step * len(fit.lines)) // 2 + step * (len(fit.lines) - 1)
    last_line = PanelBox(caption_area.x, last_line_top, caption_area.width, step)
    assert _dark_pixels(page, last_line) > 0, "the last line (THE-END) is drawn"
    truncated = " ".join(LONG_CAPTION.split()[:-5])
    other = render_page([_solid()], [truncated], [box], layout)
    assert (
        other.crop((0, last_line.y, *layout.page_size)).tobytes()
        != page.crop((0, last_line.y, *layout.page_size)).tobytes()
    )


def test_caption_too_long_for_its_panel_raises():
    layout = ComicLayout(kind="grid", **SMALL)
    box = plan_pages(1, layout)[0][0]
    with pytest.raises(StoryDiffusionError, match="shorten the caption"):
        fit_caption("word " * 2000, box, layout)


# ----------------------------------------------------------------------------------------------------------
# Rendering


def test_render_page_draws_images_borders_and_captions():
    layout = ComicLayout(kind="grid", background="#ffffff", **SMALL)
    boxes = plan_pages(4, layout)[0]
    captions = ["One.", "Two cats.", "", "Four"]
    page = render_page([_solid()] * 4, captions, boxes, layout)
    assert page.size == layout.page_size and page.mode == "RGB"
    for box, caption in zip(boxes, captions):
        strip = max(fit_caption(c, b, layout).height for c, b in zip(captions, boxes) if b.y == box.y)
        image_area, caption_area = split_panel(box, strip)
        assert page.getpixel((image_area.x + image_area.width // 2, image_area.y + image_area.height // 2)) == RED
        assert page.getpixel((box.x, box.y + box.height // 2)) == (0, 0, 0), "left border"
        assert page.getpixel((box.x + box.width // 2, box.bottom - 1)) == (0, 0, 0), "bottom border"
        assert page.getpixel((box.x - 1, box.y + box.height // 2)) == (255, 255, 255), "gutter outside"
        red = page.crop((caption_area.x, caption_area.y, caption_area.right, caption_area.bottom)).getcolors(1 << 16)
        assert all(color != RED for _, color in red), "no image inside the caption strip"
        assert (_dark_pixels(page, caption_area) > 0) == bool(caption), f"caption {caption!r}"


def test_render_page_letterboxes_keeping_aspect_ratio():
    layout = ComicLayout(kind="grid", rows=1, cols=1, **SMALL)
    box = plan_pages(1, layout)[0][0]
    page = render_page([_solid(size=(400, 100))], [""], [box], layout)
    image_area, _ = split_panel(box, 0)
    centre_x, centre_y = image_area.x + image_area.width // 2, image_area.y + image_area.height // 2
    assert page.getpixel((centre_x, centre_y)) == RED
    assert page.getpixel((centre_x, image_area.y + 2)) == (255, 255, 255), "letterbox above a wide image"
    band = page.crop((centre_x, image_area.y, centre_x + 1, image_area.bottom)).getcolors()
    red_rows = dict((color, count) for count, color in band)[RED]
    assert abs(red_rows - image_area.width / 4) <= 2, "4:1 image keeps its aspect ratio"


def test_render_page_rejects_mismatched_inputs():
    layout = ComicLayout(kind="grid", **SMALL)
    with pytest.raises(StoryDiffusionError, match="2 images, 1 captions and 4 boxes"):
        render_page([_solid()] * 2, ["a"], plan_pages(4, layout)[0], layout)


def test_make_comic_is_deterministic_and_paginates():
    layout = ComicLayout(kind="classic", seed=7, **SMALL)
    images = [_solid((i * 40, 100, 200)) for i in range(6)]
    captions = [f"Panel {i}" for i in range(6)]
    pages = make_comic(images, captions, layout)
    assert len(pages) == len(plan_pages(6, layout))
    again = make_comic(images, captions, layout)
    assert [page.tobytes() for page in pages] == [page.tobytes() for page in again]


@pytest.mark.parametrize(
    ("images", "captions", "message"),
    [
        ([], [], "images is empty"),
        ([_solid()] * 2, ["a"], "2 images but 1 captions"),
        ([_solid()], [None], r"captions\[0\]=None"),
        (["not an image"], ["a"], r"images\[0\]"),
    ],
)
def test_make_comic_rejects_bad_input(images, captions, message):
    with pytest.raises(StoryDiffusionError, match=message):
        make_comic(images, captions, ComicLayout(**SMALL))


# ----------------------------------------------------------------------------------------------------------
# Files


def test_save_comic_writes_pngs_and_one_pdf(tmp_path):
    layout = ComicLayout(kind="grid", rows=1, cols=2, **SMALL)
    pages = make_comic([_solid()] * 5, ["a caption"] * 5, layout)
    assert len(pages) == 3
    pngs, pdf = save_comic(pages, tmp_path / "out")
    assert [path.name for path in pngs] == ["page_01.png", "page_02.png", "page_03.png"]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["comic.pdf", *[p.name for p in pngs]]
    for path, page in zip(pngs, pages):
        with Image.open(path) as reopened:
            assert reopened.format == "PNG" and reopened.size == layout.page_size
            assert reopened.convert("RGB").tobytes() == page.tobytes()
    data = pdf.read_bytes()
    assert pdf.name == "comic.pdf" and data.startswith(b"%PDF")
    assert len(re.findall(rb"/Type\s*/Page(?![s\w])", data)) == 3


def test_save_comic_rejects_no_pages(tmp_path):
    with pytest.raises(StoryDiffusionError, match="pages is empty"):
        save_comic([], tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("settings_", "message"),
    [
        ({"kind": "five"}, "kind='five'"),
        ({"rows": 0}, "rows=0"),
        ({"cols": -1}, "cols=-1"),
        ({"page_size": (1240,)}, r"page_size=\(1240,\)"),
        ({"page_size": (90, 90)}, r"page_size=\(90, 90\).*margin=48"),
        ({"margin": -1}, "margin=-1"),
        ({"gutter": -2}, "gutter=-2"),
        ({"caption_font_size": 8}, "caption_font_size=8"),
        ({"background": "not-a-colour"}, "background='not-a-colour'"),
        ({"seed": 1.5}, "seed=1.5"),
        ({"kind": "grid", "rows": 40}, r"rows=40.*fewer rows/cols"),
    ],
)
def test_layout_validation_names_the_field(settings_, message):
    with pytest.raises(StoryDiffusionError, match=message):
        ComicLayout(**settings_)


def test_plan_pages_rejects_no_panels():
    with pytest.raises(StoryDiffusionError, match="num_panels=0"):
        plan_pages(0, ComicLayout())
