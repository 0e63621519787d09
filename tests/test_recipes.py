import dataclasses
import json

import pytest

from lowbit import recipes
from lowbit.errors import LowbitError
from lowbit.recipes import CalibrationSpec, Recipe

ISSUE_PRESETS = ["rtn-w4", "gptq-w4", "gptq-w4g128", "gptq-w3g128", "gptq-w2g64"]


@pytest.mark.parametrize("name", ISSUE_PRESETS)
def test_presets_exist_and_validate(name):
    r = recipes.get(name)
    assert r.name == name
    assert r.weights.bits == int(name.split("-w")[1][0])


def test_every_preset_loads():
    for name in recipes.presets():
        recipes.get(name).validate()


def _write(tmp_path, text, suffix=".yaml"):
    p = tmp_path / f"r{suffix}"
    p.write_text(text)
    return p


def test_yaml_and_toml_files(tmp_path):
    y = recipes.get(_write(tmp_path, "weights: {method: gptq, bits: 3, group_size: 64}\n"))
    t = recipes.get(_write(tmp_path, "[weights]\nmethod = 'gptq'\nbits = 3\ngroup_size = 64\n", ".toml"))
    assert y.weights == t.weights and y.weights.group_size == 64


@pytest.mark.parametrize("text,message", [
    ("weights: {bitz: 4}\n", "unknown recipe key 'bitz' in weights"),
    ("wieghts: {bits: 4}\n", "unknown recipe key 'wieghts'"),
    ("weights: {bits: 9}\n", "bits must be an integer from 2 to 8"),
    ("weights: {bits: 1}\n", "bits must be an integer from 2 to 8"),
    ("weights: {group_size: 0}\n", "group_size must be a positive integer"),
    ("weights: {group_size: -64}\n", "group_size must be a positive integer"),
    ("weights: {group_size: 12.5}\n", "group_size must be a positive integer"),
    ("weights: {method: awq}\n", "weights.method must be one of"),
    ("calibration: {nsamples: 0}\n", "calibration.nsamples must be a positive integer"),
    ("calibration: {dataset: ptb}\n", "calibration.dataset must be one of"),
    ("pipeline: {skip: ['mlp.(']}\n", "not a valid regular expression"),
    ("pipeline: {true_sequential: maybe}\n", "true_sequential must be true or false"),
    ("weights: {act_order: 1}\n", "act_order must be true or false"),
    ("- a\n- b\n", "must hold a mapping"),
    ("hessian: {source: output_adaptive, skip_first_tokens: 1}\n", "applies to the layer-wise Hessian only"),
    ("hessian: {source: output_adaptive, passes: 0}\n", "passes must be a positive integer"),
    ("hessian: {source: output_adaptive, passes: true}\n", "passes must be a positive integer"),
    ("hessian: {passes: 2}\n", "applies to the output-adaptive Hessian only"),
])
def test_bad_recipes_give_one_line_errors(tmp_path, text, message):
    with pytest.raises(LowbitError, match=message) as exc:
        recipes.get(_write(tmp_path, text))
    assert "\n" not in str(exc.value)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(LowbitError, match="gptq-w4g128"):
        recipes.get("gptq-w5")


def test_overrides_are_validated_like_files():
    r = recipes.apply_overrides(recipes.get("gptq-w4"), ["weights.bits=3", "hessian.skip_first_tokens=1",
                                                         "weights.group_size=null"])
    assert r.weights.bits == 3 and r.hessian.skip_first_tokens == 1 and r.weights.group_size is None
    with pytest.raises(LowbitError, match="unknown recipe key 'bitz'"):
        recipes.apply_overrides(r, ["weights.bitz=3"])
    with pytest.raises(LowbitError, match="bits must be an integer from 2 to 8"):
        recipes.apply_overrides(r, ["weights.bits=12"])
    with pytest.raises(LowbitError, match="cannot read the value"):
        recipes.apply_overrides(r, ["weights.bits=["])


def test_a_binary_file_is_not_a_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"\xff\xfe\x00weights")
    with pytest.raises(LowbitError, match="not UTF-8"):
        recipes.get(path)


def test_hessian_passes_is_part_of_a_recipe_only_when_set():
    """Splitting OAC's gradient pass changes no number, so at its default it is left out of the
    recipe's dict (its resume fingerprint and compare cache key stay what they were)."""
    r = recipes.get("oac-w2")
    assert "passes" not in r.to_dict()["hessian"] and Recipe.from_dict(r.to_dict()) == r
    split = recipes.apply_overrides(r, ["hessian.passes=4"])
    assert split.to_dict()["hessian"]["passes"] == 4 and Recipe.from_dict(split.to_dict()) == split


FLOAT_FIELDS = ["weights.damp", "weights.rms_mult", "weights.outlier_fraction", "smoothing.alpha", "lowrank.energy",
                "lowrank.budget", "lowrank.damp"]
SEEDS = ["transform.seed", "activations.seed", "calibration.seed"]


def _nested(key: str, value) -> dict:
    """``"calibration.nsamples", 0`` -> ``{"calibration": {"nsamples": 0}}`` (``"name"`` stays top-level)."""
    *path, leaf = key.split(".")
    data = {leaf: value}
    for part in reversed(path):
        data = {part: data}
    return data


def _rejected(data: dict, key: str, message: str = "") -> str:
    """The recipe is refused with one line that names the key (and says ``message``)."""
    with pytest.raises(LowbitError) as exc:
        Recipe.from_dict({"name": "x", **data})
    text = str(exc.value)
    assert "\n" not in text and key in text and message in text, text
    return text


@pytest.mark.parametrize("key", FLOAT_FIELDS)
@pytest.mark.parametrize("raw", [".inf", "-.inf", ".nan", ".NaN", "1e400"])
def test_non_finite_floats_from_yaml_are_refused(tmp_path, key, raw):
    """YAML's .inf/.nan used to pass, be saved as Infinity/NaN in the config and compute nan."""
    section, leaf = key.split(".")
    with pytest.raises(LowbitError, match=rf"^{key} must be a number in [\[(]") as exc:
        recipes.get(_write(tmp_path, f"{section}: {{{leaf}: {raw}}}\n"))
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("key", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), True, False, "0.5", [0.5], 10**400])
def test_float_fields_take_finite_numbers_only(key, value):
    _rejected(_nested(key, value), key, "must be a number in")


@pytest.mark.parametrize("key,value,message", [
    ("weights.damp", 1, "weights.damp must be a number in [0, 1), got 1"),
    ("weights.rms_mult", 0, "weights.rms_mult must be a number in (0, 100.0], got 0"),
    ("weights.rms_mult", 101, "weights.rms_mult must be a number in (0, 100.0], got 101"),
    ("smoothing.alpha", 1.01, "smoothing.alpha must be a number in [0, 1] or null, got 1.01"),
    ("lowrank.energy", 0, "lowrank.energy must be a number in (0, 1] or null, got 0"),
    ("lowrank.budget", -0.5, "lowrank.budget must be a number in (0, 1] or null, got -0.5"),
    ("lowrank.damp", -0.01, "lowrank.damp must be a number in [0, 1), got -0.01"),
])
def test_float_ranges_are_stated(key, value, message):
    assert _rejected(_nested(key, value), key) == message


@pytest.mark.parametrize("key,value,message", [
    ("calibration.nsamples", 1_000_000_000,
     "calibration.nsamples must be a positive integer (at most 100000), got 1000000000"),
    ("calibration.nsamples", 100_001, "calibration.nsamples must be a positive integer (at most 100000)"),
    ("calibration.seqlen", 1_048_577, "calibration.seqlen must be a positive integer (at most 1048576)"),
    ("weights.group_size", 65_537, "weights.group_size must be a positive integer (at most 65536) or null"),
    ("weights.blocksize", 65_537, "weights.blocksize must be a positive integer (at most 65536)"),
    ("weights.greedy_passes", 101, "weights.greedy_passes must be a non-negative integer (at most 100)"),
    ("hessian.skip_first_tokens", 1_048_577,
     "hessian.skip_first_tokens must be a non-negative integer (at most 1048576)"),
    ("hessian.passes", 1_025, "hessian.passes must be a positive integer (at most 1024)"),
    ("activations.clusters_norm", 4_097, "activations.clusters_norm must be a positive integer (at most 4096)"),
    ("activations.clusters_mlp", 4_097, "activations.clusters_mlp must be a positive integer (at most 4096)"),
    ("activations.clusters_head", 4_097, "activations.clusters_head must be a positive integer (at most 4096)"),
    ("smoothing.outliers", 65_537, "smoothing.outliers must be a non-negative integer (at most 65536)"),
    ("lowrank.rank", 65_537, "lowrank.rank must be a non-negative integer (at most 65536)"),
    *[(seed, 2**32, f"{seed} must be a non-negative integer (at most 4294967295)") for seed in SEEDS],
    ("weights.stats_bits", 9, "weights.stats_bits must be an integer from 2 to 8 or null"),
    ("weights.bits", 10**30, "weights.bits must be an integer from 2 to 8"),
    ("activations.kv_bits", 32, "activations.kv_bits must be an integer from 2 to 8, or 16 for float"),
])
def test_huge_integers_are_refused_with_the_bound(key, value, message):
    _rejected(_nested(key, value), key, message)


def test_the_bounds_themselves_are_allowed():
    r = Recipe.from_dict({"calibration": {"nsamples": 100_000, "seqlen": 1_048_576, "seed": 2**32 - 1},
                          "weights": {"group_size": 65_536, "blocksize": 65_536, "greedy_passes": 100,
                                      "rms_mult": 100},
                          "hessian": {"skip_first_tokens": 1_048_575},
                          "activations": {"clusters_norm": 4096, "clusters_mlp": 4096, "clusters_head": 4096,
                                          "seed": 2**32 - 1},
                          "transform": {"seed": 2**32 - 1},
                          "smoothing": {"alpha": 1, "outliers": 65_536}, "lowrank": {"rank": 65_536, "budget": 1}})
    assert r.calibration.nsamples == 100_000 and r.lowrank.rank == 65_536
    assert Recipe.from_dict({"hessian": {"source": "output_adaptive", "passes": 1024}}).hessian.passes == 1024


INT_FIELDS = ["weights.bits", "weights.group_size", "weights.blocksize", "weights.greedy_passes", "weights.stats_bits",
              "hessian.skip_first_tokens", "hessian.passes", "activations.bits", "activations.kv_bits",
              "activations.clusters_norm", "activations.clusters_mlp", "activations.clusters_head",
              "smoothing.outliers", "lowrank.rank", "calibration.nsamples", "calibration.seqlen", *SEEDS]


@pytest.mark.parametrize("key", INT_FIELDS)
@pytest.mark.parametrize("value", [True, False, 4.0, 12.5, float("nan"), float("inf"), "4", [4]])
def test_integer_fields_take_real_integers_only(key, value):
    """``true`` is an int to Python and ``12.0`` would be cast later: neither may stand for a count."""
    _rejected(_nested(key, value), key, "must be a")


@pytest.mark.parametrize("key", SEEDS)
def test_seeds_are_non_negative_in_every_section(key):
    _rejected(_nested(key, -1), key, f"{key} must be a non-negative integer")


@pytest.mark.parametrize("key,value,message", [
    ("name", 5, "name must be a string, got 5"),
    ("name", None, "name must be a string, got None"),
    ("name", ["gptq"], "name must be a string"),
    ("description", 3.5, "description must be a string, got 3.5"),
    ("calibration.dataset", 5, "calibration.dataset must be one of"),
    ("calibration.sampling", ["documents"], "calibration.sampling must be one of"),
    ("weights.method", True, "weights.method must be one of"),
    ("weights.grid", None, "weights.grid must be one of"),
    ("transform.incoherence", 0, "transform.incoherence must be one of"),
    ("hessian.source", ["layerwise"], "hessian.source must be one of"),
    ("activations.granularity", 1, "activations.granularity must be one of"),
    ("weights.symmetric", "yes", "weights.symmetric must be true or false"),
    ("transform.rescale", 1, "transform.rescale must be true or false"),
    ("lowrank.whiten", None, "lowrank.whiten must be true or false"),
    ("activations.reorder", 0, "activations.reorder must be true or false"),
])
def test_types_of_names_and_switches(key, value, message):
    _rejected(_nested(key, value), key.split(".")[-1] if key in ("name", "description") else key, message)


@pytest.mark.parametrize("key,value,message", [
    ("activations.sites", "attn_in", "activations.sites must be a list of"),
    ("activations.sites", ["attn_in", 3], "activations.sites must be a list of"),
    ("activations.sites", [["attn_in"]], "activations.sites must be a list of"),
    ("activations.sites", None, "activations.sites must be a list of"),
    ("smoothing.sites", [], "smoothing.sites must be a non-empty list of"),
    ("smoothing.sites", "attn_in", "smoothing.sites must be a non-empty list of"),
    ("smoothing.sites", ["attn_in", None], "smoothing.sites must be a non-empty list of"),
    ("pipeline.skip", "mlp", "pipeline.skip must be a list of regular expressions"),
    ("pipeline.skip", [1], "pipeline.skip must be a list of regular expressions"),
    ("pipeline.skip", [["mlp"]], "pipeline.skip must be a list of regular expressions"),
    ("pipeline.skip", {"mlp": 1}, "pipeline.skip must be a list of regular expressions"),
])
def test_list_fields_hold_strings(key, value, message):
    _rejected(_nested(key, value), key, message)


def test_skipping_every_calibration_token_is_refused():
    """``skip_first_tokens >= seqlen`` leaves no token: every Hessian would silently be zero."""
    data = {"hessian": {"skip_first_tokens": 16}, "calibration": {"seqlen": 16}}
    assert _rejected(data, "hessian.skip_first_tokens") == (
        "hessian.skip_first_tokens must be less than calibration.seqlen (16): it would drop every calibration "
        "token, got 16")
    assert Recipe.from_dict({"hessian": {"skip_first_tokens": 15}, "calibration": {"seqlen": 16}}).validate()


def test_overrides_and_replaced_fields_are_checked_too():
    r = recipes.get("gptq-w4")
    for item, key in (("weights.damp=.inf", "weights.damp"), ("lowrank.budget=.nan", "lowrank.budget"),
                      ("calibration.nsamples=1000000000", "calibration.nsamples"),
                      ("calibration.seed=-3", "calibration.seed")):
        with pytest.raises(LowbitError, match=rf"^{key} must be"):
            recipes.apply_overrides(r, [item])
    with pytest.raises(LowbitError, match="calibration.nsamples must be a positive integer"):
        r.with_overrides(calibration=CalibrationSpec(nsamples=12.0))  # what a replaced field could hand over
    with pytest.raises(dataclasses.FrozenInstanceError):  # recipes are values: with_overrides makes a new one
        r.calibration.nsamples = 12


@pytest.mark.parametrize("name", recipes.presets())
def test_presets_keep_their_shape_and_round_trip(name):
    """Recipe dicts are cache keys of committed results: the checks added no key and changed no value."""
    r = recipes.get(name)
    d = r.to_dict()
    default = Recipe().to_dict()
    assert ("tuning" in d) == r.tuning.enabled  # added later: only a tuned recipe's key holds it
    assert ("rotation" in d) == r.rotation.enabled  # the same
    assert set(d) - {"tuning", "rotation"} == set(default)
    assert all(set(d[k]) == set(default[k]) for k in default if isinstance(d[k], dict))
    json.dumps(d, allow_nan=False)  # nothing non-finite reaches the saved config
    assert Recipe.from_dict(d) == r and Recipe.from_dict(d).to_dict() == d
