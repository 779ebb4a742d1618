"""Question/answer samples over the shape world, for training and evaluating the demo chat model.

Images: single shapes from ``generate_shapes.py`` (``sample_spec`` + ``render``), position scenes (one shape
clearly left / right / top / bottom) and count scenes (1-4 non-overlapping shapes), composited with the same
masks, colours and backgrounds; or shapes drawn with plain PIL calls (``pil_image``, a renderer training
never sees). Questions: colour, shape, colour+shape, count, position, yes/no and "which image" (the official
``Image-1: <image>\\nImage-2: <image>\\n...`` prefix, which is also what grounded ``/chat`` sends), in five
languages, with short answers in the question's language. Everything is a pure function of its seed.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate_shapes as gs  # noqa: E402
from shapes_vocab import (  # noqa: E402
    BACKGROUNDS,
    COLOURS,
    LANGUAGES,
    POSITION_NAMES,
    POSITIONS,
    SHAPE_NAMES,
    SHAPES,
    label,
    with_article,
)

KINDS = ("colour", "shape", "colour_shape", "count", "position", "yesno", "which")
#: the four position answers and their index in ``shapes_vocab.POSITIONS``
REGIONS = {"left": POSITIONS.index("left"), "right": POSITIONS.index("right"),
           "top": POSITIONS.index("top"), "bottom": POSITIONS.index("bottom")}  # fmt: skip

# --- answers --------------------------------------------------------------------------------------------
#: colour names as answers (nouns; es/fr masculine, as a colour is named on its own)
COLOUR_ANSWERS = {
    "en": {c: c for c in COLOURS},
    "zh": dict(red="红色", orange="橙色", yellow="黄色", green="绿色", blue="蓝色", purple="紫色",
               pink="粉色", black="黑色"),
    "ja": dict(red="赤", orange="オレンジ", yellow="黄色", green="緑", blue="青", purple="紫",
               pink="ピンク", black="黒"),
    "es": dict(red="rojo", orange="naranja", yellow="amarillo", green="verde", blue="azul",
               purple="morado", pink="rosa", black="negro"),
    "fr": dict(red="rouge", orange="orange", yellow="jaune", green="vert", blue="bleu", purple="violet",
               pink="rose", black="noir"),
}  # fmt: skip
YES_NO = {"en": ("Yes", "No"), "zh": ("是", "否"), "ja": ("はい", "いいえ"), "es": ("Sí", "No"),
          "fr": ("Oui", "Non")}  # fmt: skip

# --- questions ("{a}": noun phrase with article, "{obj}": without) ------------------------------------------
QUESTIONS = {
    "en": {
        "colour": ["What colour is the shape?", "What color is it?", "What colour is this shape?",
                   "What is the colour of the shape?", "What color is the shape in the image?",
                   "Which colour is it?"],
        "shape": ["What shape is this?", "What shape is it?", "Which shape is shown?",
                  "What is the shape in the image?", "What kind of shape is this?"],
        "colour_shape": ["What is in the image?", "Describe the shape.", "What do you see?",
                         "What is shown in the picture?"],
        "count": ["How many shapes are there?", "How many shapes are in the image?", "Count the shapes.",
                  "How many objects do you see?", "How many shapes can you see?"],
        "position": ["Where is the shape?", "Where is the shape in the image?", "Where is it?",
                     "In which part of the image is the shape?"],
        "yesno": ["Is there {a}?", "Is this {a}?", "Does the image show {a}?",
                  "Is there {a} in the picture?"],
        "which": ["Which image shows {a}?", "Which picture has {a}?", "Which image has {a}?",
                  "In which image is there {a}?", "Which image contains {a}?", "Which picture shows {a}?"],
    },
    "zh": {
        "colour": ["图中的形状是什么颜色？", "它是什么颜色？", "这个形状是什么颜色的？", "图形是什么颜色？"],
        "shape": ["这是什么形状？", "图中是什么形状？", "这个图形是什么形状？", "图片里的形状是什么？"],
        "colour_shape": ["图中有什么？", "描述一下这个形状。", "图片里画的是什么？"],
        "count": ["图中有几个形状？", "有多少个形状？", "图片里有几个图形？"],
        "position": ["形状在哪里？", "形状在图中的什么位置？", "它在哪里？"],
        "yesno": ["图中有{obj}吗？", "这是{obj}吗？", "有{obj}吗？"],
        "which": ["哪张图片里有{obj}？", "哪张图片显示了{obj}？", "{obj}在哪张图片里？", "哪张图有{obj}？"],
    },
    "ja": {
        "colour": ["図形は何色ですか？", "これは何色ですか？", "この形は何色？"],
        "shape": ["これは何の形ですか？", "どんな形ですか？", "画像の図形は何ですか？"],
        "colour_shape": ["画像に何がありますか？", "この図形を説明してください。"],
        "count": ["図形はいくつありますか？", "形は何個ありますか？"],
        "position": ["図形はどこにありますか？", "形は画像のどこですか？"],
        "yesno": ["{obj}はありますか？", "これは{obj}ですか？", "画像に{obj}がありますか？"],
        "which": ["{obj}が写っているのはどの画像ですか？", "どの画像に{obj}がありますか？"],
    },
    "es": {
        "colour": ["¿De qué color es la figura?", "¿De qué color es?", "¿Qué color tiene la forma?"],
        "shape": ["¿Qué forma es esta?", "¿Qué figura es?", "¿Qué forma tiene?"],
        "colour_shape": ["¿Qué hay en la imagen?", "Describe la figura."],
        "count": ["¿Cuántas figuras hay?", "¿Cuántas formas hay en la imagen?"],
        "position": ["¿Dónde está la figura?", "¿En qué parte de la imagen está la forma?"],
        "yesno": ["¿Hay {a}?", "¿Es {a}?", "¿La imagen muestra {a}?"],
        "which": ["¿Qué imagen muestra {a}?", "¿En qué imagen hay {a}?"],
    },
    "fr": {
        "colour": ["De quelle couleur est la forme ?", "Quelle est sa couleur ?",
                   "De quelle couleur est-elle ?"],
        "shape": ["Quelle forme est-ce ?", "Quelle est cette forme ?", "C'est quelle forme ?"],
        "colour_shape": ["Qu'y a-t-il sur l'image ?", "Décris la forme."],
        "count": ["Combien de formes y a-t-il ?", "Combien de formes vois-tu ?"],
        "position": ["Où est la forme ?", "Où se trouve la forme dans l'image ?"],
        "yesno": ["Y a-t-il {a} ?", "Est-ce {a} ?", "L'image montre-t-elle {a} ?"],
        "which": ["Quelle image montre {a} ?", "Dans quelle image y a-t-il {a} ?"],
    },
}  # fmt: skip
#: colour questions that name the shape ("{s}": the shape with its definite article)
COLOUR_NAMED = {
    "en": ["What colour is {s}?", "What color is {s}?", "Which colour is {s}?"],
    "zh": ["{s}是什么颜色？", "图中的{s}是什么颜色？"],
    "ja": ["{s}は何色ですか？", "この{s}は何色？"],
    "es": ["¿De qué color es {s}?", "¿Qué color tiene {s}?"],
    "fr": ["De quelle couleur est {s} ?", "Quelle est la couleur de {s} ?"],
}  # fmt: skip


def the_shape(shape: str, lang: str) -> str:
    """The shape's name with the definite article where the language has one."""
    name = SHAPE_NAMES[lang][shape]
    if lang == "en":
        return f"the {name}"
    if lang == "es":
        return ("la " if shape in ("star", "cross") else "el ") + name
    if lang == "fr":
        return "l'" + name if shape in ("star", "hexagon") else ("la " if shape == "cross" else "le ") + name
    return name


def phrase(shape: str, colour: str, lang: str) -> tuple[str, str]:
    """``(with article, without)`` noun phrases, e.g. ``("a red circle", "red circle")``."""
    obj = label(shape, colour, lang)
    return with_article(obj, shape, lang), obj


def answer_text(
    kind: str,
    lang: str,
    *,
    shape: str = "",
    colour: str = "",
    count: int = 0,
    region: str = "",
    yes: bool = False,
    image: int = 0,
) -> str:
    """The short answer of a question ``kind`` in ``lang``."""
    if kind == "colour":
        return COLOUR_ANSWERS[lang][colour]
    if kind == "shape":
        return SHAPE_NAMES[lang][shape]
    if kind == "colour_shape":
        return phrase(shape, colour, lang)[1]
    if kind == "count":
        return str(count)
    if kind == "position":
        return POSITION_NAMES[lang][REGIONS[region]]
    if kind == "yesno":
        return YES_NO[lang][0 if yes else 1]
    if kind == "which":
        return f"Image-{image}"
    raise ValueError(f"unknown question kind {kind!r}; known: {', '.join(KINDS)}")


def question_text(kind: str, lang: str, rng: random.Random, shape: str = "", colour: str = "") -> str:
    """A random phrasing of a question ``kind`` (about ``colour`` ``shape`` for yes/no and which-image; a
    colour question given ``shape`` names it)."""
    if kind == "colour" and shape:
        return rng.choice(COLOUR_NAMED[lang]).format(s=the_shape(shape, lang))
    a, obj = phrase(shape, colour, lang) if shape and colour else ("", "")
    return rng.choice(QUESTIONS[lang][kind]).format(a=a, obj=obj)


# --- scenes ---------------------------------------------------------------------------------------------
def _composite(w: int, h: int, items: list[dict], rng: random.Random, kind: str) -> Image.Image:
    """Shapes ``items`` (shape, colour, cx, cy, r, angle) over one background (plain or textured)."""
    fills = [gs.jitter_colour(COLOURS[it["colour"]], rng) for it in items]
    canvas = gs.background(h, w, fills[0], kind, rng)
    for it, fill in zip(items, fills, strict=True):
        mask = gs.shape_mask(it["shape"], h, w, it["cx"], it["cy"], it["r"], it["angle"])[..., None]
        canvas = canvas * (1 - mask) + fill * mask
    return Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")


def position_scene(rng: random.Random, region: str) -> tuple[Image.Image, dict]:
    """One shape clearly in ``region`` (left/right: middle third vertically; top/bottom: horizontally)."""
    w, h = rng.randint(56, 144), rng.randint(56, 144)
    r = rng.uniform(0.14, 0.24) * min(w, h)
    side = rng.uniform(r + 1, 0.27 * (w if region in ("left", "right") else h))
    along = rng.uniform(0.4, 0.6)
    if region in ("left", "right"):
        cx = side if region == "left" else w - side
        cy = along * h
    else:
        cy = side if region == "top" else h - side
        cx = along * w
    item = {"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)), "cx": cx, "cy": cy, "r": r,
            "angle": rng.uniform(-0.3, 0.3)}  # fmt: skip
    return _composite(w, h, [item], rng, rng.choice(BACKGROUNDS)), {**item, "region": region}


def count_scene(rng: random.Random, n: int) -> tuple[Image.Image, dict]:
    """``n`` (1-4) non-overlapping shapes of random shapes and colours."""
    w, h = rng.randint(64, 160), rng.randint(64, 160)
    items: list[dict] = []
    while len(items) < n:
        items = []
        for _ in range(200):
            r = rng.uniform(0.1, 0.2) * min(w, h)
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            if all(math.hypot(cx - o["cx"], cy - o["cy"]) > 1.5 * (r + o["r"]) + 2 for o in items):
                items.append({"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)), "cx": cx,
                              "cy": cy, "r": r, "angle": rng.uniform(-0.3, 0.3)})  # fmt: skip
                if len(items) == n:
                    break
    return _composite(w, h, items, rng, rng.choice(BACKGROUNDS)), {"count": n, "items": items}


def single_shape(
    rng: random.Random, shape: str | None = None, colour: str | None = None
) -> tuple[Image.Image, dict]:
    """A shape-world image (``generate_shapes``), optionally of a given shape and colour."""
    spec = gs.sample_spec(rng)
    if shape:
        spec["shape"] = shape
    if colour:
        spec["colour"] = colour
    return gs.render(spec, rng), spec


PIL_COLOURS = {"red": "red", "orange": "orange", "yellow": "gold", "green": "green", "blue": "blue",
               "purple": "purple", "pink": "hotpink", "black": "black"}  # fmt: skip


def pil_draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: str) -> None:
    """One shape with plain ``ImageDraw`` calls (ellipse, rectangle, regular_polygon, polygon)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r], fill=fill)
    elif shape == "triangle":
        draw.regular_polygon((cx, cy + 0.15 * r, r), 3, fill=fill)
    elif shape == "hexagon":
        draw.regular_polygon((cx, cy, r), 6, rotation=30, fill=fill)
    elif shape == "star":
        pts = [(cx + (r if i % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + i * math.pi / 5),
                cy + (r if i % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + i * math.pi / 5))
               for i in range(10)]  # fmt: skip
        draw.polygon(pts, fill=fill)
    elif shape == "cross":
        a = 0.36 * r
        draw.rectangle([cx - a, cy - r, cx + a, cy + r], fill=fill)
        draw.rectangle([cx - r, cy - a, cx + r, cy + a], fill=fill)
    elif shape == "heart":
        draw.ellipse([cx - r, cy - 0.75 * r, cx, cy + 0.1 * r], fill=fill)
        draw.ellipse([cx, cy - 0.75 * r, cx + r, cy + 0.1 * r], fill=fill)
        draw.polygon(
            [(cx - 0.95 * r, cy - 0.15 * r), (cx + 0.95 * r, cy - 0.15 * r), (cx, cy + r)], fill=fill
        )
    else:
        raise ValueError(f"unknown shape {shape!r}")


def pil_scene(rng: random.Random, items: list[dict], w: int, h: int) -> Image.Image:
    """Shapes drawn with PIL on a white or light grey background."""
    image = Image.new("RGB", (w, h), rng.choice(["white", "#e8e8e8", "#f4f0e0"]))
    draw = ImageDraw.Draw(image)
    for it in items:
        pil_draw(draw, it["shape"], it["cx"], it["cy"], it["r"], PIL_COLOURS[it["colour"]])
    return image


# --- samples --------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One question about ``images``: the prompt text (with ``<image>`` placeholders) and its answer.
    ``objects``: the (shape, colour) of each image with a single shape (``None`` for count scenes);
    ``asked``: the (shape, colour) a yes/no or which-image question names. Both feed the training's
    grounding loss (``train_demo_chat.py --align``)."""

    kind: str
    lang: str
    question: str
    answer: str
    images: list[Image.Image] = field(repr=False)
    objects: list[tuple[str, str] | None] = field(default_factory=list)
    asked: tuple[str, str] | None = None


def _prefix(n: int, rng: random.Random, grounded_share: float) -> str:
    if n == 1 and rng.random() >= grounded_share:
        return "<image>\n"  # what chat() prepends to a single image
    return "".join(f"Image-{i + 1}: <image>\n" for i in range(n))  # multi-image / grounded /chat


def _distractor(rng: random.Random, shape: str, colour: str) -> tuple[str, str]:
    """A different (shape, colour): same shape, same colour or neither."""
    mode = rng.random()
    colours = [c for c in COLOURS if c != colour]
    shapes = [s for s in SHAPES if s != shape]
    if mode < 0.4:
        return shape, rng.choice(colours)
    if mode < 0.8:
        return rng.choice(shapes), colour
    return rng.choice(shapes), rng.choice(colours)


def make_sample(
    kind: str, lang: str, rng: random.Random, *, pil: bool = False, grounded_share: float = 0.3
) -> Sample:
    """A random sample of ``kind`` in ``lang``; ``pil``: images drawn with plain PIL calls."""

    def one(shape: str | None = None, colour: str | None = None) -> tuple[Image.Image, dict]:
        if not pil:
            return single_shape(rng, shape, colour)
        w, h = rng.randint(56, 144), rng.randint(56, 144)
        r = rng.uniform(0.2, 0.38) * min(w, h)
        it = {"shape": shape or rng.choice(SHAPES), "colour": colour or rng.choice(list(COLOURS)),
              "cx": rng.uniform(r, w - r), "cy": rng.uniform(r, h - r), "r": r}  # fmt: skip
        return pil_scene(rng, [it], w, h), it

    if kind == "which":
        n = rng.choice([1, 2, 3, 3, 3, 4, 5])
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        target = rng.randrange(n)
        specs = [(shape, colour) if i == target else _distractor(rng, shape, colour) for i in range(n)]
        images = [one(s, c)[0] for s, c in specs]
        q = _prefix(n, rng, 1.0) + question_text(kind, lang, rng, shape, colour)
        answer = answer_text(kind, lang, image=target + 1)
        return Sample(kind, lang, q, answer, images, specs, (shape, colour))
    if kind == "count":
        n = rng.randint(1, 4)
        if pil:
            _, scene = count_scene(rng, n)
            w, h = rng.randint(64, 160), rng.randint(64, 160)
            image = pil_scene(rng, _rescale(scene["items"], w, h), w, h)
        else:
            image, _ = count_scene(rng, n)
        q = _prefix(1, rng, grounded_share) + question_text(kind, lang, rng)
        return Sample(kind, lang, q, answer_text(kind, lang, count=n), [image], [None])
    if kind == "position":
        region = rng.choice(list(REGIONS))
        image, it = position_scene(rng, region)
        if pil:
            image = pil_scene(rng, [it], *image.size)
        q = _prefix(1, rng, grounded_share) + question_text(kind, lang, rng)
        answer = answer_text(kind, lang, region=region)
        return Sample(kind, lang, q, answer, [image], [(it["shape"], it["colour"])])
    image, spec = one()
    objects = [(spec["shape"], spec["colour"])]
    if kind == "yesno":
        yes = rng.random() < 0.5
        shape, colour = (
            (spec["shape"], spec["colour"]) if yes else _distractor(rng, spec["shape"], spec["colour"])
        )
        q = _prefix(1, rng, grounded_share) + question_text(kind, lang, rng, shape, colour)
        return Sample(kind, lang, q, answer_text(kind, lang, yes=yes), [image], objects, (shape, colour))
    named = spec["shape"] if kind == "colour" and rng.random() < 0.35 else ""
    q = _prefix(1, rng, grounded_share) + question_text(kind, lang, rng, named)
    answer = answer_text(kind, lang, shape=spec["shape"], colour=spec["colour"])
    return Sample(kind, lang, q, answer, [image], objects)


def _rescale(items: list[dict], w: int, h: int) -> list[dict]:
    """Count-scene items laid out for another canvas: kept apart by drawing them on a 2x2 grid."""
    cells = [(0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73)]
    r = 0.17 * min(w, h)
    return [{**it, "cx": cx * w, "cy": cy * h, "r": r} for it, (cx, cy) in zip(items, cells, strict=False)]


def make_samples(
    n: int,
    seed: int,
    *,
    kinds: tuple[str, ...] = KINDS,
    languages: tuple[str, ...] = LANGUAGES,
    weights: dict[str, float] | None = None,
    pil: bool = False,
    start: int = 0,
) -> list[Sample]:
    """Samples ``start .. start + n - 1``; sample ``i`` is a pure function of ``(seed, i)``. Kinds drawn
    with ``weights``, languages cycled."""
    w = [float((weights or {}).get(k, 1.0)) for k in kinds]
    out = []
    for i in range(start, start + n):
        rng = random.Random(seed * 1_000_003 + i)
        kind = rng.choices(kinds, weights=w)[0]
        out.append(make_sample(kind, languages[i % len(languages)], rng, pil=pil))
    return out
