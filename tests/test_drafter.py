"""Drafter config loading, strict validation and null inheritance."""

import json
from pathlib import Path

import pytest
from checkpoints import RELEASED_GENERATION_CONFIG

from mlx_diffusiongemma.drafter import (
    REFERENCE_DEFAULTS,
    DrafterConfig,
    list_presets,
    load_drafter_config,
    resolve_drafter,
)
from mlx_diffusiongemma.errors import DrafterConfigError


FRESH_SAVE_GENERATION_CONFIG = {
    "max_new_tokens": None,
    "max_denoising_steps": None,
    "sampler_config": None,
    "t_min": None,
    "t_max": None,
    "stability_threshold": None,
    "confidence_threshold": None,
    "return_dict_in_generate": True,
}


def write(tmp_path: Path, body, name="custom.json") -> Path:
    path = tmp_path / name
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return path


def error_of(call) -> str:
    with pytest.raises(DrafterConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


# --- presets -------------------------------------------------------------------------------------------


def test_presets_listed_and_found_by_name():
    assert {"reference", "fast"} <= set(list_presets())
    ref = load_drafter_config("reference")
    assert ref["name"] == "reference" and ref["verify"] == "none" and ref["adaptive_stop"] is True
    assert all(ref[k] is None for k in REFERENCE_DEFAULTS)
    fast = load_drafter_config("fast")
    assert fast["acceptance"] == "confidence" and fast["max_denoising_steps"] < 48
    assert "not reference-exact" in fast["description"].lower()


def test_presets_found_by_path():
    source = Path(resolve_drafter("fast", None, 256).source)
    assert source.name == "fast.json" and source.is_file()
    assert load_drafter_config(source) == load_drafter_config("fast")
    assert load_drafter_config(str(source)) == load_drafter_config("fast")


def test_reference_is_the_default_and_matches_transformers_defaults():
    cfg = resolve_drafter(None, None, 256)
    assert isinstance(cfg, DrafterConfig) and cfg.name == "reference"
    assert (cfg.max_denoising_steps, cfg.entropy_bound, cfg.t_min, cfg.t_max) == (48, 0.1, 0.4, 0.8)
    assert (cfg.stability_threshold, cfg.confidence_threshold) == (1, 0.005)
    assert (cfg.canvas_length, cfg.acceptance, cfg.adaptive_stop, cfg.verify) == (256, "entropy_bound", True, "none")
    with pytest.raises(AttributeError):
        cfg.t_max = 1.0  # frozen


# --- inheritance ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("generation_config", [RELEASED_GENERATION_CONFIG, FRESH_SAVE_GENERATION_CONFIG, {}, None])
def test_released_and_fresh_save_forms_resolve_alike(generation_config):
    assert resolve_drafter("reference", generation_config, 256) == resolve_drafter("reference", None, 256)


def test_checkpoint_values_fill_nulls_and_file_values_win(tmp_path):
    gen = {
        "max_denoising_steps": 20,
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.3},
        "t_min": 0.2,
        "t_max": None,  # falls through to the reference default
        "stability_threshold": 2,
        "confidence_threshold": 0.01,
    }
    cfg = resolve_drafter("reference", gen, 8)
    assert (cfg.max_denoising_steps, cfg.entropy_bound, cfg.t_min, cfg.t_max) == (20, 0.3, 0.2, 0.8)
    assert (cfg.stability_threshold, cfg.confidence_threshold, cfg.canvas_length) == (2, 0.01, 8)

    path = write(tmp_path, {"max_denoising_steps": 7, "t_max": 1, "adaptive_stop": False})
    cfg = resolve_drafter(path, gen, 8)
    assert (cfg.name, cfg.source) == ("custom", str(path))
    assert (cfg.max_denoising_steps, cfg.entropy_bound, cfg.adaptive_stop) == (7, 0.3, False)
    assert cfg.t_max == 1.0 and isinstance(cfg.t_max, float)  # ints are accepted for float fields


def test_overrides_win_over_file():
    cfg = resolve_drafter("fast", RELEASED_GENERATION_CONFIG, 256, overrides={"max_denoising_steps": 5, "t_min": None})
    assert cfg.max_denoising_steps == 5 and cfg.t_min == 0.4
    message = error_of(lambda: resolve_drafter("fast", None, 256, overrides={"steps": 5}))
    assert "overrides" in message and "'steps'" in message
    message = error_of(lambda: resolve_drafter("fast", None, 256, overrides={"max_denoising_steps": 0}))
    assert "max_denoising_steps" in message


def test_step_cap_applies_to_every_source():
    assert resolve_drafter(None, {"max_denoising_steps": 1024}, 256).max_denoising_steps == 1024
    for source in ({"max_denoising_steps": 10**9}, None):
        overrides = None if source else {"max_denoising_steps": 10**9}
        message = error_of(lambda: resolve_drafter(None, source, 256, overrides=overrides))
        assert "max_denoising_steps" in message and "1 to 1024" in message


def test_bad_generation_config_value_is_reported():
    message = error_of(lambda: resolve_drafter(None, {"stability_threshold": -1}, 256))
    assert "generation_config" in message and "stability_threshold" in message
    message = error_of(lambda: resolve_drafter(None, {"sampler_config": 0.1}, 256))
    assert "sampler_config" in message


# --- validation failures -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("max_denoising_steps", True, "integer from 1 to 1024"),  # bool is not an int
        ("max_denoising_steps", 16.0, "integer from 1 to 1024"),
        ("max_denoising_steps", "16", "integer from 1 to 1024"),
        ("max_denoising_steps", 0, "integer from 1 to 1024"),
        ("max_denoising_steps", 1025, "integer from 1 to 1024"),
        ("max_denoising_steps", 10**9, "integer from 1 to 1024"),
        ("canvas_length", -4, "integer >= 1"),
        ("stability_threshold", -1, "integer >= 0"),
        ("stability_threshold", False, "integer >= 0"),
        ("entropy_bound", 0, "number > 0"),
        ("entropy_bound", True, "number > 0"),
        ("entropy_bound", "0.1", "number > 0"),
        ("confidence_threshold", -0.5, "number > 0"),
        ("confidence_accept_threshold", 0.0, "(0, 1]"),
        ("confidence_accept_threshold", 1.5, "(0, 1]"),
        ("t_min", -0.1, "number >= 0"),
        ("t_max", float("nan"), "number >= 0"),
        ("t_max", float("inf"), "number >= 0"),
        ("acceptance", "top_k", '"entropy_bound" or "confidence"'),
        ("verify", "strict", '"none"'),
        ("verify", None, '"none"'),
        ("adaptive_stop", 1, "true or false"),
        ("name", "", "non-empty string"),
        ("description", 3, "a string"),
    ],
)
def test_invalid_field(tmp_path, field, value, allowed):
    path = write(tmp_path, {field: value})
    message = error_of(lambda: load_drafter_config(path))
    assert str(path) in message and f"'{field}'" in message and allowed in message


def test_unknown_key(tmp_path):
    path = write(tmp_path, {"max_steps": 3})
    message = error_of(lambda: load_drafter_config(path))
    assert str(path) in message and "'max_steps'" in message and "max_denoising_steps" in message


def test_t_max_not_above_t_min_after_resolution(tmp_path):
    path = write(tmp_path, {"t_min": 0.8})  # t_max inherits 0.8
    message = error_of(lambda: resolve_drafter(path, RELEASED_GENERATION_CONFIG, 256))
    assert str(path) in message and "t_max" in message and "t_min" in message
    path = write(tmp_path, {"t_max": 0.3}, "low.json")  # t_min inherits 0.4 from the checkpoint
    message = error_of(lambda: resolve_drafter(path, {"t_min": 0.4}, 256))
    assert "checkpoint generation_config" in message


def test_canvas_length_mismatch(tmp_path):
    path = write(tmp_path, {"canvas_length": 128})
    assert resolve_drafter(path, None, 128).canvas_length == 128
    message = error_of(lambda: resolve_drafter(path, None, 256))
    assert str(path) in message and "canvas_length" in message and "256" in message


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.json"
    message = error_of(lambda: load_drafter_config(missing))
    assert str(missing) in message
    assert "not found" in error_of(lambda: load_drafter_config(str(missing)))


def test_unknown_preset_lists_presets():
    message = error_of(lambda: load_drafter_config("turbo"))
    assert "'turbo'" in message and "reference" in message and "fast" in message


def test_bad_json_reports_line(tmp_path):
    path = write(tmp_path, '{\n  "name": "x",\n  "t_max": 0.8,,\n}\n')
    message = error_of(lambda: load_drafter_config(path))
    assert str(path) in message and "line 3" in message
    path = write(tmp_path, "[1, 2]", "list.json")
    assert "JSON object" in error_of(lambda: load_drafter_config(path))
