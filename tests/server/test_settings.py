"""Settings: every field is a flag and an environment variable, a flag wins, lists are comma-separated, keys come
from a file too and never show in a repr."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from famserve.engine.adapter import FamAdapter
from famserve.server.settings import Settings, build_parser, parse_settings


def test_defaults() -> None:
    settings = parse_settings([])
    assert (settings.model, settings.host, settings.port, settings.mode) == ("smollm2-135m", "127.0.0.1", 8000, None)
    assert settings.api_keys == [] and settings.cors_origins == []


def test_fam_mode_on_a_model_with_a_shipped_adapter_loads_that_adapter(tmp_path) -> None:
    shipped = Settings(mode="fam").fam_adapter  # smollm2-135m, the default model
    assert shipped is not None and shipped.is_file() and shipped.parent.name == "adapters"
    assert FamAdapter.load(shipped).base_model_id == "smollm2-135m"
    assert Settings().fam_adapter is None  # the default mode stays BSWA: no adapter
    assert Settings(mode="bswa").fam_adapter is None
    assert Settings(model=str(tmp_path), mode="fam").fam_adapter is None  # no adapter shipped for other models
    own = tmp_path / "own.safetensors"
    own.write_bytes(b"x")
    assert Settings(mode="fam", fam_adapter=own).fam_adapter == own  # a given adapter wins
    assert Settings(mode="fam", fam_adapter="none").fam_adapter is None  # none: not even the shipped one
    assert parse_settings(["--mode", "fam", "--fam-adapter", "NONE"]).fam_adapter is None


def test_flag_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAMSERVE_PORT", "9001")
    monkeypatch.setenv("FAMSERVE_BLOCK_SIZE", "256")
    settings = parse_settings(["--port", "9002"])
    assert (settings.port, settings.block_size) == (9002, 256)


def test_lists_are_comma_separated_in_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAMSERVE_API_KEYS", "a, b,,c")
    settings = parse_settings(["--cors-origins", "http://a.example,http://b.example"])
    assert settings.all_api_keys() == ["a", "b", "c"]
    assert settings.cors_origins == ["http://a.example", "http://b.example"]
    assert "a" not in repr(settings.api_keys)


def test_api_key_file(tmp_path) -> None:
    path = tmp_path / "keys"
    path.write_text("# comment\n  k1  \n\nk2\n")
    assert Settings(api_keys="k0", api_key_file=path).all_api_keys() == ["k0", "k1", "k2"]


@pytest.mark.parametrize(("field", "value"), [("port", 70000), ("block_size", 0), ("max_waiting", 0),
                                              ("request_timeout_s", -1), ("dtype", "int8"), ("log_level", "loud")])
def test_bad_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(**{field: value})
    assert info.value.errors()[0]["loc"] == (field,)


def test_every_field_has_a_flag_and_a_description() -> None:
    flags = {action.dest for action in build_parser()._actions}
    for name, field in Settings.model_fields.items():
        assert name in flags
        assert field.description


def test_readme_lists_every_flag() -> None:
    docs = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`--{name.replace('_', '-')}`" in docs, name


def test_device_and_dtype_default_to_what_the_machine_runs() -> None:
    import torch

    from famserve.server.app import engine_config

    engine = engine_config(parse_settings([]))
    assert (engine.device, engine.dtype) == (("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32"))
    engine = engine_config(parse_settings(["--dtype", "bfloat16", "--device", "cpu"]))
    assert (engine.device, engine.dtype) == ("cpu", "bfloat16")


def test_int4_decode_asks_for_the_cpu_in_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    from famserve.server.app import engine_config

    monkeypatch.setenv("FAMSERVE_QUANTIZE", "int4")
    engine = engine_config(parse_settings(["--device", "cpu"]))
    assert (engine.device, engine.dtype, engine.quantize) == ("cpu", "bfloat16", "int4")  # auto dtype: bfloat16
    for wrong, field in ((["--dtype", "float32"], "dtype float32"), (["--device", "cuda"], "device cuda")):
        with pytest.raises(ValidationError, match=f"quantize int4 .*not {field}"):
            parse_settings(wrong)
