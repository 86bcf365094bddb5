"""The synthetic benchmark: procedurally generated scenes written in the SCAN precomp format.

A fixed world (WORLD_SEED) holds object categories, attributes, scene types and background "stuff",
each with a random embedding, and a random two-layer MLP that plays the detector's backbone. An
image is a scene type with 2-6 objects; every object has a colour, sometimes a second attribute,
and a cell of a 3x3 grid. Its regions are, like Faster R-CNN boxes, one box per object, partial
crops of objects (weaker, shifted copies) and background boxes (scene stuff). A region's feature is
MLP([kind, attributes, position, scene] + jitter) plus noise, ReLU'd, so it is non-negative.

The five captions per image come from templates and synonyms and mention 1-3 of its object
categories, with attributes sometimes and spatial or semantic relations sometimes. Captions leave
most objects out and scene priors make many images share categories, so retrieving the right image
needs the attributes, relations and positions, and some captions fit several images: a trained
SCAN's R@1 is meant to stay far from both 0 and 100 (tune with the knobs of `write_synthetic`).

`seed` drives the scenes, captions and noise; splits use independent streams, so the train split
does not change when the dev or test size does. Same seed and parameters give byte-identical files
on the same machine (the MLP's float32 matmul may round differently on another BLAS).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from scan_deploy.atomic import Marker, atomic_dir, check_output_dir, write_json
from scan_deploy.errors import input_error
from scan_deploy.precomp import write_split_chunks
from scan_deploy.synth_pictures import IMAGE_SIZE, region_boxes, render_image, scene_tint
from scan_deploy.vocab import Vocabulary

FORMAT_VERSION = 1
WORLD_SEED = 20180718  # the world is the same for every `seed`: only the sampled scenes change
SPLITS = ("train", "dev", "test")
DATA_NAME = "synth"
MARKER = Marker(f"{DATA_NAME}.json", ("format_version", "images", "noise"), "synthetic data")

# --- the world's words -------------------------------------------------------------------------
# Each concept lists its synonyms; the tags decide which semantic relations it can take part in.

CATEGORIES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("man", "guy", "gentleman"), "person"),
    (("woman", "lady"), "person"),
    (("boy", "kid"), "person"),
    (("girl", "young girl"), "person"),
    (("player", "athlete"), "person"),
    (("dog", "puppy", "pup"), "animal"),
    (("cat", "kitten", "kitty"), "animal"),
    (("horse", "pony"), "animal ride"),
    (("bird", "pigeon", "seagull"), "animal"),
    (("cow", "calf"), "animal"),
    (("sheep", "lamb"), "animal"),
    (("elephant",), "animal ride"),
    (("giraffe",), "animal"),
    (("zebra",), "animal"),
    (("bear", "grizzly"), "animal"),
    (("bike", "bicycle"), "ride"),
    (("motorcycle", "motorbike", "scooter"), "ride"),
    (("car", "sedan", "automobile"), ""),
    (("bus", "coach"), ""),
    (("truck", "lorry"), ""),
    (("train", "locomotive"), ""),
    (("boat", "ship", "canoe"), ""),
    (("airplane", "plane", "jet"), ""),
    (("chair", "seat"), "seat"),
    (("couch", "sofa"), "seat"),
    (("bench",), "seat"),
    (("bed",), "seat"),
    (("table", "desk", "counter"), ""),
    (("television", "tv"), ""),
    (("laptop", "computer"), "hand"),
    (("phone", "cellphone"), "hand"),
    (("book", "novel"), "hand"),
    (("clock",), ""),
    (("vase", "jar"), ""),
    (("cup", "mug"), "hand"),
    (("bottle", "flask"), "hand"),
    (("bowl",), ""),
    (("plate", "dish"), ""),
    (("pizza",), "food"),
    (("sandwich", "burger"), "food hand"),
    (("cake", "dessert", "pastry"), "food"),
    (("banana",), "food hand"),
    (("apple",), "food hand"),
    (("carrot",), "food"),
    (("donut", "doughnut"), "food hand"),
    (("umbrella", "parasol"), "hand"),
    (("bag", "backpack", "purse"), "hand"),
    (("suitcase",), "hand"),
    (("kite",), "hand"),
    (("skateboard",), "ride"),
    (("surfboard",), "ride hand"),
    (("frisbee", "flying disc"), "hand"),
    (("ball", "soccer ball"), "hand"),
    (("racket", "racquet"), "hand"),
    (("tree", "palm tree"), ""),
    (("building", "house", "tower"), ""),
    (("sign", "signboard"), ""),
    (("traffic light", "stoplight"), ""),
    (("fire hydrant", "hydrant"), ""),
    (("flower", "blossom", "rose"), ""),
)

COLOURS: tuple[tuple[str, ...], ...] = (
    ("red", "crimson"),
    ("blue",),
    ("green",),
    ("yellow",),
    ("black", "dark"),
    ("white",),
    ("orange",),
    ("brown",),
    ("gray", "grey"),
    ("pink",),
    ("purple",),
    ("silver",),
    ("golden", "gold"),
)
QUALITIES: tuple[tuple[str, ...], ...] = (
    ("large", "big", "huge"),
    ("small", "little", "tiny"),
    ("tall",),
    ("long",),
    ("wooden", "wood"),
    ("metal", "metallic"),
    ("plastic",),
    ("striped",),
    ("spotted", "dotted"),
    ("old", "vintage"),
    ("new", "modern"),
    ("shiny",),
    ("dirty", "muddy"),
    ("colorful", "colourful"),
    ("wet",),
    ("empty",),
    ("round",),
)
ATTRIBUTES = COLOURS + QUALITIES  # an attribute id below len(COLOURS) is a colour

# (preposition, synonyms) of each scene type; captions say e.g. "on a street", "in the kitchen".
SCENES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("on", ("street", "road")),
    ("in", ("kitchen",)),
    ("in", ("park",)),
    ("on", ("beach", "shore")),
    ("in", ("living room", "lounge")),
    ("in", ("bedroom",)),
    ("in", ("field", "meadow")),
    ("in", ("city", "town")),
    ("in", ("office",)),
    ("in", ("restaurant", "cafe", "diner")),
    ("on", ("farm", "ranch")),
    ("at", ("airport",)),
    ("at", ("station",)),
    ("at", ("zoo",)),
    ("at", ("harbor", "port", "marina")),
    ("in", ("garden", "backyard")),
    ("at", ("market",)),
    ("on", ("hill", "mountain")),
)
NUM_STUFF = 16  # background kinds (sky, wall, grass, ...): seen in features, never named
STUFF_PER_SCENE = 3

# The 3x3 grid, row by row.
POSITIONS: tuple[tuple[str, ...], ...] = (
    ("in the top left corner", "in the upper left corner"),
    ("at the top", "in the upper part"),
    ("in the top right corner", "in the upper right corner"),
    ("on the left", "on the left side"),
    ("in the middle", "in the center"),
    ("on the right", "on the right side"),
    ("in the bottom left corner", "in the lower left corner"),
    ("at the bottom", "in the lower part"),
    ("in the bottom right corner", "in the lower right corner"),
)

SPATIAL_RELATIONS: dict[str, tuple[str, ...]] = {
    "next": ("next to", "beside", "near"),
    "on": ("on top of", "on"),
    "above": ("above", "over"),
    "under": ("under", "beneath", "underneath"),
    "below": ("below",),
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
}
# (subject tag, object tag, synonyms): used instead of the spatial relation half of the time.
SEMANTIC_RELATIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("person", "hand", ("holding", "carrying")),
    ("person", "ride", ("riding", "riding on")),
    ("person", "seat", ("sitting on", "resting on")),
    ("animal", "seat", ("sitting on", "lying on")),
    ("person", "food", ("eating",)),
    ("animal", "food", ("eating",)),
    ("person", "", ("looking at", "watching")),
    ("animal", "", ("looking at", "watching")),
)

PICTURES = ("picture", "photo", "image", "photograph")
# Words no feature grounds, as in real captions.
POSES = ("standing", "sitting", "seen", "shown", "placed")
MIN_WORDS = 7
EXACT_COUNTS = ("", "", "two", "three", "four", "five", "six")
VAGUE_COUNTS = {2: ("a pair of", "a couple of"), 3: ("several", "a group of", "some")}
IRREGULAR_PLURALS = {
    "man": "men",
    "gentleman": "gentlemen",
    "woman": "women",
    "sheep": "sheep",
    "calf": "calves",
}

# --- the world's geometry ----------------------------------------------------------------------

D_KIND, D_ATTR, D_POS, D_SCENE = 48, 24, 16, 16
HIDDEN = 256
MIN_OBJECTS, MAX_OBJECTS = 2, 6
INPUT_JITTER = 0.05  # per input dimension, times `noise`: how much one instance varies
FEATURE_NOISE = 0.5  # per feature, times `noise`: sensor noise, partly averaged out by a linear map
# From noise 10 on the features no longer correlate with the clean ones; far larger values only
# overflow float32 (1e300: NaN features).
MAX_NOISE = 100.0
FEATURE_SCALE = 1.5  # mean about 0.45, half the values 0: the order of bottom-up features


@dataclass(frozen=True)
class SynthSummary:
    """What `write_synthetic` wrote."""

    out: Path
    images: dict[str, int]
    img_dim: int
    regions: int
    vocab_size: int

    def __str__(self) -> str:
        counts = ", ".join(f"{split} {n}" for split, n in self.images.items())
        return (
            f"{counts} images of {self.regions} regions x {self.img_dim} features, "
            f"vocabulary of {self.vocab_size} words"
        )


@dataclass(frozen=True)
class World:
    """Everything fixed across seeds and splits: embeddings, scene priors and the random MLP."""

    num_categories: int
    kind_emb: np.ndarray  # (num_categories + NUM_STUFF, D_KIND): categories, then stuff
    attr_emb: np.ndarray  # (len(ATTRIBUTES), D_ATTR)
    scene_emb: np.ndarray  # (len(SCENES), D_SCENE)
    pos_freq: np.ndarray  # (2, D_POS // 2): random Fourier features of an (x, y) position
    category_prior: np.ndarray  # (len(SCENES), num_categories): each scene favours some objects
    scene_stuff: np.ndarray  # (len(SCENES), STUFF_PER_SCENE) stuff kinds of each scene
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    @classmethod
    def create(cls, num_categories: int, img_dim: int) -> World:
        rng = np.random.default_rng(WORLD_SEED)
        d_in = D_KIND + D_ATTR + D_POS + D_SCENE
        affinity = rng.gamma(0.4, size=(len(SCENES), len(CATEGORIES)))[:, :num_categories]
        prior = 0.1 / num_categories + affinity / affinity.sum(axis=1, keepdims=True)
        return cls(
            num_categories=num_categories,
            kind_emb=_unit_rows(rng, num_categories + NUM_STUFF, D_KIND),
            attr_emb=_unit_rows(rng, len(ATTRIBUTES), D_ATTR),
            scene_emb=_unit_rows(rng, len(SCENES), D_SCENE),
            pos_freq=rng.normal(0.0, 3.0, size=(2, D_POS // 2)).astype(np.float32),
            category_prior=prior / prior.sum(axis=1, keepdims=True),
            scene_stuff=np.stack(
                [rng.choice(NUM_STUFF, STUFF_PER_SCENE, replace=False) for _ in SCENES]
            ),
            w1=rng.normal(0.0, 1.0, size=(d_in, HIDDEN)).astype(np.float32),
            b1=rng.normal(0.0, 0.5, size=HIDDEN).astype(np.float32),
            w2=rng.normal(0.0, HIDDEN**-0.5, size=(HIDDEN, img_dim)).astype(np.float32),
            b2=rng.normal(-0.2, 0.4, size=img_dim).astype(np.float32),
        )

    @property
    def img_dim(self) -> int:
        return int(self.w2.shape[1])


def _unit_rows(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    emb = rng.normal(size=(rows, dim))
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


# --- scenes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    category: int
    attributes: tuple[int, ...]  # a colour first, then maybe a quality
    cell: int  # 0..8, row-major on the 3x3 grid


@dataclass(frozen=True)
class Scenes:
    """The sampled content of a split: objects for the captions, region layout for the features."""

    scene: np.ndarray  # (N,) scene type
    objects: list[list[SceneObject]]
    kind: np.ndarray  # (N, R) category id, or num_categories + stuff id for background
    attrs: np.ndarray  # (N, R, 2) attribute ids, -1 for none
    pos: np.ndarray  # (N, R, 2) box centre (x, y) in [0, 1]
    visibility: np.ndarray  # (N, R) 1 for whole objects and background, less for partial crops

    def __len__(self) -> int:
        return len(self.objects)


def sample_scenes(world: World, rng: np.random.Generator, n: int, regions: int) -> Scenes:
    """Sample `n` scenes and lay out `regions` boxes for each."""
    scene = rng.integers(len(SCENES), size=n)
    kind = np.empty((n, regions), np.int64)
    attrs = np.full((n, regions, 2), -1, np.int64)
    pos = np.empty((n, regions, 2), np.float32)
    visibility = np.ones((n, regions), np.float32)
    objects = []
    for i in range(n):
        objs = _sample_objects(world, rng, int(scene[i]), regions)
        _layout(world, rng, objs, int(scene[i]), kind[i], attrs[i], pos[i], visibility[i])
        objects.append(objs)
    return Scenes(scene, objects, kind, attrs, pos, visibility)


def _sample_objects(
    world: World, rng: np.random.Generator, scene: int, regions: int
) -> list[SceneObject]:
    count = int(rng.integers(MIN_OBJECTS, min(MAX_OBJECTS, regions) + 1))
    categories = rng.choice(world.num_categories, size=count, p=world.category_prior[scene])
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    objects = []
    for category, cell in zip(categories, cells, strict=True):
        attributes = [int(rng.integers(len(COLOURS)))]
        if rng.random() < 0.5:
            attributes.append(len(COLOURS) + int(rng.integers(len(QUALITIES))))
        objects.append(SceneObject(int(category), tuple(attributes), int(cell)))
    return objects


def _layout(
    world: World,
    rng: np.random.Generator,
    objects: list[SceneObject],
    scene: int,
    kind: np.ndarray,
    attrs: np.ndarray,
    pos: np.ndarray,
    visibility: np.ndarray,
) -> None:
    """Fill one image's region rows: whole objects, partial crops, then background, shuffled."""
    regions = len(kind)
    n = len(objects)
    crops = min(int(rng.integers(n, 2 * n + 1)), regions - n)
    parents = np.concatenate([np.arange(n), rng.integers(n, size=crops)])
    order = rng.permutation(regions)  # detectors list boxes in no semantic order
    for slot, parent in zip(order[: n + crops], parents, strict=True):
        obj = objects[parent]
        kind[slot] = obj.category
        attrs[slot, : len(obj.attributes)] = obj.attributes
        pos[slot] = _cell_centre(obj.cell) + rng.normal(0.0, 0.05, size=2)
    crop_slots = order[n : n + crops]
    visibility[crop_slots] = rng.uniform(0.4, 0.9, size=crops)
    pos[crop_slots] += rng.normal(0.0, 0.1, size=(crops, 2))
    background = order[n + crops :]
    kind[background] = world.num_categories + rng.choice(world.scene_stuff[scene], len(background))
    pos[background] = rng.random((len(background), 2))


def _cell_centre(cell: int) -> np.ndarray:
    row, col = divmod(cell, 3)
    return np.array([(col + 0.5) / 3, (row + 0.5) / 3], np.float32)


# --- features ----------------------------------------------------------------------------------


def render_features(
    world: World, scenes: Scenes, rng: np.random.Generator, noise: float, start: int, stop: int
) -> np.ndarray:
    """Region features (stop - start, R, img_dim) of scenes[start:stop], float32, non-negative."""
    x = _region_inputs(world, scenes, start, stop)
    _add_noise(x, rng, INPUT_JITTER * noise)
    hidden = np.tanh(x @ world.w1 + world.b1)
    z = hidden @ world.w2
    z += world.b2
    _add_noise(z, rng, FEATURE_NOISE * noise)
    np.maximum(z, 0.0, out=z)
    z *= np.float32(FEATURE_SCALE)
    return z.reshape(stop - start, scenes.kind.shape[1], world.img_dim)


def _add_noise(x: np.ndarray, rng: np.random.Generator, std: float) -> None:
    """x += N(0, std^2), in place."""
    sample = rng.standard_normal(x.shape, dtype=np.float32)
    sample *= np.float32(std)
    x += sample


def _region_inputs(world: World, scenes: Scenes, start: int, stop: int) -> np.ndarray:
    """The MLP input of each region: [kind, attributes, position, scene] embeddings."""
    kind = scenes.kind[start:stop].reshape(-1)
    attrs = scenes.attrs[start:stop].reshape(-1, 2)
    vis = scenes.visibility[start:stop].reshape(-1, 1)
    regions = scenes.kind.shape[1]
    attr_table = np.vstack([world.attr_emb, np.zeros((1, D_ATTR), np.float32)])  # -1 -> zeros
    angle = scenes.pos[start:stop].reshape(-1, 2) @ world.pos_freq
    parts = [
        world.kind_emb[kind] * vis,
        attr_table[attrs].sum(axis=1) * (0.8 * vis),
        np.concatenate([np.sin(angle), np.cos(angle)], axis=1) * (D_POS // 2) ** -0.5,
        np.repeat(world.scene_emb[scenes.scene[start:stop]], regions, axis=0) * 0.4,
    ]
    return np.concatenate(parts, axis=1).astype(np.float32)


# --- captions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mention:
    """One noun phrase of a caption: an object, or a group of same-category objects."""

    text: str
    obj: SceneObject  # the object the phrase's position and relations refer to
    plural: bool


class _Captioner:
    """Writes template-and-synonym captions about a scene with one random generator."""

    def __init__(self, rng: np.random.Generator, attribute_prob: float) -> None:
        self.rng = rng
        self.attribute_prob = attribute_prob

    def pick(self, options: tuple[str, ...] | list[str]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def caption(self, scene: int, objects: list[SceneObject]) -> str:
        mentions = self.mentions(objects)
        template = self.pick(TEMPLATES[len(mentions)])
        text = template(self, mentions, scene)
        if len(text.split()) < MIN_WORDS:  # real captions are rarely this short
            text = f"{text} {self.setting(scene)}"
        text = text[0].upper() + text[1:]
        return text + "." if self.chance(0.5) else text

    def mentions(self, objects: list[SceneObject]) -> list[_Mention]:
        groups: dict[int, list[SceneObject]] = {}
        for obj in objects:
            groups.setdefault(obj.category, []).append(obj)
        k = min(len(groups), int(self.rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25])))
        chosen = self.rng.permutation(list(groups))[:k]
        return [self.mention(groups[int(category)]) for category in chosen]

    def mention(self, group: list[SceneObject]) -> _Mention:
        if len(group) > 1 and self.chance(0.6):
            return self.group_mention(group)
        obj = group[int(self.rng.integers(len(group)))]
        words = [*self.adjectives(obj.attributes), self.noun(obj.category)]
        determiner = "the" if self.chance(0.2) else _indefinite(words[0])
        return _Mention(" ".join([determiner, *words]), obj, plural=False)

    def group_mention(self, group: list[SceneObject]) -> _Mention:
        n = len(group)
        count = EXACT_COUNTS[n] if self.chance(0.6) else self.pick(VAGUE_COUNTS[min(n, 3)])
        words = [count]
        colours = {obj.attributes[0] for obj in group}
        if len(colours) == 1 and self.chance(self.attribute_prob):
            words.append(self.pick(ATTRIBUTES[colours.pop()]))
        words.append(_plural(self.noun(group[0].category)))
        return _Mention(" ".join(words), group[0], plural=True)

    def adjectives(self, attributes: tuple[int, ...]) -> list[str]:
        """Qualities before the colour ("a large red car"), each said with `attribute_prob`."""
        said = [a for a in reversed(attributes) if self.chance(self.attribute_prob)]
        return [self.pick(ATTRIBUTES[a]) for a in said]

    def noun(self, category: int) -> str:
        return self.pick(CATEGORIES[category][0])

    def where(self, m: _Mention) -> str:
        return "nearby" if m.plural else self.pick(POSITIONS[m.obj.cell])

    def a_picture(self) -> str:
        word = self.pick(PICTURES)
        return f"{_indefinite(word)} {word}"

    def located(self, m: _Mention) -> str:
        return m.text if m.plural else f"{m.text} {self.where(m)}"

    def setting(self, scene: int) -> str:
        preposition, words = SCENES[scene]
        word = self.pick(words)
        determiner = "the" if self.chance(0.4) else _indefinite(word)
        return f"{preposition} {determiner} {word}"

    def maybe_setting(self, scene: int) -> str:
        return " " + self.setting(scene) if self.chance(0.5) else ""

    def relation(self, a: _Mention, b: _Mention) -> str:
        semantic = _semantic_relations(a.obj.category, b.obj.category)
        if semantic and self.chance(0.5):
            return self.pick(semantic[int(self.rng.integers(len(semantic)))])
        return self.pick(SPATIAL_RELATIONS[self.spatial(a.obj.cell, b.obj.cell)])

    def spatial(self, a: int, b: int) -> str:
        (ra, ca), (rb, cb) = divmod(a, 3), divmod(b, 3)
        if abs(ra - rb) + abs(ca - cb) == 1 and self.chance(0.4):
            return "next"
        if ra != rb:
            vertical = ("on", "above") if ra < rb else ("under", "below")
            return vertical[0] if ca == cb else vertical[1]
        return "left" if ca < cb else "right"


def _semantic_relations(subject: int, obj: int) -> list[tuple[str, ...]]:
    subject_tags = CATEGORIES[subject][1].split()
    object_tags = CATEGORIES[obj][1].split()
    return [
        words
        for s, o, words in SEMANTIC_RELATIONS
        if s in subject_tags and (o == "" or o in object_tags)
    ]


def _indefinite(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(noun: str) -> str:
    *head, last = noun.split(" ")
    if last in IRREGULAR_PLURALS:
        last = IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "x", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and last[-2] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join([*head, last])


def _be(m: _Mention) -> str:
    return "are" if m.plural else "is"


_Template = Callable[[_Captioner, list[_Mention], int], str]

# Templates by the number of objects a caption mentions.
TEMPLATES: dict[int, tuple[_Template, ...]] = {
    1: (
        lambda c, m, s: (
            f"there is {c.located(m[0])} of the {c.pick(PICTURES)}"
            if not m[0].plural
            else f"there are {m[0].text} {c.setting(s)}"
        ),
        lambda c, m, s: f"{c.a_picture()} of {c.located(m[0])}{c.maybe_setting(s)}",
        lambda c, m, s: f"{c.located(m[0])} {c.setting(s)}",
        lambda c, m, s: f"a close up of {m[0].text} {c.setting(s)}",
        lambda c, m, s: f"{m[0].text} {c.pick(POSES)} {c.where(m[0])} {c.setting(s)}",
    ),
    2: (
        lambda c, m, s: f"{m[0].text} {c.relation(m[0], m[1])} {m[1].text}{c.maybe_setting(s)}",
        lambda c, m, s: (
            f"{m[0].text} {_be(m[0])} {c.relation(m[0], m[1])} {m[1].text}{c.maybe_setting(s)}"
        ),
        lambda c, m, s: f"{m[0].text} and {m[1].text} {c.setting(s)}",
        lambda c, m, s: f"a {c.pick(SCENES[s][1])} with {m[0].text} and {m[1].text}",
        lambda c, m, s: f"{c.located(m[0])} and {c.located(m[1])}",
        lambda c, m, s: f"{c.a_picture()} of {m[0].text} {c.relation(m[0], m[1])} {m[1].text}",
    ),
    3: (
        lambda c, m, s: f"{m[0].text} {c.relation(m[0], m[1])} {m[1].text} and {m[2].text}",
        lambda c, m, s: f"{m[0].text}, {m[1].text} and {m[2].text} {c.setting(s)}",
        lambda c, m, s: (
            f"{m[0].text} {c.relation(m[0], m[1])} {m[1].text} "
            f"while {m[2].text} {_be(m[2])} {c.where(m[2])}"
        ),
        lambda c, m, s: f"a {c.pick(SCENES[s][1])} with {m[0].text}, {m[1].text} and {m[2].text}",
    ),
}


def write_captions(
    scenes: Scenes, rng: np.random.Generator, attribute_prob: float, per_image: int = 5
) -> list[str]:
    """`per_image` captions of each scene, image after image."""
    captioner = _Captioner(rng, attribute_prob)
    return [
        captioner.caption(int(scenes.scene[i]), objs)
        for i, objs in enumerate(scenes.objects)
        for _ in range(per_image)
    ]


# --- the data set ------------------------------------------------------------------------------

_CHUNK_IMAGES = 128


@dataclass(frozen=True)
class SynthParams:
    """The generator's parameters, as recorded in `synth.json`."""

    images: dict[str, int]
    img_dim: int
    regions: int
    seed: int
    vocab_threshold: int
    noise: float
    num_categories: int
    attribute_prob: float
    pictures: bool = False  # `{split}_images/{row}.png` rendered (`synth_pictures`)

    def validate(self) -> None:
        for split, n in self.images.items():
            if n < 1:
                raise input_error(None, split, f"got {n} images, expected at least 1")
        if self.img_dim < 1:
            raise input_error(None, "img_dim", f"got {self.img_dim}, expected a positive integer")
        if self.regions < MAX_OBJECTS:
            raise input_error(
                None, "regions", f"got {self.regions}, expected at least {MAX_OBJECTS}"
            )
        if not math.isfinite(self.noise) or self.noise < 0:
            raise input_error(None, "noise", f"got {self.noise}, expected a finite number >= 0")
        if self.noise > MAX_NOISE:
            raise input_error(None, "noise", f"got {self.noise:g}, expected at most {MAX_NOISE:g}")
        if not 2 <= self.num_categories <= len(CATEGORIES):
            raise input_error(
                None, "num_categories", f"got {self.num_categories}, expected 2..{len(CATEGORIES)}"
            )
        if not 0 <= self.attribute_prob <= 1:
            raise input_error(None, "attribute_prob", f"got {self.attribute_prob}, expected 0..1")


def write_synthetic(
    out: str | Path,
    *,
    train: int,
    dev: int,
    test: int,
    img_dim: int = 2048,
    regions: int = 36,
    seed: int = 0,
    vocab_threshold: int = 4,
    noise: float = 1.0,
    num_categories: int = len(CATEGORIES),
    attribute_prob: float = 0.6,
    pictures: bool = False,
    force: bool = False,
) -> SynthSummary:
    """Write train/dev/test splits, `synth_vocab.json` (from the train captions) and `synth.json`.

    Difficulty knobs: `noise` scales the appearance jitter and the feature noise; fewer
    `num_categories` make more images share objects; `attribute_prob` is how often a caption
    names an object's attributes (less often: captions are more ambiguous).

    Beside each split's features: `{split}_boxes.npy` and `{split}_image_sizes.npy` (each region's
    box, `synth_pictures.region_boxes`) and, with `pictures`, `{split}_images/{row}.png`.

    An existing non-empty `out` is replaced only with `force`, and only when it holds a data set
    this function wrote (`synth.json`); the folder is written aside and renamed into place.
    """
    out = Path(out)
    images = {"train": train, "dev": dev, "test": test}
    params = SynthParams(
        images,
        img_dim,
        regions,
        seed,
        vocab_threshold,
        noise,
        num_categories,
        attribute_prob,
        pictures,
    )
    params.validate()
    check_output_dir(out, force, MARKER)
    world = World.create(num_categories, img_dim)
    with atomic_dir(out) as tmp:
        captions = {split: _write_split(tmp, split, world, params) for split in SPLITS}
        vocab = Vocabulary.build(captions["train"], threshold=vocab_threshold)
        vocab.save(tmp / f"{DATA_NAME}_vocab.json")
        write_json(tmp / f"{DATA_NAME}.json", {"format_version": FORMAT_VERSION, **asdict(params)})
    return SynthSummary(out, images, img_dim, regions, len(vocab))


def _write_split(out: Path, split: str, world: World, params: SynthParams) -> list[str]:
    """Write one split; each split has its own random streams, so sizes do not interact."""
    streams = (np.random.default_rng([params.seed, SPLITS.index(split), s]) for s in range(3))
    scene_rng, caption_rng, noise_rng = streams
    n = params.images[split]
    scenes = sample_scenes(world, scene_rng, n, params.regions)
    captions = write_captions(scenes, caption_rng, params.attribute_prob)

    def chunks() -> Iterator[np.ndarray]:
        for start in range(0, n, _CHUNK_IMAGES):
            stop = min(n, start + _CHUNK_IMAGES)
            yield render_features(world, scenes, noise_rng, params.noise, start, stop)

    write_split_chunks(out, split, (n, params.regions, world.img_dim), chunks(), captions)
    _write_boxes(out, split, world, scenes, params.pictures)
    return captions


def _write_boxes(out: Path, split: str, world: World, scenes: Scenes, pictures: bool) -> None:
    """The regions' boxes and the images' sizes beside the features; with `pictures`, each
    image drawn (`synth_pictures`)."""
    boxes = region_boxes(scenes.pos, scenes.kind, scenes.visibility, world.num_categories)
    np.save(out / f"{split}_boxes.npy", boxes, allow_pickle=False)
    sizes = np.tile(np.array(IMAGE_SIZE, np.int64), (len(scenes), 1))
    np.save(out / f"{split}_image_sizes.npy", sizes, allow_pickle=False)
    if not pictures:
        return
    folder = out / f"{split}_images"
    folder.mkdir()
    for i in range(len(scenes)):
        whole = np.flatnonzero(
            (scenes.kind[i] < world.num_categories) & (scenes.visibility[i] == 1)
        )
        objects = []
        for region in whole:
            colours = [a for a in scenes.attrs[i, region] if 0 <= a < len(COLOURS)]
            colour = COLOURS[colours[0]][0] if colours else None
            objects.append((int(region), CATEGORIES[scenes.kind[i, region]][0][0], colour))
        render_image(folder / f"{i}.png", boxes[i], objects, scene_tint(int(scenes.scene[i])))
