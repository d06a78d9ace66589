"""Drafter configs: how the canvas drafter proposes a block and how the commit pass accepts it.

A config is a JSON file (a shipped preset such as `reference` or `fast`, or a user's own file). Values left
null inherit the checkpoint's `generation_config.json`, then the reference defaults, so the `reference` preset
is exactly what transformers does with that checkpoint. See drafter_configs/README.md for every field.
"""

from __future__ import annotations

import difflib
import importlib.resources
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DrafterConfigError

PRESETS_PACKAGE = "mlx_diffusiongemma.drafter_configs"
DEFAULT_PRESET = "reference"
ACCEPTANCE_RULES = ("entropy_bound", "confidence")
VERIFY_POLICIES = ("none", "ar")
# Passes per canvas: 21x the released 48, far past where the adaptive stop ends a canvas; more is a typo.
MAX_DENOISING_STEPS = 1024

# transformers' DiffusionGemmaGenerationConfig global defaults, used where the checkpoint leaves a value unset.
REFERENCE_DEFAULTS: dict[str, Any] = {
    "max_denoising_steps": 48,
    "entropy_bound": 0.1,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}
# Our own defaults for fields the reference does not have.
DEFAULT_ACCEPTANCE = "entropy_bound"
DEFAULT_CONFIDENCE_ACCEPT_THRESHOLD = 0.9


@dataclass(frozen=True)
class DrafterConfig:
    """A fully resolved drafter config: every value concrete, ready for the denoising loop."""

    name: str
    source: str
    description: str
    canvas_length: int
    max_denoising_steps: int
    acceptance: str
    entropy_bound: float
    confidence_accept_threshold: float
    t_min: float
    t_max: float
    stability_threshold: int
    confidence_threshold: float
    adaptive_stop: bool
    verify: str
    verify_min_prob: float | None = None


class _Invalid(ValueError):
    """Raised by a field check with the text of what is allowed."""


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid("a non-empty string")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid("a string")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("true or false")
    return value


def _integer(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        # bool is a subclass of int in Python; `true` for a step count is a typo, not 1.
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _Invalid(f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}")
        if maximum is not None and value > maximum:
            raise _Invalid(f"an integer from {minimum} to {maximum}")
        return value

    return check


def _number(allowed: str, ok: Callable[[float], bool]) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        # JSON ints are accepted for float fields ("t_max": 1) and converted; bools and NaN/Infinity are not.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(allowed)
        value = float(value)
        if not math.isfinite(value) or not ok(value):
            raise _Invalid(allowed)
        return value

    return check


def _choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise _Invalid(" or ".join(json.dumps(o) for o in options))
        return value

    return check


# field -> (check, nullable, value when the key is absent)
_SCHEMA: dict[str, tuple[Callable[[Any], Any], bool, Any]] = {
    "name": (_string, False, None),
    "description": (_text, False, ""),
    "canvas_length": (_integer(1), True, None),
    "max_denoising_steps": (_integer(1, MAX_DENOISING_STEPS), True, None),
    "acceptance": (_choice(*ACCEPTANCE_RULES), True, None),
    "entropy_bound": (_number("a number > 0", lambda v: v > 0), True, None),
    "confidence_accept_threshold": (_number("a number in (0, 1]", lambda v: 0 < v <= 1), True, None),
    "t_min": (_number("a number >= 0", lambda v: v >= 0), True, None),
    "t_max": (_number("a number >= 0", lambda v: v >= 0), True, None),
    "stability_threshold": (_integer(0), True, None),
    "confidence_threshold": (_number("a number > 0", lambda v: v > 0), True, None),
    "adaptive_stop": (_boolean, False, True),
    "verify": (_choice(*VERIFY_POLICIES), False, "none"),
    "verify_min_prob": (_number("a number in (0, 1]", lambda v: 0 < v <= 1), True, None),
}
# Fields a checkpoint's generation_config can supply (sampler_config.entropy_bound is flattened first).
_INHERITED = tuple(REFERENCE_DEFAULTS)


def _check_field(source: str, field: str, value: Any) -> Any:
    check, nullable, _ = _SCHEMA[field]
    if value is None and nullable:
        return None
    try:
        return check(value)
    except _Invalid as exc:
        allowed = f"{exc} or null" if nullable else str(exc)
        raise DrafterConfigError(f"{source}: field '{field}' must be {allowed} (got {value!r})") from None


def _validate(raw: Any, source: str, default_name: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise DrafterConfigError(f"{source}: the top level must be a JSON object of drafter fields")
    for key in raw:
        if key not in _SCHEMA:
            close = difflib.get_close_matches(str(key), _SCHEMA, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise DrafterConfigError(
                f"{source}: unknown field {key!r}{hint}; allowed fields: {', '.join(_SCHEMA)}"
            )
    config = {}
    for field, (_, _, absent) in _SCHEMA.items():
        config[field] = _check_field(source, field, raw[field]) if field in raw else absent
    if config["name"] is None:
        config["name"] = default_name
    return config


def _preset_dir() -> Any:
    try:
        return importlib.resources.files(PRESETS_PACKAGE)
    except ModuleNotFoundError:
        # Source checkout without an install: the presets folder sits beside the package folder.
        return Path(__file__).resolve().parent.parent / "drafter_configs"


def list_presets() -> list[str]:
    """Names of the drafter presets shipped with the package."""
    return sorted(p.name[: -len(".json")] for p in _preset_dir().iterdir() if p.name.endswith(".json"))


def _is_path(name_or_path: str | Path) -> bool:
    text = str(name_or_path)
    return isinstance(name_or_path, Path) or text.endswith(".json") or "/" in text or "\\" in text


def _read(name_or_path: str | Path) -> tuple[str, str, str]:
    """(JSON text, source label for messages, default name)."""
    if _is_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise DrafterConfigError(f"drafter config file not found: {path}")
        try:
            return path.read_text(encoding="utf-8"), str(path), path.stem
        except (OSError, UnicodeDecodeError) as exc:
            raise DrafterConfigError(f"{path}: cannot read drafter config ({exc})") from None
    name = str(name_or_path)
    presets = list_presets()
    if name not in presets:
        raise DrafterConfigError(
            f"unknown drafter preset {name!r}; presets: {', '.join(presets)} (or pass a path to a .json file)"
        )
    preset = _preset_dir() / f"{name}.json"
    return preset.read_text(encoding="utf-8"), str(preset), name


def _load(name_or_path: str | Path) -> tuple[dict[str, Any], str]:
    text, source, default_name = _read(name_or_path)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DrafterConfigError(
            f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    return _validate(raw, source, default_name), source


def load_drafter_config(name_or_path: str | Path) -> dict[str, Any]:
    """Read and validate a drafter config without resolving it.

    Args:
        name_or_path: a preset name (see `list_presets()`) or a path to a .json file (a `Path`, or a string
            ending in `.json` or containing a path separator).

    Returns:
        Every field of the schema: the file's validated values (JSON ints in float fields become floats),
        null for absent inheritable fields, and the defaults for `name` (the file stem), `description` (""),
        `adaptive_stop` (true) and `verify` ("none").

    Raises:
        DrafterConfigError: one line naming the file, the field and what is allowed.
    """
    return _load(name_or_path)[0]


def _from_generation_config(generation_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The inheritable values a checkpoint's generation_config sets (absent or null ones are left out)."""
    if not generation_config:
        return {}
    source = "checkpoint generation_config"
    flat = {k: generation_config.get(k) for k in _INHERITED if k != "entropy_bound"}
    sampler = generation_config.get("sampler_config")
    if sampler is not None:
        if not isinstance(sampler, Mapping):
            raise DrafterConfigError(
                f"{source}: field 'sampler_config' must be an object with 'entropy_bound' or null (got {sampler!r})"
            )
        flat["entropy_bound"] = sampler.get("entropy_bound")
    return {k: _check_field(source, k, v) for k, v in flat.items() if v is not None}


def resolve_drafter(
    name_or_path: str | Path | None,
    generation_config: Mapping[str, Any] | None,
    model_canvas_length: int,
    overrides: Mapping[str, Any] | None = None,
) -> DrafterConfig:
    """Load a drafter config and fill every null from the checkpoint, then the reference defaults.

    Args:
        name_or_path: a preset name, a path to a .json file, or None for the `reference` preset.
        generation_config: the checkpoint's `generation_config.json` as a dict (or None): its
            `max_denoising_steps`, `sampler_config.entropy_bound`, `t_min`, `t_max`, `stability_threshold`
            and `confidence_threshold` are inherited where the drafter config leaves them null.
        model_canvas_length: the model's `canvas_length`; a config that names another length is an error.
        overrides: field values that win over the file (e.g. CLI flags); None values are ignored.

    Returns:
        A frozen `DrafterConfig` with every value concrete.

    Raises:
        DrafterConfigError: one line naming the file, the field and what is allowed.
    """
    config, source = _load(DEFAULT_PRESET if name_or_path is None else name_or_path)
    for field, value in (overrides or {}).items():
        if field not in _SCHEMA:
            raise DrafterConfigError(f"overrides: unknown field {field!r}; allowed fields: {', '.join(_SCHEMA)}")
        if value is not None:
            config[field] = _check_field("overrides", field, value)

    inherited = _from_generation_config(generation_config)
    origin = {}
    for field in _INHERITED:
        if config[field] is not None:
            origin[field] = source
        elif field in inherited:
            config[field], origin[field] = inherited[field], "checkpoint generation_config"
        else:
            config[field], origin[field] = REFERENCE_DEFAULTS[field], "reference default"

    if config["t_max"] <= config["t_min"]:
        raise DrafterConfigError(
            f"{source}: fields 't_min'/'t_max' must resolve to t_max > t_min (got t_min={config['t_min']} from "
            f"{origin['t_min']}, t_max={config['t_max']} from {origin['t_max']})"
        )
    if config["canvas_length"] is None:
        config["canvas_length"] = model_canvas_length
    elif config["canvas_length"] != model_canvas_length:
        raise DrafterConfigError(
            f"{source}: field 'canvas_length' must be null or the model's canvas_length {model_canvas_length} "
            f"(got {config['canvas_length']})"
        )
    if config["verify_min_prob"] is not None and config["verify"] != "ar":
        raise DrafterConfigError(f"{source}: field 'verify_min_prob' needs \"verify\": \"ar\" (got verify "
                                 f"{config['verify']!r})")
    if config["acceptance"] is None:
        config["acceptance"] = DEFAULT_ACCEPTANCE
    if config["confidence_accept_threshold"] is None:
        config["confidence_accept_threshold"] = DEFAULT_CONFIDENCE_ACCEPT_THRESHOLD
    return DrafterConfig(source=source, **config)


def drafter_for(model, drafter: DrafterConfig | str | Path | None = None,
                overrides: Mapping[str, Any] | None = None) -> DrafterConfig:
    """`drafter` for `model`: a `DrafterConfig` as it is, else `resolve_drafter` with the model's generation
    config and canvas length (the one place a model and a drafter name meet)."""
    if isinstance(drafter, DrafterConfig):
        return drafter
    return resolve_drafter(drafter, model.generation_config, model.args.canvas_length, overrides)
