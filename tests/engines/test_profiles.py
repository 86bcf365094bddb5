"""Optimization profiles: manifest shape ranges, trtexec shape syntax, overrides, errors."""

import pytest
from scan_deploy.engines.profiles import (
    InputRange,
    build_profiles,
    manifest_profile,
    parse_shapes,
)

from scan_deploy.errors import UserError

RANGES = {
    "batch": {"min": 1, "opt": 8, "max": 16},
    "regions": {"min": 36, "opt": 36, "max": 36},
    "words": {"min": 1, "opt": 12, "max": 40},
}
SCORER = [
    {"name": "regions", "dtype": "float32", "shape": ["images", "regions", 256]},
    {"name": "words", "dtype": "float32", "shape": ["captions", "words", 256]},
    {"name": "lengths", "dtype": "int64", "shape": ["captions"]},
]
TEXT = [
    {"name": "tokens", "dtype": "int64", "shape": ["batch", "words"]},
    {"name": "lengths", "dtype": "int64", "shape": ["batch"]},
]


def test_manifest_profile_maps_symbolic_dims_to_their_ranges():
    profile = manifest_profile(SCORER, RANGES)
    assert profile.inputs["regions"] == InputRange((1, 36, 256), (8, 36, 256), (16, 36, 256))
    assert profile.inputs["words"] == InputRange((1, 1, 256), (8, 12, 256), (16, 40, 256))
    assert profile.inputs["lengths"] == InputRange((1,), (8,), (16,))
    assert list(profile.inputs) == ["regions", "words", "lengths"]
    assert profile.trtexec("max") == "regions:16x36x256,words:16x40x256,lengths:16"
    assert profile.to_json()["lengths"] == {"min": [1], "opt": [8], "max": [16]}


def test_a_bundle_for_adaptive_features_gets_its_range_of_regions():
    """export --regions 36 --min-regions 10 --max-regions 100: every graph's `regions` dim
    (the scorer's regions and region Gram) takes 10..100, tuned for 36."""
    ranges = {**RANGES, "regions": {"min": 10, "opt": 36, "max": 100}}
    gram = {"name": "region_gram", "dtype": "float32", "shape": ["images", "regions", "regions"]}
    profile = manifest_profile([*SCORER, gram], ranges)
    assert profile.inputs["regions"] == InputRange((1, 10, 256), (8, 36, 256), (16, 100, 256))
    assert profile.inputs["region_gram"] == InputRange((1, 10, 10), (8, 36, 36), (16, 100, 100))


def test_unknown_symbolic_dim_is_a_user_error():
    inputs = [{"name": "x", "dtype": "float32", "shape": ["time", 4]}]
    with pytest.raises(UserError, match="input x: symbolic dim 'time' has no shape range"):
        manifest_profile(inputs, RANGES)


def test_parse_trtexec_shapes():
    assert parse_shapes("tokens:4x12, lengths:4", "opt_shapes") == {
        "tokens": (4, 12),
        "lengths": (4,),
    }
    # names may hold colons (TensorFlow-style): the dims follow the last one
    assert parse_shapes("input:0:1x3", "min_shapes") == {"input:0": (1, 3)}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tokens", r"min_shapes: expected NAME:DxDx\.\.\. in 'tokens'"),
        (":4x5", r"expected NAME:DxDx"),
        ("tokens:", r"expected NAME:DxDx"),
        ("tokens:4x", r"tokens: dims must be integers joined by 'x', got '4x'"),
        ("tokens:4,5", r"expected NAME:DxDx\.\.\. in '5'"),
        ("tokens:0x5", r"tokens: dims must be at least 1, got '0x5'"),
        ("tokens:1x5,tokens:2x5", r"tokens is given twice"),
    ],
)
def test_parse_errors_name_the_option_and_the_mistake(text, message):
    with pytest.raises(UserError, match=message):
        parse_shapes(text, "min_shapes")


def test_no_options_gives_the_manifest_profile():
    (profile,) = build_profiles(TEXT, RANGES, [], [], [])
    assert profile == manifest_profile(TEXT, RANGES)


def test_options_override_the_inputs_they_name_and_the_dims_they_share():
    (profile,) = build_profiles(TEXT, RANGES, ["tokens:2x3"], [], ["tokens:20x20"])
    assert profile.inputs["tokens"] == InputRange((2, 3), (8, 12), (20, 20))
    # lengths shares "batch" with tokens: min and max follow, opt keeps the manifest's
    assert profile.inputs["lengths"] == InputRange((2,), (8,), (20,))


def test_an_overridden_symbolic_dim_applies_to_every_input_sharing_it():
    (profile,) = build_profiles(TEXT, RANGES, [], ["tokens:4x9"], [])
    assert profile.inputs["tokens"] == InputRange((4, 9), (4, 9), (4, 9))
    assert profile.inputs["lengths"] == InputRange((4,), (4,), (4,))
    (profile,) = build_profiles(SCORER, RANGES, [], ["words:3x5x256"], [])
    assert profile.inputs["lengths"] == InputRange((3,), (3,), (3,))  # "captions"
    # "images" is another dim (taking the same manifest range): regions keeps its shapes
    assert profile.inputs["regions"] == InputRange((1, 36, 256), (8, 36, 256), (16, 36, 256))
    (profile,) = build_profiles(SCORER, RANGES, [], ["words:3x5x256"], [], static=True)
    assert profile.trtexec("min") == "regions:8x36x256,words:3x5x256,lengths:3"


@pytest.mark.parametrize(
    ("mins", "opts", "maxs", "message"),
    [
        ([], ["tokens:4x9,lengths:5"], [], r"opt_shapes: symbolic dim 'batch' is 4 for tokens "),
        (["lengths:2"], ["tokens:4x9"], [], r"min_shapes: symbolic dim 'batch' is 4 for tokens"),
    ],
)
def test_inputs_sharing_a_dim_must_agree_on_its_size(mins, opts, maxs, message):
    with pytest.raises(UserError, match=message) as info:
        build_profiles(TEXT, RANGES, mins, opts, maxs)
    assert "\n" not in str(info.value)


def test_opt_only_sets_min_and_max_like_trtexec():
    (profile,) = build_profiles(TEXT, RANGES, [], ["tokens:4x9,lengths:4"], [])
    assert profile.inputs["tokens"] == InputRange((4, 9), (4, 9), (4, 9))
    assert profile.inputs["lengths"] == InputRange((4,), (4,), (4,))


def test_repeated_options_give_one_profile_each():
    profiles = build_profiles(
        TEXT,
        RANGES,
        ["tokens:1x1,lengths:1", "tokens:9x1,lengths:9"],
        ["tokens:4x8,lengths:4", "tokens:12x16,lengths:12"],
        ["tokens:8x16,lengths:8", "tokens:16x40,lengths:16"],
    )
    assert [p.inputs["tokens"].max for p in profiles] == [(8, 16), (16, 40)]
    assert profiles[1].trtexec("min") == "tokens:9x1,lengths:9"


def test_mismatched_repeat_counts_are_refused():
    with pytest.raises(UserError, match=r"once per profile \(got 2, 1 and 0\)"):
        build_profiles(TEXT, RANGES, ["tokens:1x1", "tokens:2x2"], ["tokens:3x3"], [])


@pytest.mark.parametrize(
    ("mins", "opts", "maxs", "message"),
    [
        (["caption:1x1"], [], [], r"min_shapes: unknown input 'caption' \(inputs: tokens"),
        ([], ["tokens:4"], [], r"opt_shapes: tokens: expected 2 dims, got 4"),
        (["tokens:9x1"], [], [], r"tokens: dim 0: expected min <= opt <= max, got 9/8/16"),
    ],
)
def test_override_errors(mins, opts, maxs, message):
    with pytest.raises(UserError, match=message):
        build_profiles(TEXT, RANGES, mins, opts, maxs)


def test_fixed_graph_dims_cannot_be_overridden():
    with pytest.raises(UserError, match="regions: dim 2 is fixed at 256 in the graph"):
        build_profiles(SCORER, RANGES, [], ["regions:8x36x128"], [])


def test_static_profiles_for_dla_use_opt_everywhere():
    (profile,) = build_profiles(TEXT, RANGES, [], [], [], static=True)
    assert profile.inputs["tokens"] == InputRange((8, 12), (8, 12), (8, 12))
    (profile,) = build_profiles(TEXT, RANGES, [], ["tokens:2x5,lengths:2"], [], static=True)
    assert profile.trtexec("min") == profile.trtexec("max") == "tokens:2x5,lengths:2"


def test_only_known_skips_inputs_of_other_graphs():
    (profile,) = build_profiles(
        TEXT, RANGES, [], ["tokens:4x9,regions:8x36x256"], [], only_known=True
    )
    assert profile.inputs["tokens"] == InputRange((4, 9), (4, 9), (4, 9))
    with pytest.raises(UserError, match="unknown input 'regions'"):
        build_profiles(TEXT, RANGES, [], ["tokens:4x9,regions:8x36x256"], [])
