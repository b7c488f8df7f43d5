"""Recipes as typed configuration: the schema (``schema``), the checks of names and ranges
(``checks``), and the resolution of a recipe plus ``key=value`` overrides (``resolve``).

Unknown keys, wrong types and unknown names raise ``ConfigError`` with the key, the allowed values
and close matches, before anything is built or trained.
"""

from kdistill.config.checks import CHOICES, validate
from kdistill.config.resolve import build_config, load_raw, parse_override
from kdistill.config.schema import (
    Config,
    DataConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    TeacherRunConfig,
    TrainerConfig,
)
from kdistill.recipes import find_recipe, recipes_dir

__all__ = [
    "CHOICES",
    "Config",
    "DataConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "TeacherRunConfig",
    "TrainerConfig",
    "build_config",
    "find_recipe",
    "load_raw",
    "parse_override",
    "recipes_dir",
    "validate",
]
