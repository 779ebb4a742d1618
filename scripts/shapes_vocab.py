"""Vocabulary of the procedural shapes dataset: shape and colour names, caption templates, 5 languages.

Shared by ``generate_shapes.py`` (captions, ``labels.json``) and its tests. Every caption is built from
these tables, so adding a language means adding one entry to each table below.
"""

from __future__ import annotations

import random

LANGUAGES = ("en", "zh", "ja", "es", "fr")
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "heart")
#: colour name -> base RGB (the renderer jitters hue, saturation and value around it)
COLOURS = {
    "red": (215, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 25),
    "green": (35, 160, 55),
    "blue": (30, 75, 215),
    "purple": (125, 45, 175),
    "pink": (245, 125, 185),
    "black": (25, 25, 25),
}
SIZES = ("small", "medium", "large")
#: 3x3 grid of the shape centre, row-major
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "centre",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
BACKGROUNDS = ("plain", "textured")

# --- names per language (Spanish/French adjectives agree with the noun's gender) -----------------------
SHAPE_NAMES = {
    "en": dict(
        circle="circle",
        square="square",
        triangle="triangle",
        star="star",
        hexagon="hexagon",
        cross="cross",
        heart="heart",
    ),
    "zh": dict(
        circle="圆形",
        square="正方形",
        triangle="三角形",
        star="五角星",
        hexagon="六边形",
        cross="十字形",
        heart="心形",
    ),
    "ja": dict(
        circle="円",
        square="四角形",
        triangle="三角形",
        star="星",
        hexagon="六角形",
        cross="十字",
        heart="ハート",
    ),
    "es": dict(
        circle="círculo",
        square="cuadrado",
        triangle="triángulo",
        star="estrella",
        hexagon="hexágono",
        cross="cruz",
        heart="corazón",
    ),
    "fr": dict(
        circle="cercle",
        square="carré",
        triangle="triangle",
        star="étoile",
        hexagon="hexagone",
        cross="croix",
        heart="cœur",
    ),
}
FEMININE = {"es": {"star", "cross"}, "fr": {"star", "cross"}}
#: colour -> (masculine, feminine) for es/fr, plain string elsewhere
COLOUR_NAMES = {
    "en": {c: c for c in COLOURS},
    "zh": dict(
        red="红色",
        orange="橙色",
        yellow="黄色",
        green="绿色",
        blue="蓝色",
        purple="紫色",
        pink="粉色",
        black="黑色",
    ),
    "ja": dict(
        red="赤い",
        orange="オレンジ色の",
        yellow="黄色い",
        green="緑の",
        blue="青い",
        purple="紫の",
        pink="ピンクの",
        black="黒い",
    ),
    "es": dict(
        red=("rojo", "roja"),
        orange=("naranja", "naranja"),
        yellow=("amarillo", "amarilla"),
        green=("verde", "verde"),
        blue=("azul", "azul"),
        purple=("morado", "morada"),
        pink=("rosa", "rosa"),
        black=("negro", "negra"),
    ),
    "fr": dict(
        red=("rouge", "rouge"),
        orange=("orange", "orange"),
        yellow=("jaune", "jaune"),
        green=("vert", "verte"),
        blue=("bleu", "bleue"),
        purple=("violet", "violette"),
        pink=("rose", "rose"),
        black=("noir", "noire"),
    ),
}
SIZE_NAMES = {
    "en": dict(small="small", medium="medium-sized", large="large"),
    "zh": dict(small="小的", medium="中等大小的", large="大的"),
    "ja": dict(small="小さな", medium="中くらいの", large="大きな"),
    "es": dict(small=("pequeño", "pequeña"), medium=("mediano", "mediana"), large=("grande", "grande")),
    "fr": dict(small=("petit", "petite"), medium=("moyen", "moyenne"), large=("grand", "grande")),
}
POSITION_NAMES = {
    "en": (
        "at the top left",
        "at the top",
        "at the top right",
        "on the left",
        "in the centre",
        "on the right",
        "at the bottom left",
        "at the bottom",
        "at the bottom right",
    ),
    "zh": ("左上角", "上方", "右上角", "左边", "中间", "右边", "左下角", "下方", "右下角"),
    "ja": ("左上", "上", "右上", "左", "中央", "右", "左下", "下", "右下"),
    "es": (
        "arriba a la izquierda",
        "arriba",
        "arriba a la derecha",
        "a la izquierda",
        "en el centro",
        "a la derecha",
        "abajo a la izquierda",
        "abajo",
        "abajo a la derecha",
    ),
    "fr": (
        "en haut à gauche",
        "en haut",
        "en haut à droite",
        "à gauche",
        "au centre",
        "à droite",
        "en bas à gauche",
        "en bas",
        "en bas à droite",
    ),
}
BACKGROUND_NAMES = {
    "en": dict(plain="plain", textured="textured"),
    "zh": dict(plain="纯色", textured="有纹理的"),
    "ja": dict(plain="無地の", textured="模様のある"),
    "es": dict(plain="liso", textured="con textura"),
    "fr": dict(plain="uni", textured="texturé"),
}
#: zero-shot classification prompts per language ("{}" = the class label from :func:`label`)
CLASSIFY_TEMPLATES = {
    "en": ["a photo of a {}.", "{}", "an image of a {}."],
    "zh": ["{}", "一张{}的图片", "{}的照片"],
    "ja": ["{}", "{}の写真", "{}の画像"],
    "es": ["{}", "una foto de {}", "imagen de {}"],
    "fr": ["{}", "une photo de {}", "image de {}"],
}
# caption templates: {obj} = noun phrase without article, {a} = with article, {pos}, {bg}
CAPTION_TEMPLATES = {
    "en": [
        "{obj}",
        "{a}",
        "a photo of {a}.",
        "an image of {a}.",
        "{a} {pos}",
        "{a} on a {bg} background",
        "a picture showing {a} {pos}.",
    ],
    "zh": [
        "{obj}",
        "一个{obj}",
        "一张{obj}的图片",
        "{obj}的照片",
        "{pos}有一个{obj}",
        "{bg}背景上的{obj}",
        "图片{pos}是一个{obj}",
    ],
    "ja": [
        "{obj}",
        "{obj}の写真",
        "{obj}の画像",
        "{pos}にある{obj}",
        "{bg}背景の{obj}",
        "画像の{pos}に{obj}があります",
    ],
    "es": [
        "{obj}",
        "{a}",
        "una foto de {a}",
        "imagen de {obj}",
        "{a} {pos}",
        "{a} sobre un fondo {bg}",
        "una imagen con {a} {pos}",
    ],
    "fr": [
        "{obj}",
        "{a}",
        "une photo de {obj}",
        "image de {obj}",
        "{a} {pos}",
        "{a} sur un fond {bg}",
        "une image avec {a} {pos}",
    ],
}


def _gendered(value: str | tuple[str, str], feminine: bool) -> str:
    return value if isinstance(value, str) else value[int(feminine)]


def label(shape: str, colour: str, lang: str) -> str:
    """The class label used for zero-shot classification, e.g. ``red circle`` / ``红色的圆形``."""
    return noun_phrase(shape, colour, None, lang, zh_de=True)


def noun_phrase(shape: str, colour: str, size: str | None, lang: str, *, zh_de: bool = True) -> str:
    """Shape + colour (+ optional size) noun phrase without article, in language ``lang``."""
    fem = shape in FEMININE.get(lang, ())
    s_name = SHAPE_NAMES[lang][shape]
    c_name = _gendered(COLOUR_NAMES[lang][colour], fem)
    z_name = _gendered(SIZE_NAMES[lang][size], fem) if size else ""
    if lang == "en":
        return f"{z_name} {c_name} {s_name}".strip()
    if lang == "zh":
        return f"{z_name}{c_name}{'的' if zh_de else ''}{s_name}"
    if lang == "ja":
        return f"{z_name}{c_name}{s_name}"
    if lang == "es":
        return f"{s_name} {c_name}" + (f" {z_name}" if z_name else "")
    if lang == "fr":  # petit/grand precede the noun, moyen follows it
        before = f"{z_name} " if z_name and size != "medium" else ""
        after = f" {z_name}" if z_name and size == "medium" else ""
        return f"{before}{s_name} {c_name}{after}"
    raise ValueError(f"unknown language {lang!r}; known: {', '.join(LANGUAGES)}")


def with_article(phrase: str, shape: str, lang: str) -> str:
    """Prefix the indefinite article (a/an, un/una, un/une); other languages have none."""
    if lang == "en":
        return ("an " if phrase[0] in "aeiou" else "a ") + phrase
    fem = shape in FEMININE.get(lang, ())
    if lang == "es":
        return ("una " if fem else "un ") + phrase
    if lang == "fr":
        return ("une " if fem else "un ") + phrase
    return phrase


def caption(spec: dict, lang: str, rng: random.Random) -> str:
    """A random caption of ``spec`` (keys shape, colour, size, position, background) in ``lang``."""
    size = spec["size"] if rng.random() < 0.3 else None
    obj = noun_phrase(spec["shape"], spec["colour"], size, lang, zh_de=rng.random() < 0.7)
    template = rng.choice(CAPTION_TEMPLATES[lang])
    return template.format(
        obj=obj,
        a=with_article(obj, spec["shape"], lang),
        pos=POSITION_NAMES[lang][POSITIONS.index(spec["position"])],
        bg=BACKGROUND_NAMES[lang][spec["background"]],
    )


def labels_manifest(languages: tuple[str, ...] = LANGUAGES) -> dict:
    """The ``labels.json`` written next to a generated set: class labels and prompts per language."""
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    return {
        "classes": [f"{c} {s}" for c, s in classes],
        "languages": {
            lang: {
                "labels": [label(s, c, lang) for c, s in classes],
                "templates": CLASSIFY_TEMPLATES[lang],
            }
            for lang in languages
        },
    }
