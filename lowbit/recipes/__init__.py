"""Named presets (``presets/*.yaml``) and user recipe files (YAML or TOML)."""

from __future__ import annotations

import tomllib
from importlib.resources import files
from pathlib import Path

import yaml

from lowbit.errors import LowbitError
from lowbit.recipes.recipe import Recipe
from lowbit.recipes.rotation import RotationSpec
from lowbit.recipes.schema import (
    ActivationSpec,
    CalibrationSpec,
    HessianSpec,
    LowRankSpec,
    PipelineSpec,
    SmoothingSpec,
    TransformSpec,
    WeightSpec,
)
from lowbit.recipes.tuning import TuningSpec

__all__ = ["ActivationSpec", "CalibrationSpec", "HessianSpec", "LowRankSpec", "PipelineSpec", "Recipe", "RotationSpec",
           "SmoothingSpec", "TransformSpec", "TuningSpec", "WeightSpec", "apply_overrides", "get", "load_file",
           "presets"]


def presets() -> list[str]:
    return sorted(p.name[:-5] for p in files("lowbit.recipes").joinpath("presets").iterdir()
                  if p.name.endswith(".yaml"))


def load_file(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LowbitError(f"recipe file {path} is not UTF-8 text (a YAML or TOML recipe)") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise LowbitError(f"cannot parse recipe file {path}: {exc}".splitlines()[0]) from None
    data = data or {}
    if not isinstance(data, dict):
        raise LowbitError(f"recipe file {path} must hold a mapping of sections, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    return Recipe.from_dict(data, where="recipe")


def apply_overrides(recipe: Recipe, assignments: list[str]) -> Recipe:
    """``["weights.bits=3", "hessian.skip_first_tokens=1"]`` -> a new, validated recipe."""
    data = recipe.to_dict()
    for item in assignments:
        key, sep, raw = item.partition("=")
        shown = item if len(item) <= 80 else item[:60] + "…"  # quoted in errors: a pasted blob stays short
        if not sep:
            raise LowbitError(f"override '{shown}' is not of the form section.key=value")
        *path, leaf = key.strip().split(".")
        node = data
        for part in path:
            if not isinstance(node.get(part), dict):
                raise LowbitError(f"unknown recipe key '{key}' in override '{shown}'")
            node = node[part]
        try:
            node[leaf] = yaml.safe_load(raw)
        except (yaml.YAMLError, ValueError):  # ValueError: an integer of over 4300 digits
            raise LowbitError(f"override '{shown}': cannot read the value") from None
    return Recipe.from_dict(data)


def get(name_or_path: str | Path | Recipe) -> Recipe:
    """A preset by name, or a recipe file by path."""
    if isinstance(name_or_path, Recipe):
        return name_or_path.validate()
    name = str(name_or_path)
    if Path(name).is_file():
        return load_file(name)
    preset = files("lowbit.recipes").joinpath("presets", f"{name}.yaml")
    if preset.is_file():
        return load_file(Path(str(preset)))
    raise LowbitError(f"unknown recipe '{name}': not a file and not a preset ({', '.join(presets())})")
