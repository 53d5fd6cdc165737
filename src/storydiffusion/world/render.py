"""Tiny world: simple characters drawn in simple scenes, every image with its ground truth.

The project's tiny models (CLIP, VAE, UNet) and its attribute classifier are trained on images drawn
here on the fly. Each image is a `Panel`: a `Scene` (background kind + seed for its props) and 0-2
`Figure`s (an `Identity` in a pose at a `Placement`), plus a caption and the set of attributes the
caption mentions. Drawing is numpy + Pillow only and a pure function of its inputs; every random
draw comes from a `numpy.random.Generator` handed in (or one made from an explicit seed), so the same
seed gives the same pixels.

Identity attributes and their sizes (uniform draws)::

    kind             4  boy, girl, man, woman  (children smaller with bigger heads; girls/women wear a skirt)
    hair_colour      8  black, brown, blond, red, grey, white, blue, pink  (not drawn when bald)
    hair_style       5  short, long, curly, ponytail, bald
    skin_tone        4  pale, tan, brown, dark
    shirt_colour     8  red, orange, yellow, green, blue, purple, white, black
    trousers_colour  6  blue, black, brown, grey, green, red  (a skirt for girls and women)
    accessory        4  none, hat, cap, glasses

Two independent identities agree on every attribute with probability 1 / (4*8*5*4*8*6*4) =
1 / 122,880 ~ 8.1e-6 (`IDENTITY_COLLISION_PROBABILITY`). They *look* the same slightly more often,
because a bald head hides its hair colour: 1/5 * (4/5 * 1/8 + 1/5) / (4*4*8*6*4) = 0.06 / 3,072 ~ 2.0e-5.

Colours (RGB), chosen to stay distinct after downsampling to 64x64::

    black    ( 25,  25,  25)   brown   (120,  70,  30)   blond  (245, 215,  90)   red     (215,  35,  30)
    grey     (150, 150, 150)   white   (245, 245, 245)   blue   ( 40,  90, 225)   pink    (255, 120, 190)
    orange   (255, 140,   0)   yellow  (255, 225,  40)   green  ( 40, 165,  60)   purple  (135,  55, 185)
    skin: pale (255, 222, 196)   tan (225, 172, 120)   brown (165, 108, 66)   dark (92, 58, 36)
    fixed: hat (0, 120, 130)   cap (110, 40, 160)   outline and eyes (25, 25, 25)

Poses: standing, walking, running, sitting, jumping, waving. Scenes: forest, beach, city, snow, night,
room. A figure's `phase` in [0, 1) is its gait/animation phase: leg and arm swing, the jump's height
and the waving arm are smooth periodic functions of it (`pose_angles`), so `animate` can step a
character through a scene frame by frame.

Captions come from a small grammar, e.g. "a boy with short red hair and a blue shirt, jumping on a
beach". Each identity attribute is left out independently (`omit_probability`), and sometimes all of
them are ("a boy, jumping on a beach"), so that a model trained on them must invent what is not said,
which is what makes independent generations inconsistent, as with real models. The kind noun, the
pose and the scene are always said.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]
Point = tuple[float, float]
Box = tuple[float, float, float, float]  # (left, top, right, bottom) in pixels

# ---------------------------------------------------------------------------------------------
# Vocabularies
# ---------------------------------------------------------------------------------------------

KINDS = ("boy", "girl", "man", "woman")
HAIR_COLOURS = ("black", "brown", "blond", "red", "grey", "white", "blue", "pink")
HAIR_STYLES = ("short", "long", "curly", "ponytail", "bald")
SKIN_TONES = ("pale", "tan", "brown", "dark")
SHIRT_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
TROUSERS_COLOURS = ("blue", "black", "brown", "grey", "green", "red")
ACCESSORIES = ("none", "hat", "cap", "glasses")

POSES = ("standing", "walking", "running", "sitting", "jumping", "waving")
SCENES = ("forest", "beach", "city", "snow", "night", "room")

# How a caption places a figure in each scene, and names the scene when nobody is in it.
SCENE_PHRASES = MappingProxyType(
    {
        "forest": "in a forest",
        "beach": "on a beach",
        "city": "in the city",
        "snow": "in the snow",
        "night": "at night",
        "room": "in a room",
    }
)
SCENE_NOUNS = MappingProxyType(
    {
        "forest": "a forest",
        "beach": "a beach",
        "city": "a city street",
        "snow": "a snowy field",
        "night": "a park at night",
        "room": "an empty room",
    }
)

COLOURS: Mapping[str, RGB] = MappingProxyType(
    {
        "black": (25, 25, 25),
        "brown": (120, 70, 30),
        "blond": (245, 215, 90),
        "red": (215, 35, 30),
        "grey": (150, 150, 150),
        "white": (245, 245, 245),
        "blue": (40, 90, 225),
        "pink": (255, 120, 190),
        "orange": (255, 140, 0),
        "yellow": (255, 225, 40),
        "green": (40, 165, 60),
        "purple": (135, 55, 185),
    }
)
SKIN_RGB: Mapping[str, RGB] = MappingProxyType(
    {"pale": (255, 222, 196), "tan": (225, 172, 120), "brown": (165, 108, 66), "dark": (92, 58, 36)}
)
HAT_RGB: RGB = (0, 120, 130)
CAP_RGB: RGB = (110, 40, 160)
OUTLINE_RGB: RGB = (25, 25, 25)
SHOE_RGB: RGB = (50, 35, 30)

# Identity attributes a caption may leave out; the kind noun is always said.
OMITTABLE_ATTRIBUTES = ("hair_colour", "hair_style", "skin_tone", "shirt_colour", "trousers_colour", "accessory")
VOCABULARIES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "kind": KINDS,
        "hair_colour": HAIR_COLOURS,
        "hair_style": HAIR_STYLES,
        "skin_tone": SKIN_TONES,
        "shirt_colour": SHIRT_COLOURS,
        "trousers_colour": TROUSERS_COLOURS,
        "accessory": ACCESSORIES,
    }
)
IDENTITY_COLLISION_PROBABILITY = 1.0 / math.prod(len(v) for v in VOCABULARIES.values())


@dataclass(frozen=True)
class BodyShape:
    """Proportions of one kind of character, in units of its own standing height (feet 0, head top 1)."""

    height: float  # standing height relative to a man's; Placement.scale is a man's height in frame heights
    head_radius: float
    shoulder_y: float
    hip_y: float  # also the leg length: thigh and shin are hip_y / 2 each
    shoulder_half_width: float
    hip_half_width: float
    limb_width: float  # arms; legs are 15% thicker
    skirt: bool  # wears the lower garment as a skirt (legs show skin), and the caption says "skirt"


BODY_SHAPES: Mapping[str, BodyShape] = MappingProxyType(
    {
        "boy": BodyShape(0.74, 0.15, 0.66, 0.38, 0.13, 0.10, 0.095, skirt=False),
        "girl": BodyShape(0.72, 0.15, 0.66, 0.38, 0.12, 0.10, 0.09, skirt=True),
        "man": BodyShape(1.0, 0.115, 0.745, 0.46, 0.15, 0.105, 0.085, skirt=False),
        "woman": BodyShape(0.94, 0.115, 0.745, 0.47, 0.125, 0.11, 0.075, skirt=True),
    }
)


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {tuple(allowed)}")


# ---------------------------------------------------------------------------------------------
# Ground truth: identity, placement, figure, scene, panel
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """What makes a character recognisable across panels."""

    kind: str
    hair_colour: str
    hair_style: str
    skin_tone: str
    shirt_colour: str
    trousers_colour: str
    accessory: str = "none"

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_choice(f.name, getattr(self, f.name), VOCABULARIES[f.name])

    @classmethod
    def random(cls, rng: np.random.Generator) -> Identity:
        """Every attribute drawn uniformly and independently."""
        return cls(**{name: str(rng.choice(values)) for name, values in VOCABULARIES.items()})

    def attributes(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def visible_attributes(self) -> dict[str, str]:
        """The attributes an image shows: all but the hair colour of a bald head."""
        shown = self.attributes()
        if self.hair_style == "bald":
            del shown["hair_colour"]
        return shown


@dataclass(frozen=True)
class Placement:
    """Where a figure stands: feet centre (x, y) in frame fractions, a man's height in frame heights.

    `facing` is +1 (towards the right) or -1: it mirrors the figure (stride direction, waving arm,
    cap visor, ponytail side). x and y may lie outside [0, 1] (a figure walking in or out of frame).
    """

    x: float
    y: float
    scale: float
    facing: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.x) and math.isfinite(self.y)):
            raise ValueError(f"Placement x={self.x}, y={self.y} must be finite numbers")
        if not 0.0 < self.scale <= 2.0:
            raise ValueError(f"Placement scale={self.scale} must be in (0, 2] (figure height / frame height)")
        if self.facing not in (-1, 1):
            raise ValueError(f"Placement facing={self.facing!r} must be 1 (right) or -1 (left)")


def lerp_placement(start: Placement, end: Placement, t: float) -> Placement:
    """Linear interpolation of position and scale; the facing is the start's."""
    return Placement(
        x=start.x + t * (end.x - start.x),
        y=start.y + t * (end.y - start.y),
        scale=start.scale + t * (end.scale - start.scale),
        facing=start.facing,
    )


@dataclass(frozen=True)
class Figure:
    """An identity in a pose at a placement; `phase` in [0, 1) is the gait/animation phase."""

    identity: Identity
    pose: str
    placement: Placement
    phase: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("pose", self.pose, POSES)
        if not 0.0 <= self.phase < 1.0:
            raise ValueError(f"Figure phase={self.phase} must be in [0, 1); wrap it with `% 1.0`")


@dataclass(frozen=True)
class Scene:
    """A background kind; `seed` places its props (trees, buildings, stars, window...)."""

    kind: str
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("scene kind", self.kind, SCENES)
        if not (isinstance(self.seed, int | np.integer) and self.seed >= 0):
            raise ValueError(f"Scene seed={self.seed!r} must be a non-negative integer")


@dataclass(frozen=True)
class Panel:
    """One image's ground truth: scene, figures (drawn back to front by their feet's y), caption.

    `mentioned` names what the caption says: "kind", "pose", "scene" and the identity attributes
    that were not omitted. Attributes of figure i > 0 carry a suffix, "hair_colour.1"
    (`mention_key`); `mentioned_for(i)` gives one figure's names without it.
    """

    scene: Scene
    figures: tuple[Figure, ...]
    caption: str
    mentioned: frozenset[str]

    def __post_init__(self) -> None:
        if len(self.figures) > 2:
            raise ValueError(f"Panel holds at most 2 figures, got {len(self.figures)}")

    def mentioned_for(self, index: int) -> frozenset[str]:
        """What the caption says about figure `index` (kind, pose, attributes), without suffixes."""
        if index == 0:
            return frozenset(name for name in self.mentioned if "." not in name and name != "scene")
        suffix = f".{index}"
        return frozenset(name.removesuffix(suffix) for name in self.mentioned if name.endswith(suffix))


def mention_key(attribute: str, figure_index: int) -> str:
    """The name of figure `figure_index`'s attribute in `Panel.mentioned`."""
    return attribute if figure_index == 0 else f"{attribute}.{figure_index}"


# ---------------------------------------------------------------------------------------------
# Poses: joint angles as smooth functions of the phase
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoseAngles:
    """Joint angles in degrees from straight down, positive towards the facing direction.

    Limbs come as (near, far): near is on the facing side. A knee bend turns the shin backwards, an
    elbow bend turns the forearm forwards.
    """

    legs: tuple[tuple[float, float], tuple[float, float]]  # (hip angle, knee bend)
    arms: tuple[tuple[float, float], tuple[float, float]]  # (shoulder angle, elbow bend)
    lift: float = 0.0  # lowest point above the ground, in body heights (a jump)


def pose_angles(pose: str, phase: float) -> PoseAngles:
    """The pose at gait phase `phase` (period 1: walking/running strides, one jump, one wave)."""
    swing = math.sin(2 * math.pi * phase)
    if pose == "standing":
        return PoseAngles(legs=((5, 0), (-5, 0)), arms=((12, 0), (-12, 0)))
    if pose == "walking":
        return PoseAngles(legs=((30 * swing, 12), (-30 * swing, 12)), arms=((-25 * swing, 15), (25 * swing, 15)))
    if pose == "running":
        legs = ((50 * swing, 35 + 45 * max(0.0, -swing)), (-50 * swing, 35 + 45 * max(0.0, swing)))
        return PoseAngles(legs=legs, arms=((-55 * swing, 90), (55 * swing, 90)), lift=0.04 * abs(swing))
    if pose == "sitting":
        return PoseAngles(legs=((95, 15), (88, 8)), arms=((45, 20), (35, 20)))
    if pose == "jumping":
        return PoseAngles(legs=((35, 70), (20, 60)), arms=((150, 0), (-150, 0)), lift=0.2 * math.sin(math.pi * phase))
    if pose == "waving":
        return PoseAngles(legs=((5, 0), (-5, 0)), arms=((140 + 15 * swing, 25), (-10, 0)))
    raise ValueError(f"pose={pose!r} is not one of {POSES}")


# ---------------------------------------------------------------------------------------------
# Skeleton: a posed figure's joints in pixels
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Skeleton:
    """A posed figure in canvas pixels (y down). Limb chains are (root, middle joint, end), near first."""

    head: Point
    head_radius: float
    shoulders: tuple[Point, Point]  # torso's top corners (near, far)
    hips: tuple[Point, Point]  # torso's bottom corners (near, far)
    legs: tuple[tuple[Point, Point, Point], tuple[Point, Point, Point]]  # hip joint, knee, foot
    arms: tuple[tuple[Point, Point, Point], tuple[Point, Point, Point]]  # shoulder, elbow, hand
    arm_width: float
    leg_width: float
    unit: float  # pixels per body height
    facing: int


def _step(origin: Point, length: float, degrees: float) -> Point:
    """The end of a segment hanging from `origin` at `degrees` from straight down (y up, x forward)."""
    a = math.radians(degrees)
    return (origin[0] + length * math.sin(a), origin[1] - length * math.cos(a))


def _chain(root: Point, lengths: tuple[float, float], first: float, second: float) -> tuple[Point, Point, Point]:
    middle = _step(root, lengths[0], first)
    return root, middle, _step(middle, lengths[1], second)


def skeleton(figure: Figure, canvas_size: float) -> Skeleton:
    """Pose the figure: build it in body units (feet at 0, x forward), ground it, then map to pixels."""
    body = BODY_SHAPES[figure.identity.kind]
    angles = pose_angles(figure.pose, figure.phase)
    leg_w, arm_w = 1.15 * body.limb_width, body.limb_width
    leg = (body.hip_y / 2, body.hip_y / 2)
    arm = (0.6 * (body.shoulder_y - body.hip_y),) * 2
    joint_x = 0.5 * body.hip_half_width
    legs = tuple(
        _chain((side * joint_x, body.hip_y), leg, hip, hip - knee) for side, (hip, knee) in zip((1, -1), angles.legs)
    )
    shoulder_joint_y = body.shoulder_y - 0.5 * arm_w
    arms = tuple(
        _chain((side * (body.shoulder_half_width - 0.3 * arm_w), shoulder_joint_y), arm, a, a + elbow)
        for side, (a, elbow) in zip((1, -1), angles.arms)
    )
    # Ground: the lowest leg point (feet, or the seat when sitting) rests on y=0, then the jump lifts it.
    lowest = min(p[1] for chain in legs for p in chain) - 0.5 * leg_w
    dy = angles.lift - lowest

    unit = figure.placement.scale * body.height * canvas_size
    fx, fy, facing = figure.placement.x * canvas_size, figure.placement.y * canvas_size, figure.placement.facing

    def px(p: Point) -> Point:
        return (fx + facing * p[0] * unit, fy - (p[1] + dy) * unit)

    return Skeleton(
        head=px((0.0, 1.0 - body.head_radius)),
        head_radius=body.head_radius * unit,
        shoulders=(px((body.shoulder_half_width, body.shoulder_y)), px((-body.shoulder_half_width, body.shoulder_y))),
        hips=(px((body.hip_half_width, body.hip_y - 0.02)), px((-body.hip_half_width, body.hip_y - 0.02))),
        legs=tuple(tuple(px(p) for p in chain) for chain in legs),  # type: ignore[arg-type]
        arms=tuple(tuple(px(p) for p in chain) for chain in arms),  # type: ignore[arg-type]
        arm_width=arm_w * unit,
        leg_width=leg_w * unit,
        unit=unit,
        facing=facing,
    )


def _bounds(points: Sequence[Point], pad: float = 0.0) -> Box:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return (min(xs) - pad, min(ys) - pad, max(xs) + pad, max(ys) + pad)


def part_boxes(figure: Figure, size: int = 64) -> dict[str, Box]:
    """Pixel boxes of a figure's parts in a `size` image: head, torso, legs, arms and the whole figure."""
    sk = skeleton(figure, size)
    (hx, hy), r = sk.head, sk.head_radius
    boxes = {
        "head": (hx - r, hy - r, hx + r, hy + r),
        "torso": _bounds([*sk.shoulders, *sk.hips]),
        "legs": _bounds([p for chain in sk.legs for p in chain], 0.5 * sk.leg_width),
        "arms": _bounds([p for chain in sk.arms for p in chain], 0.5 * sk.arm_width),
    }
    hair = (hx - 1.5 * r, hy - 1.6 * r, hx + 1.5 * r, hy + 1.8 * r)  # hair, hats and ponytails reach out
    everything = [(b[0], b[1]) for b in (*boxes.values(), hair)] + [(b[2], b[3]) for b in (*boxes.values(), hair)]
    boxes["figure"] = _bounds(everything)
    return boxes


# ---------------------------------------------------------------------------------------------
# Drawing primitives (all coordinates in canvas pixels)
# ---------------------------------------------------------------------------------------------


def _disc(draw: ImageDraw.ImageDraw, centre: Point, radius: float, fill: RGB) -> None:
    x, y = centre
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill)


def _limb(
    draw: ImageDraw.ImageDraw,
    points: Sequence[Point],
    width: float,
    fill: RGB,
    outline: float,
    outline_colour: RGB = OUTLINE_RGB,
) -> None:
    """A thick polyline with round joints and a dark outline (outline pass first, then the fill)."""
    for colour, w in ((outline_colour, width + 2 * outline), (fill, width)):
        draw.line(list(points), fill=colour, width=max(1, round(w)))
        for p in points:
            _disc(draw, p, w / 2, colour)


def _convex_hull(points: Sequence[Point]) -> list[Point]:
    """Andrew's monotone chain."""
    pts = sorted(set(points))

    def half(seq: Sequence[Point]) -> list[Point]:
        out: list[Point] = []
        for p in seq:
            while len(out) >= 2:
                (ax, ay), (bx, by) = out[-2], out[-1]
                if (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax) > 0:
                    break
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(pts[::-1])
    return lower[:-1] + upper[:-1]


def _skirt_polygon(sk: Skeleton) -> list[Point]:
    """The skirt: hull of the waist and both thighs, 60% of the way to the knee, widened."""
    up = 0.07 * sk.unit
    points = [(x, y - up) for x, y in sk.hips]
    for hip, knee, _ in sk.legs:
        mx, my = hip[0] + 0.6 * (knee[0] - hip[0]), hip[1] + 0.6 * (knee[1] - hip[1])
        length = math.hypot(knee[0] - hip[0], knee[1] - hip[1]) or 1.0
        nx, ny = -(knee[1] - hip[1]) / length, (knee[0] - hip[0]) / length
        half = 0.5 * sk.leg_width + 0.05 * sk.unit
        points += [(mx + half * nx, my + half * ny), (mx - half * nx, my - half * ny)]
    return _convex_hull(points)


# ---------------------------------------------------------------------------------------------
# Drawing a figure
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FigurePalette:
    """The fill of each part of a drawn figure: its identity's colours (`for_identity`) or, for part maps,
    one label value per part (`part_labels`)."""

    hair: RGB
    skin: RGB  # face
    limb_skin: RGB  # hands, and legs under a skirt
    shirt: RGB  # torso and sleeves
    lower: RGB  # trousers or skirt
    shoes: RGB
    hat: RGB
    cap: RGB
    outline: RGB  # outlines, eyes, glasses

    @classmethod
    def for_identity(cls, identity: Identity) -> FigurePalette:
        skin = SKIN_RGB[identity.skin_tone]
        return cls(
            hair=COLOURS[identity.hair_colour],
            skin=skin,
            limb_skin=skin,
            shirt=COLOURS[identity.shirt_colour],
            lower=COLOURS[identity.trousers_colour],
            shoes=SHOE_RGB,
            hat=HAT_RGB,
            cap=CAP_RGB,
            outline=OUTLINE_RGB,
        )

    @classmethod
    def part_labels(cls) -> FigurePalette:
        """Each part drawn in the grey level of its index in `FIGURE_PARTS` (outlines 0: no part)."""
        return cls(outline=(0, 0, 0), **{name: (i, i, i) for i, name in enumerate(FIGURE_PARTS) if i})


# Part maps (`render_part_map`): value 0 is background or an outline, value i > 0 the part FIGURE_PARTS[i].
PART_NAMES = ("hair", "skin", "limb_skin", "shirt", "lower", "shoes", "hat", "cap")
FIGURE_PARTS = ("none", *PART_NAMES)


def _hair_back(draw: ImageDraw.ImageDraw, sk: Skeleton, identity: Identity, outline: float, p: FigurePalette) -> None:
    """Hair behind the head and body: long hair down to the shoulders, the ponytail."""
    (cx, cy), r, colour = sk.head, sk.head_radius, p.hair
    w = max(1, round(outline))
    if identity.hair_style == "long":
        draw.rounded_rectangle(
            (cx - 1.2 * r, cy - 0.6 * r, cx + 1.2 * r, cy + 2.0 * r),
            radius=0.5 * r,
            fill=colour,
            outline=p.outline,
            width=w,
        )
    elif identity.hair_style == "ponytail":
        tx, ty = cx - sk.facing * 1.15 * r, cy + 0.35 * r
        draw.ellipse(
            (tx - 0.45 * r, ty - 0.9 * r, tx + 0.45 * r, ty + 0.9 * r), fill=colour, outline=p.outline, width=w
        )


def _hair_front(draw: ImageDraw.ImageDraw, sk: Skeleton, identity: Identity, outline: float, p: FigurePalette) -> None:
    """Hair on top of the head: a fringe cap (short/long/ponytail) or a ring of curls."""
    (cx, cy), r, colour = sk.head, sk.head_radius, p.hair
    w = max(1, round(outline))
    if identity.hair_style == "bald":
        return
    top = (cx - 1.1 * r, cy - 0.15 * r - 1.1 * r, cx + 1.1 * r, cy - 0.15 * r + 1.1 * r)
    draw.chord(top, 180, 360, fill=colour, outline=p.outline, width=w)
    if identity.hair_style == "curly":
        for degrees in (-20, 10, 45, 80, 115, 150, 170, 200):
            a = math.radians(degrees)
            x, y = cx + 1.0 * r * math.cos(a), cy - 0.15 * r - 1.0 * r * math.sin(a)
            draw.ellipse(
                (x - 0.42 * r, y - 0.42 * r, x + 0.42 * r, y + 0.42 * r), fill=colour, outline=p.outline, width=w
            )


def _eye_centres(sk: Skeleton) -> tuple[Point, Point]:
    (cx, cy), r = sk.head, sk.head_radius
    x = cx + sk.facing * 0.15 * r
    return (x - 0.38 * r, cy + 0.15 * r), (x + 0.38 * r, cy + 0.15 * r)


def _face_and_accessory(
    draw: ImageDraw.ImageDraw, sk: Skeleton, identity: Identity, outline: float, p: FigurePalette
) -> None:
    (cx, cy), r = sk.head, sk.head_radius
    w = max(1, round(outline))
    eyes = _eye_centres(sk)
    for eye in eyes:
        _disc(draw, eye, 0.12 * r, p.outline)
    if identity.accessory == "glasses":
        lens, frame = 0.3 * r, max(1, round(0.14 * r))
        for ex, ey in eyes:
            draw.ellipse((ex - lens, ey - lens, ex + lens, ey + lens), outline=p.outline, width=frame)
        draw.line([(eyes[0][0] + lens, eyes[0][1]), (eyes[1][0] - lens, eyes[1][1])], fill=p.outline, width=frame)
    elif identity.accessory == "hat":
        brim_y = cy - 0.55 * r
        draw.rectangle((cx - 0.75 * r, brim_y - 1.0 * r, cx + 0.75 * r, brim_y), fill=p.hat, outline=p.outline, width=w)
        draw.rounded_rectangle(
            (cx - 1.5 * r, brim_y - 0.2 * r, cx + 1.5 * r, brim_y + 0.2 * r),
            radius=0.2 * r,
            fill=p.hat,
            outline=p.outline,
            width=w,
        )
    elif identity.accessory == "cap":
        dome = (cx - 1.02 * r, cy - 0.42 * r - 1.02 * r, cx + 1.02 * r, cy - 0.42 * r + 1.02 * r)
        draw.chord(dome, 180, 360, fill=p.cap, outline=p.outline, width=w)
        vx0, vx1 = sorted((cx, cx + sk.facing * 1.75 * r))
        draw.ellipse((vx0, cy - 0.62 * r, vx1, cy - 0.3 * r), fill=p.cap, outline=p.outline, width=w)


def draw_figure(
    draw: ImageDraw.ImageDraw, figure: Figure, canvas_size: float, palette: FigurePalette | None = None
) -> None:
    """Draw one figure, back to front: hair behind, legs, skirt, torso, arms, head, hair, face, hat.

    `palette` None draws the identity's colours; `FigurePalette.part_labels()` draws a part map."""
    identity, body = figure.identity, BODY_SHAPES[figure.identity.kind]
    p = palette if palette is not None else FigurePalette.for_identity(identity)
    sk = skeleton(figure, canvas_size)
    outline = max(1.0, 0.012 * sk.unit)
    w = max(1, round(outline))

    _hair_back(draw, sk, identity, outline, p)
    for chain in reversed(sk.legs):  # far leg first
        _limb(draw, chain, sk.leg_width, p.limb_skin if body.skirt else p.lower, outline, p.outline)
        foot = chain[2]
        toe = (foot[0] + sk.facing * 0.45 * sk.leg_width, foot[1])
        _limb(draw, (foot, toe), 0.75 * sk.leg_width, p.shoes, 0, p.outline)
    if body.skirt:
        draw.polygon(_skirt_polygon(sk), fill=p.lower, outline=p.outline, width=w)
    torso = [sk.shoulders[0], sk.shoulders[1], sk.hips[1], sk.hips[0]]
    draw.polygon(torso, fill=p.shirt, outline=p.outline, width=w)
    for chain in reversed(sk.arms):
        _limb(draw, chain, sk.arm_width, p.shirt, outline, p.outline)
        _disc(draw, chain[2], 0.6 * sk.arm_width, p.limb_skin)
    (cx, cy), r = sk.head, sk.head_radius
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=p.skin, outline=p.outline, width=w)
    _hair_front(draw, sk, identity, outline, p)
    _face_and_accessory(draw, sk, identity, outline, p)


# ---------------------------------------------------------------------------------------------
# Scenes: background + props placed by the scene's seed, in frame fractions times `s` pixels
# ---------------------------------------------------------------------------------------------

ScenePainter = Callable[[ImageDraw.ImageDraw, float, np.random.Generator], None]


def _sky_and_ground(draw: ImageDraw.ImageDraw, s: float, horizon: float, sky: RGB, ground: RGB) -> None:
    draw.rectangle((0, 0, s, horizon * s), fill=sky)
    draw.rectangle((0, horizon * s, s, s), fill=ground)


def _paint_forest(draw: ImageDraw.ImageDraw, s: float, rng: np.random.Generator) -> None:
    horizon = rng.uniform(0.5, 0.58)
    _sky_and_ground(draw, s, horizon, (165, 210, 240), (90, 160, 70))
    for _ in range(int(rng.integers(4, 7))):
        x, base, height, crown = (
            rng.uniform(0, 1),
            horizon + rng.uniform(0, 0.06),
            rng.uniform(0.22, 0.4),
            rng.uniform(0.07, 0.11),
        )
        green = (20 + int(rng.integers(0, 30)), 95 + int(rng.integers(0, 40)), 40)
        draw.rectangle(((x - 0.018) * s, (base - height) * s, (x + 0.018) * s, base * s), fill=(95, 65, 40))
        _disc(draw, (x * s, (base - height) * s), crown * s, green)
        _disc(draw, ((x - 0.6 * crown) * s, (base - height + 0.6 * crown) * s), 0.8 * crown * s, green)
        _disc(draw, ((x + 0.6 * crown) * s, (base - height + 0.6 * crown) * s), 0.8 * crown * s, green)


def _paint_beach(draw: ImageDraw.ImageDraw, s: float, rng: np.random.Generator) -> None:
    sea_top, sand_top = rng.uniform(0.42, 0.48), rng.uniform(0.58, 0.64)
    _sky_and_ground(draw, s, sea_top, (125, 195, 250), (30, 120, 200))
    _disc(draw, (rng.uniform(0.1, 0.9) * s, rng.uniform(0.08, 0.2) * s), 0.06 * s, (255, 230, 90))
    for _ in range(int(rng.integers(3, 6))):
        x, y = rng.uniform(0, 0.9), rng.uniform(sea_top + 0.02, sand_top - 0.03)
        draw.line(((x * s, y * s), ((x + 0.1) * s, y * s)), fill=(235, 245, 255), width=max(1, round(0.008 * s)))
    draw.rectangle((0, sand_top * s, s, s), fill=(238, 214, 160))


def _paint_city(draw: ImageDraw.ImageDraw, s: float, rng: np.random.Generator) -> None:
    street = rng.uniform(0.6, 0.65)
    _sky_and_ground(draw, s, street, (185, 200, 222), (150, 150, 155))
    x = -rng.uniform(0, 0.1)
    while x < 1.0:
        width, height = rng.uniform(0.15, 0.25), rng.uniform(0.25, 0.5)
        wall = ((115, 115, 130), (150, 135, 125), (100, 110, 125), (165, 150, 120))[int(rng.integers(0, 4))]
        top = street - height
        draw.rectangle((x * s, top * s, (x + width) * s, street * s), fill=wall)
        for wy in np.arange(top + 0.04, street - 0.06, 0.08):
            for wx in np.arange(x + 0.03, x + width - 0.04, 0.06):
                lit = rng.random() < 0.5
                draw.rectangle(
                    (wx * s, wy * s, (wx + 0.03) * s, (wy + 0.04) * s), fill=(250, 230, 140) if lit else (70, 80, 95)
                )
        x += width + rng.uniform(0.0, 0.03)
    draw.rectangle((0, street * s, s, (street + 0.02) * s), fill=(95, 95, 100))


def _paint_snow(draw: ImageDraw.ImageDraw, s: float, rng: np.random.Generator) -> None:
    horizon = rng.uniform(0.5, 0.58)
    _sky_and_ground(draw, s, horizon, (200, 212, 228), (236, 242, 250))
    for _ in range(int(rng.integers(2, 5))):
        x, base, height = rng.uniform(0, 1), horizon + rng.uniform(0, 0.05), rng.uniform(0.2, 0.32)
        draw.polygon(
            [(x * s, (base - height) * s), ((x - 0.07) * s, base * s), ((x + 0.07) * s, base * s)], fill=(35, 90, 60)
        )
        draw.polygon(
            [
                (x * s, (base - height) * s),
                ((x - 0.03) * s, (base - 0.6 * height) * s),
                ((x + 0.03) * s, (base - 0.6 * height) * s),
            ],
            fill=(250, 250, 255),
        )
    for _ in range(40):
        _disc(draw, (rng.uniform(0, 1) * s, rng.uniform(0, 1) * s), rng.uniform(0.004, 0.009) * s, (255, 255, 255))


def _paint_night(draw: ImageDraw.ImageDraw, s: float, rng: np.random.Generator) -> None:
    horizon = rng.uniform(0.55, 0.62)
    _sky_and_ground(draw, s, horizon, (18, 24, 60), (28, 58, 45))
    for _ in range(30):
        _disc(
            draw,
            (rng.uniform(0, 1) * s, rng.uniform(0, horizon - 0.05) * s),
            rng.uniform(0.003, 0.007) * s,
            (240, 240, 200),
        )
    mx, my = rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.22)
    _disc(draw, (mx * s, my * s), 0.065 * s, (245, 240, 200))
    _disc(draw, ((mx + 0.03) * s, (my - 0.02) * s), 0.055 * s, (18, 24, 60))  # crescent


def _paint_room(draw: ImageDraw.ImageDraw, s: float, rng: np.random.Generator) -> None:
    floor = rng.uniform(0.6, 0.66)
    wall = ((230, 210, 175), (200, 222, 205), (218, 202, 228))[int(rng.integers(0, 3))]
    _sky_and_ground(draw, s, floor, wall, (170, 118, 72))
    for y in np.arange(floor + 0.08, 1.0, 0.09):
        draw.line(((0, y * s), (s, y * s)), fill=(140, 95, 55), width=max(1, round(0.006 * s)))
    draw.rectangle((0, (floor - 0.025) * s, s, floor * s), fill=(245, 245, 240))
    wx, wy = rng.uniform(0.05, 0.6), rng.uniform(0.08, 0.18)
    frame = max(1, round(0.015 * s))
    draw.rectangle(
        (wx * s, wy * s, (wx + 0.3) * s, (wy + 0.28) * s), fill=(170, 212, 245), outline=(250, 250, 250), width=frame
    )
    draw.line((((wx + 0.15) * s, wy * s), ((wx + 0.15) * s, (wy + 0.28) * s)), fill=(250, 250, 250), width=frame)
    draw.line(((wx * s, (wy + 0.14) * s), ((wx + 0.3) * s, (wy + 0.14) * s)), fill=(250, 250, 250), width=frame)
    px = (wx + 0.45) % 0.85 + 0.02
    draw.rectangle((px * s, 0.2 * s, (px + 0.12) * s, 0.32 * s), fill=(200, 90, 60), outline=(90, 60, 40), width=frame)


SCENE_PAINTERS: Mapping[str, ScenePainter] = MappingProxyType(
    {
        "forest": _paint_forest,
        "beach": _paint_beach,
        "city": _paint_city,
        "snow": _paint_snow,
        "night": _paint_night,
        "room": _paint_room,
    }
)


# ---------------------------------------------------------------------------------------------
# Rendering panels and strips
# ---------------------------------------------------------------------------------------------


def _check_size(size: int, supersample: int) -> None:
    if size < 8:
        raise ValueError(f"size={size} is too small to draw a character; use 8 or more (64 by default)")
    if supersample < 1:
        raise ValueError(f"supersample={supersample} must be >= 1 (4 by default)")


def render_panel(panel: Panel, size: int = 64, supersample: int = 4) -> Image.Image:
    """The panel as a size x size RGB image: drawn at size*supersample, then downsampled (LANCZOS)."""
    _check_size(size, supersample)
    canvas = size * supersample
    image = Image.new("RGB", (canvas, canvas))
    draw = ImageDraw.Draw(image)
    SCENE_PAINTERS[panel.scene.kind](draw, float(canvas), np.random.default_rng(panel.scene.seed))
    for figure in sorted(panel.figures, key=lambda f: f.placement.y):  # further back (higher up) first
        draw_figure(draw, figure, float(canvas))
    return image.resize((size, size), Image.Resampling.LANCZOS) if supersample > 1 else image


def render_part_map(panel: Panel, size: int = 256) -> np.ndarray:
    """(size, size) uint8 map of which figure part each pixel shows (index into `FIGURE_PARTS`; 0 = none),
    drawn with the same geometry as `render_panel` (no anti-aliasing: render large and pool)."""
    _check_size(size, 1)
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    labels = FigurePalette.part_labels()
    for figure in sorted(panel.figures, key=lambda f: f.placement.y):
        draw_figure(draw, figure, float(size), labels)
    return np.asarray(image)[..., 0].copy()


def strip_shape(num_panels: int, layout: str) -> tuple[int, int]:
    """(columns, rows) of a strip: a row of 2-4 panels, or a 2x2 grid of exactly 4."""
    _check_choice("layout", layout, ("row", "grid"))
    if not 1 <= num_panels <= 4:
        raise ValueError(f"a strip holds 1-4 panels, got {num_panels}")
    if layout == "grid" and num_panels != 4:
        raise ValueError(f"layout='grid' needs 4 panels, got {num_panels}; use layout='row' for fewer")
    return (2, 2) if layout == "grid" else (num_panels, 1)


def render_strip(panels: Sequence[Panel], size: int = 64, layout: str = "row", supersample: int = 4) -> Image.Image:
    """Panels side by side (row, left to right) or in a 2x2 grid (reading order), each size x size."""
    columns, rows = strip_shape(len(panels), layout)
    strip = Image.new("RGB", (columns * size, rows * size))
    for i, panel in enumerate(panels):
        strip.paste(render_panel(panel, size, supersample), ((i % columns) * size, (i // columns) * size))
    return strip


def strip_caption(panels: Sequence[Panel], separator: str = " | ") -> str:
    """One caption for a strip: the panels' captions in reading order, joined by `separator`.

    A trainer may prefer the per-panel captions (`panel.caption`) with per-panel conditioning.
    """
    return separator.join(panel.caption for panel in panels)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join_and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def mentionable(identity: Identity, keep: frozenset[str]) -> frozenset[str]:
    """The attributes of `keep` a caption can actually say: never a bald head's hair colour, nor 'no accessory'."""
    names = set(keep)
    if identity.hair_style == "bald":
        names.discard("hair_colour")
    if identity.accessory == "none":
        names.discard("accessory")
    return frozenset(names)


def describe(identity: Identity, mentioned: frozenset[str], shirt_with: bool = True) -> str:
    """A noun phrase naming the kind and the `mentioned` attributes, e.g. 'a bald man with glasses'.

    `shirt_with` says the shirt with 'with' ('with ... and a blue shirt') or with 'wearing'.
    """
    style, colour = identity.hair_style, identity.hair_colour
    say_style, say_colour = "hair_style" in mentioned, "hair_colour" in mentioned and style != "bald"
    noun = f"bald {identity.kind}" if say_style and style == "bald" else identity.kind
    with_items: list[str] = []
    wearing: list[str] = []
    if say_style and style == "ponytail":
        tail = f"{colour} ponytail" if say_colour else "ponytail"
        with_items.append(f"{_article(tail)} {tail}")
    elif (say_style and style != "bald") or say_colour:
        with_items.append(
            " ".join(w for w in (style if say_style else "", colour if say_colour else "") if w) + " hair"
        )
    if "skin_tone" in mentioned:
        with_items.append(f"{identity.skin_tone} skin")
    if "accessory" in mentioned and identity.accessory == "glasses":
        with_items.append("glasses")
    if "shirt_colour" in mentioned:
        shirt = f"{_article(identity.shirt_colour)} {identity.shirt_colour} shirt"
        (with_items if shirt_with else wearing).append(shirt)
    if "trousers_colour" in mentioned:
        lower = identity.trousers_colour
        skirt = BODY_SHAPES[identity.kind].skirt
        wearing.append(f"{_article(lower)} {lower} skirt" if skirt else f"{lower} trousers")
    if "accessory" in mentioned and identity.accessory in ("hat", "cap"):
        wearing.append(f"a {identity.accessory}")
    phrase = f"{_article(noun)} {noun}"
    if with_items:
        phrase += " with " + _join_and(with_items)
    if wearing:
        phrase += (", wearing " if with_items else " wearing ") + _join_and(wearing)
    return phrase


def caption_for(
    figures: Sequence[Figure],
    scene: Scene,
    rng: np.random.Generator,
    omit_probability: float = 0.5,
    omit_all_probability: float = 0.15,
) -> tuple[str, frozenset[str]]:
    """A caption for the figures in the scene, and the names of what it mentions (see `Panel`).

    With probability `omit_all_probability` no identity attribute is said; otherwise each is left
    out independently with probability `omit_probability`. Kind, pose and scene are always said.
    Draws the same number of random numbers whatever the outcome.
    """
    for name, p in (("omit_probability", omit_probability), ("omit_all_probability", omit_all_probability)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name}={p} must be a probability in [0, 1]")
    if not figures:
        return SCENE_NOUNS[scene.kind], frozenset({"scene"})
    omit_all = rng.random() < omit_all_probability
    parts, mentioned = [], {"scene"}
    for i, figure in enumerate(figures):
        draws = rng.random(len(OMITTABLE_ATTRIBUTES) + 1)
        keep = frozenset(a for a, u in zip(OMITTABLE_ATTRIBUTES, draws) if u >= omit_probability and not omit_all)
        said = mentionable(figure.identity, keep) | {"kind", "pose"}
        mentioned |= {mention_key(name, i) for name in said}
        parts.append((describe(figure.identity, said, shirt_with=draws[-1] < 0.5), figure.pose))
    where = SCENE_PHRASES[scene.kind]
    if len(parts) == 1:
        ((who, pose),) = parts
        return f"{who}, {pose} {where}", frozenset(mentioned)
    people = ", and ".join(f"{who}, {pose}" for who, pose in parts)
    return f"{people}, {where}", frozenset(mentioned)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def sample_placement(
    rng: np.random.Generator,
    x_range: tuple[float, float] = (0.3, 0.7),
    y_range: tuple[float, float] = (0.8, 0.95),
    scale_range: tuple[float, float] = (0.5, 0.72),
) -> Placement:
    """A placement that keeps a standing figure mostly inside the frame, facing left or right."""
    x, y, scale, flip = rng.uniform(*x_range), rng.uniform(*y_range), rng.uniform(*scale_range), rng.random()
    return Placement(float(x), float(y), float(scale), 1 if flip < 0.5 else -1)


def sample_phase(pose: str, rng: np.random.Generator) -> float:
    """A gait phase; jumps are caught in the air (phase 0.2-0.8) so that the pose reads as a jump."""
    u = float(rng.random())
    return 0.2 + 0.6 * u if pose == "jumping" else u


# Where figures stand, by number of figures in the panel: two stand side by side, a bit smaller.
_PLACEMENT_RANGES = (
    (),
    (((0.3, 0.7), (0.8, 0.95), (0.5, 0.72)),),
    (((0.18, 0.38), (0.8, 0.95), (0.42, 0.6)), ((0.62, 0.82), (0.8, 0.95), (0.42, 0.6))),
)


def _sample_figures(
    rng: np.random.Generator, identities: Sequence[Identity], poses: Sequence[str]
) -> tuple[Figure, ...]:
    ranges = _PLACEMENT_RANGES[len(identities)]
    return tuple(
        Figure(identity, pose, sample_placement(rng, *r), sample_phase(pose, rng))
        for identity, pose, r in zip(identities, poses, ranges)
    )


def sample_panel(
    rng: np.random.Generator,
    identity: Identity | None = None,
    num_figures: int = 1,
    omit_probability: float = 0.5,
    *,
    pose: str | None = None,
    scene: str | None = None,
) -> Panel:
    """A random panel: pose(s), scene, placement(s) and caption drawn from `rng`.

    `identity` (random if None) is figure 0, the left one when there are two. `pose` and `scene`
    fix those instead of drawing them; with two figures `pose` applies to both.
    """
    if num_figures not in (0, 1, 2):
        raise ValueError(f"num_figures={num_figures} must be 0, 1 or 2")
    if pose is not None:
        _check_choice("pose", pose, POSES)
    scene_kind = scene if scene is not None else str(rng.choice(SCENES))
    the_scene = Scene(scene_kind, int(rng.integers(0, 2**31)))
    first = [identity if identity is not None else Identity.random(rng)] if num_figures else []
    identities = first + [Identity.random(rng) for _ in range(num_figures - len(first))]
    poses = [pose if pose is not None else str(rng.choice(POSES)) for _ in identities]
    figures = _sample_figures(rng, identities, poses)
    caption, mentioned = caption_for(figures, the_scene, rng, omit_probability)
    return Panel(the_scene, figures, caption, mentioned)


def sample_strip(
    rng: np.random.Generator,
    identity: Identity | None = None,
    panels: int | None = None,
    layout: str = "row",
    size: int = 64,
    omit_probability: float = 0.5,
) -> tuple[Image.Image, list[Panel]]:
    """One character in 2-4 panels with different poses and scenes, a caption per panel.

    `panels` None draws 2-4 for a row and takes 4 for a grid. Returns the strip image (see
    `render_strip`) and the panels; `strip_caption(panels)` joins their captions.
    """
    count = panels if panels is not None else (4 if layout == "grid" else int(rng.integers(2, 5)))
    strip_shape(count, layout)  # validates count and layout before any drawing
    if count < 2:
        raise ValueError(f"panels={count}: a strip shows the character at least twice (2-4)")
    identity = identity if identity is not None else Identity.random(rng)
    poses = [str(p) for p in rng.choice(POSES, size=count, replace=False)]
    scenes = [str(s) for s in rng.choice(SCENES, size=count, replace=False)]
    result = [sample_panel(rng, identity, 1, omit_probability, pose=p, scene=s) for p, s in zip(poses, scenes)]
    return render_strip(result, size, layout), result


# ---------------------------------------------------------------------------------------------
# Animation (for video): a character moving through a scene
# ---------------------------------------------------------------------------------------------


def animate(
    identity: Identity,
    pose: str,
    scene: Scene,
    start: Placement,
    end: Placement,
    num_frames: int,
    *,
    phase_step: float = 0.125,
    start_phase: float = 0.0,
    rng: np.random.Generator | None = None,
    omit_probability: float = 0.5,
) -> list[Panel]:
    """Frames of one character moving from `start` to `end` while its gait phase advances.

    Frame i is at `lerp_placement(start, end, i / (num_frames - 1))` with phase
    `(start_phase + i * phase_step) % 1`: walking across with end != start, jumping in place with
    end == start. The ground-truth trajectory is the frames' placements. All frames share one
    caption, drawn from `rng` with `omit_probability`; without `rng` it mentions every attribute.
    """
    _check_choice("pose", pose, POSES)
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be >= 1")
    figures = []
    for i in range(num_frames):
        placement = lerp_placement(start, end, i / max(1, num_frames - 1))
        figures.append(Figure(identity, pose, placement, (start_phase + i * phase_step) % 1.0))
    if rng is None:
        said = mentionable(identity, frozenset(OMITTABLE_ATTRIBUTES)) | {"kind", "pose"}
        caption, mentioned = f"{describe(identity, said)}, {pose} {SCENE_PHRASES[scene.kind]}", said | {"scene"}
    else:
        caption, mentioned = caption_for(figures[:1], scene, rng, omit_probability)
    return [Panel(scene, (figure,), caption, frozenset(mentioned)) for figure in figures]
