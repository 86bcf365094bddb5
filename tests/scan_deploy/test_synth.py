from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scan_deploy import synth
from scan_deploy.errors import UserError
from scan_deploy.precomp import find_vocab, load_split
from scan_deploy.tokenizer import tokenize_caption
from scan_deploy.vocab import Vocabulary

TINY = {"train": 12, "dev": 3, "test": 2, "img_dim": 16, "regions": 10}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _scenes(n: int, seed: int = 0, num_categories: int = 60) -> tuple[synth.World, synth.Scenes]:
    world = synth.World.create(num_categories, img_dim=64)
    return world, synth.sample_scenes(world, np.random.default_rng(seed), n, regions=36)


def _captions(n: int, seed: int = 0) -> tuple[synth.Scenes, list[str]]:
    _, scenes = _scenes(n, seed)
    return scenes, synth.write_captions(scenes, np.random.default_rng(seed + 1), 0.6)


# --- the written data set ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, synth.SynthSummary]:
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, synth.write_synthetic(out, **TINY, seed=3, vocab_threshold=1)


def test_writes_the_precomp_layout(tiny: tuple[Path, synth.SynthSummary]) -> None:
    out, _ = tiny
    assert sorted(p.name for p in out.iterdir()) == [
        "dev_boxes.npy",
        "dev_caps.txt",
        "dev_image_sizes.npy",
        "dev_ims.npy",
        "synth.json",
        "synth_vocab.json",
        "test_boxes.npy",
        "test_caps.txt",
        "test_image_sizes.npy",
        "test_ims.npy",
        "train_boxes.npy",
        "train_caps.txt",
        "train_image_sizes.npy",
        "train_ims.npy",
    ]
    assert find_vocab(out) == out / "synth_vocab.json"


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_splits_have_shapes_and_realistic_values(
    tiny: tuple[Path, synth.SynthSummary], split: str
) -> None:
    out, _ = tiny
    data = load_split(out, split)
    assert data.images.shape == (TINY[split], TINY["regions"], TINY["img_dim"])
    assert data.images.dtype == np.float32
    assert data.captions_per_image == 5
    assert data.num_captions == 5 * TINY[split]
    images = np.asarray(data.images)
    assert np.isfinite(images).all()
    assert images.min() == 0.0  # ReLU'd, like bottom-up-attention features
    assert 0.1 < images.mean() < 1.5


def test_summary_and_parameters_file(tiny: tuple[Path, synth.SynthSummary]) -> None:
    out, summary = tiny
    vocab = Vocabulary.load(out / "synth_vocab.json")
    assert summary.vocab_size == len(vocab)
    assert summary.images == {"train": 12, "dev": 3, "test": 2}
    assert str(summary).startswith("train 12, dev 3, test 2 images of 10 regions x 16 features")
    assert json.loads((out / "synth.json").read_text()) == {
        "format_version": 1,
        "seed": 3,
        "images": {"train": 12, "dev": 3, "test": 2},
        "img_dim": 16,
        "regions": 10,
        "vocab_threshold": 1,
        "noise": 1.0,
        "num_categories": 60,
        "attribute_prob": 0.6,
        "pictures": False,
    }


def test_vocab_comes_from_the_train_captions(tiny: tuple[Path, synth.SynthSummary]) -> None:
    out, _ = tiny
    train = load_split(out, "train").captions
    expected = Vocabulary.build(train, threshold=1)
    assert Vocabulary.load(out / "synth_vocab.json") == expected


def test_same_seed_same_bytes(tmp_path: Path, tiny: tuple[Path, synth.SynthSummary]) -> None:
    out, _ = tiny
    synth.write_synthetic(tmp_path / "again", **TINY, seed=3, vocab_threshold=1)
    assert _files(tmp_path / "again") == _files(out)


def test_other_seed_other_data(tmp_path: Path, tiny: tuple[Path, synth.SynthSummary]) -> None:
    out, _ = tiny
    synth.write_synthetic(tmp_path / "other", **TINY, seed=4, vocab_threshold=1)
    first, other = _files(out), _files(tmp_path / "other")
    for name in ("train_ims.npy", "train_caps.txt", "dev_ims.npy", "test_caps.txt"):
        assert first[name] != other[name]


def test_train_split_does_not_depend_on_the_other_sizes(
    tmp_path: Path, tiny: tuple[Path, synth.SynthSummary]
) -> None:
    out, _ = tiny
    synth.write_synthetic(tmp_path / "more", **{**TINY, "dev": 5}, seed=3, vocab_threshold=1)
    for name in ("train_ims.npy", "train_caps.txt", "synth_vocab.json"):
        assert (tmp_path / "more" / name).read_bytes() == (out / name).read_bytes()


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"dev": 0}, "dev"),
        ({"regions": 5}, "regions"),
        ({"img_dim": 0}, "img_dim"),
        ({"noise": -0.1}, "noise"),
        ({"noise": float("nan")}, "noise"),
        ({"noise": float("inf")}, "noise"),
        ({"noise": 1e300}, "noise"),  # finite, but its float32 noise overflowed to NaN features
        ({"noise": 100.5}, "noise"),
        ({"num_categories": 1}, "num_categories"),
        ({"num_categories": 61}, "num_categories"),
        ({"attribute_prob": 1.5}, "attribute_prob"),
    ],
)
def test_bad_parameters_name_the_field(tmp_path: Path, override: dict, field: str) -> None:
    with pytest.raises(UserError, match=f"^{field}: got "):
        synth.write_synthetic(tmp_path, **{**TINY, **override})
    assert not list(tmp_path.iterdir())


def test_an_existing_folder_is_replaced_only_with_force(
    tmp_path: Path, tiny: tuple[Path, synth.SynthSummary]
) -> None:
    out, _ = tiny
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="mine: not empty \\(pass --force to replace it\\)"):
        synth.write_synthetic(tmp_path / "mine", **TINY, seed=3, vocab_threshold=1)
    with pytest.raises(
        UserError, match="mine: not a synthetic data folder \\(no synth.json of one\\)"
    ):
        synth.write_synthetic(tmp_path / "mine", **TINY, seed=3, vocab_threshold=1, force=True)
    assert _files(tmp_path / "mine") == {"notes.txt": b"keep"}
    synth.write_synthetic(tmp_path / "data", **TINY, seed=4, vocab_threshold=1)
    with pytest.raises(UserError, match="not empty"):
        synth.write_synthetic(tmp_path / "data", **TINY, seed=3, vocab_threshold=1)
    synth.write_synthetic(tmp_path / "data", **TINY, seed=3, vocab_threshold=1, force=True)
    assert _files(tmp_path / "data") == _files(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "mine"]  # no temporary left


# --- captions ----------------------------------------------------------------------------------


def test_caption_lengths_spread_like_real_captions() -> None:
    _, captions = _captions(200)
    lengths = np.array([len(tokenize_caption(c)) for c in captions])
    assert len(captions) == 1000
    assert lengths.min() >= 6 and lengths.max() <= 24
    assert 9 <= lengths.mean() <= 15
    assert lengths.std() > 2  # not one fixed template length


def test_vocabulary_has_hundreds_of_words() -> None:
    _, captions = _captions(500)
    assert 200 <= len(Vocabulary.build(captions, threshold=4)) <= 1000


def test_captions_name_only_objects_of_their_image() -> None:
    scenes, captions = _captions(100)
    nouns = {}
    for category, (words, _) in enumerate(synth.CATEGORIES):
        for word in words:
            nouns[word] = nouns[synth._plural(word)] = category
    for j, caption in enumerate(captions):
        text = " " + " ".join(tokenize_caption(caption)) + " "
        named = {c for noun, c in nouns.items() if f" {noun} " in text}
        present = {obj.category for obj in scenes.objects[j // 5]}
        assert named and named <= present, caption


def test_captions_are_single_lines_with_varied_templates() -> None:
    _, captions = _captions(100)
    assert all("\n" not in c and c == c.strip() and c[0].isupper() for c in captions)
    assert len({tuple(c.split()[:2]) for c in captions}) > 50
    assert len(set(captions)) > 0.9 * len(captions)


@pytest.mark.parametrize(
    ("noun", "plural"),
    [
        ("man", "men"),
        ("bus", "buses"),
        ("puppy", "puppies"),
        ("sheep", "sheep"),
        ("traffic light", "traffic lights"),
        ("dog", "dogs"),
    ],
)
def test_plural(noun: str, plural: str) -> None:
    assert synth._plural(noun) == plural


@pytest.mark.parametrize(
    ("a", "b", "relation"),
    [
        (0, 6, "on"),
        (6, 0, "under"),
        (0, 8, "above"),
        (8, 0, "below"),
        (3, 5, "left"),
        (5, 3, "right"),
    ],
)
def test_spatial_relations_follow_the_grid(a: int, b: int, relation: str) -> None:
    captioner = synth._Captioner(np.random.default_rng(0), attribute_prob=0.6)
    assert captioner.spatial(a, b) == relation


# --- scenes and features -----------------------------------------------------------------------


def test_scenes_have_two_to_six_objects_in_distinct_cells() -> None:
    world, scenes = _scenes(200)
    counts = [len(objs) for objs in scenes.objects]
    assert min(counts) == 2 and max(counts) == 6
    for i, objs in enumerate(scenes.objects):
        assert len({o.cell for o in objs}) == len(objs)
        object_regions = scenes.kind[i] < world.num_categories
        assert {int(k) for k in scenes.kind[i][object_regions]} == {o.category for o in objs}
        assert object_regions.sum() < 36  # the rest is background


def test_num_categories_limits_the_objects() -> None:
    _, scenes = _scenes(100, num_categories=5)
    assert {o.category for objs in scenes.objects for o in objs} == set(range(5))


def _centered_unit(features: np.ndarray) -> np.ndarray:
    x = features.reshape(-1, features.shape[-1]).astype(np.float64)
    x -= x.mean(axis=0)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _mean_cosines(x: np.ndarray, labels: np.ndarray, among: np.ndarray) -> tuple[float, float]:
    """Mean cosine of pairs with equal labels and of pairs with different labels."""
    sims = x[among] @ x[among].T
    same = labels[among][:, None] == labels[among][None, :]
    np.fill_diagonal(same, False)
    different = ~same
    np.fill_diagonal(different, False)
    return float(sims[same].mean()), float(sims[different].mean())


def test_features_carry_the_category() -> None:
    world, scenes = _scenes(60)
    features = synth.render_features(world, scenes, np.random.default_rng(1), 1.0, 0, 60)
    x, kind = _centered_unit(features), scenes.kind.reshape(-1)
    same, different = _mean_cosines(x, kind, kind < world.num_categories)
    assert same > different + 0.08


def test_features_carry_the_colour_within_a_category() -> None:
    world, scenes = _scenes(200)
    features = synth.render_features(world, scenes, np.random.default_rng(1), 1.0, 0, 200)
    x, kind = _centered_unit(features), scenes.kind.reshape(-1)
    colour = scenes.attrs.reshape(-1, 2)[:, 0]
    top = np.bincount(kind[kind < world.num_categories]).argmax()
    same, different = _mean_cosines(x, colour, kind == top)
    assert same > different + 0.05


def test_features_carry_the_scene_in_the_background() -> None:
    world, scenes = _scenes(60)
    features = synth.render_features(world, scenes, np.random.default_rng(1), 1.0, 0, 60)
    x, kind = _centered_unit(features), scenes.kind.reshape(-1)
    scene = np.repeat(scenes.scene, 36)
    same, different = _mean_cosines(x, scene, kind >= world.num_categories)
    assert same > different + 0.05


def test_the_largest_noise_writes_finite_features(tmp_path: Path) -> None:
    """At MAX_NOISE the features are noise alone (correlation with the clean ones about 0 from
    noise 10 on), and still finite."""
    world, scenes = _scenes(4)
    features = synth.render_features(world, scenes, np.random.default_rng(1), synth.MAX_NOISE, 0, 4)
    assert np.isfinite(features).all()


def test_noise_knob() -> None:
    world, scenes = _scenes(4)
    clean = [
        synth.render_features(world, scenes, np.random.default_rng(s), 0.0, 0, 4) for s in (1, 2)
    ]
    np.testing.assert_array_equal(clean[0], clean[1])
    noisy = synth.render_features(world, scenes, np.random.default_rng(1), 1.0, 0, 4)
    assert noisy.shape == (4, 36, 64) and noisy.dtype == np.float32
    assert not np.array_equal(noisy, clean[0])


# --- boxes and pictures ------------------------------------------------------------------------


def test_every_region_has_a_box_inside_the_image(tiny: tuple[Path, synth.SynthSummary]) -> None:
    from scan_deploy.precomp import image_boxes
    from scan_deploy.synth_pictures import IMAGE_SIZE, OBJECT_HALF

    out, _ = tiny
    boxes, sizes = image_boxes(out / "train_ims.npy", TINY["train"], TINY["regions"])
    assert sizes.tolist() == [list(IMAGE_SIZE)] * TINY["train"]
    width, height = IMAGE_SIZE
    assert (boxes[..., 0] >= 0).all() and (boxes[..., 2] <= width).all()
    assert (boxes[..., 1] >= 0).all() and (boxes[..., 3] <= height).all()
    assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()
    world, scenes = _scenes(50)
    from scan_deploy.synth_pictures import region_boxes

    placed = region_boxes(scenes.pos, scenes.kind, scenes.visibility, world.num_categories)
    whole = (scenes.kind < world.num_categories) & (scenes.visibility == 1)
    centres = (placed[..., :2] + placed[..., 2:]) / 2 / np.array(IMAGE_SIZE)
    inside = (placed[..., 2] - placed[..., 0] < width) & (placed[..., 3] - placed[..., 1] < height)
    away_from_edges = whole & inside & (np.abs(scenes.pos - 0.5) < 0.5 - OBJECT_HALF).all(-1)
    np.testing.assert_allclose(centres[away_from_edges], scenes.pos[away_from_edges], atol=1e-5)


def test_pictures_draw_each_object_in_its_colour_where_its_box_is(tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    from scan_deploy.synth_pictures import COLOUR_RGB, IMAGE_SIZE

    plain = tmp_path / "plain"
    synth.write_synthetic(plain, **TINY, seed=3, vocab_threshold=1)
    drawn = tmp_path / "drawn"
    synth.write_synthetic(drawn, **TINY, seed=3, vocab_threshold=1, pictures=True)
    assert (drawn / "train_ims.npy").read_bytes() == (plain / "train_ims.npy").read_bytes()
    assert sorted(p.name for p in (drawn / "test_images").iterdir()) == ["0.png", "1.png"]
    world = synth.World.create(60, 16)
    rng = np.random.default_rng([3, synth.SPLITS.index("test"), 0])
    scenes = synth.sample_scenes(world, rng, TINY["test"], TINY["regions"])
    boxes = np.load(drawn / "test_boxes.npy")
    with image.open(drawn / "test_images/0.png") as picture:
        assert picture.size == IMAGE_SIZE
        pixels = np.asarray(picture.convert("RGB"))
    checked = 0
    for obj in scenes.objects[0]:
        colours = [a for a in obj.attributes if a < len(synth.COLOURS)]
        regions = np.flatnonzero((scenes.kind[0] == obj.category) & (scenes.visibility[0] == 1))
        x1, y1, x2, y2 = boxes[0, regions[0]]
        overlapped = sum(  # another object's box drawn over this one's corner
            1
            for other in np.flatnonzero((scenes.kind[0] < 60) & (scenes.visibility[0] == 1))
            if other != regions[0]
            and boxes[0, other, 0] <= x2 - 3
            and boxes[0, other, 2] >= x2 - 3
            and boxes[0, other, 1] <= y2 - 3
            and boxes[0, other, 3] >= y2 - 3
        )
        if colours and not overlapped:
            want = COLOUR_RGB[synth.COLOURS[colours[0]][0]]
            assert tuple(pixels[int(y2) - 3, int(x2) - 3]) == want
            checked += 1
    assert checked >= 1
