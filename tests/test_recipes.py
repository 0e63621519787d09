import pytest

from lowbit import recipes
from lowbit.errors import LowbitError
from lowbit.recipes import Recipe

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
