"""Settings: TOML + overrides, rejected unknown keys and invalid values, shipped scenarios."""

from pathlib import Path

import pytest

from fedasls.config import ConfigError, apply_overrides, load_settings
from fedasls.scenarios import scenario_path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_toml_and_overrides_are_applied(tmp_path):
    path = write(tmp_path, "[population]\nnum_devices = 50\n[selection]\npolicy = 'fifo'\n")
    s = load_settings(path, ["selection.buffer_bytes=4096", "adaptation.dp=true"])
    assert s.population.num_devices == 50
    assert s.selection.policy == "fifo"
    assert s.selection.buffer_bytes == 4096
    assert s.adaptation.dp is True


def test_unknown_key_is_rejected_with_its_name(tmp_path):
    path = write(tmp_path, "[selection]\npolcy = 'fifo'\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert "unknown key 'selection.polcy'" in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_table_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'simulaton'"):
        load_settings(write(tmp_path, "[simulaton]\nrounds = 2\n"))


def test_invalid_value_names_field_and_allowed_values(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, "[selection]\npolicy = 'best'\n"))
    assert "selection.policy" in str(err.value) and "'full'" in str(err.value)
    with pytest.raises(ConfigError, match="population.num_devices"):
        load_settings(None, ["population.num_devices=0"])


def test_cross_field_rules(tmp_path):
    with pytest.raises(ConfigError, match="divisible by num_heads"):
        load_settings(None, ["model.hidden_size=100", "model.num_heads=3"])
    with pytest.raises(ConfigError, match="jsonl_path"):
        load_settings(None, ["population.source='jsonl'"])


def test_bad_toml_and_missing_file_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[population\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")


def test_override_syntax():
    assert apply_overrides({}, ["a.b=3", "a.c=x y"]) == {"a": {"b": 3, "c": "x y"}}
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["novalue"])


@pytest.mark.parametrize("name", ["quickstart", "population-10k", "heterogeneity"])
def test_shipped_scenarios_load(name):
    s = load_settings(scenario_path(name))
    assert s.simulation.rounds >= 1
    assert s.population.num_devices >= 200


def test_unknown_scenario_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="quickstart"):
        scenario_path("no-such-scenario")


def test_a_preset_gets_its_own_adaptation_defaults_and_user_keys_still_win():
    from fedasls.config import ADAPTATION_DEFAULTS_BY_MODEL, Settings

    embedded = Settings()
    smol = Settings.model_validate({"model": {"preset": "smollm2-135m-instruct"}})
    own = ADAPTATION_DEFAULTS_BY_MODEL["smollm2-135m-instruct"]
    assert smol.adaptation.learning_rate == own["learning_rate"] != embedded.adaptation.learning_rate
    assert smol.adaptation.target_modules == own["target_modules"] and smol.adaptation.max_length == 128
    chosen = Settings.model_validate({"model": {"preset": "smollm2-135m-instruct"},
                                      "adaptation": {"learning_rate": 4e-4}})
    assert chosen.adaptation.learning_rate == 4e-4 and chosen.adaptation.epochs == own["epochs"]
    assert smol.selection.buffer_bytes == 65536 != embedded.selection.buffer_bytes  # room for wide embeddings
    small = Settings.model_validate({"model": {"preset": "smollm2-135m-instruct"}, "selection": {"buffer_bytes": 8192}})
    assert small.selection.buffer_bytes == 8192 and small.selection.policy == embedded.selection.policy


def test_settings_resolved_to_a_model_folder_validate_again_and_keep_the_presets_defaults(tmp_path):
    """A preset resolved to its converted folder (as the runner, the fleet's scenario.toml and the
    benchmarks' settings files do) must read back: path set, preset cleared, the preset's
    adaptation defaults kept."""
    from fedasls.config import Settings

    smol = Settings.model_validate({"model": {"preset": "smollm2-135m-instruct"}})
    resolved = smol.model_copy(update={"model": smol.model.at_path(tmp_path)})
    again = Settings.model_validate_json(resolved.model_dump_json())
    assert again.model.path == str(tmp_path) and again.model.preset is None
    assert again.adaptation == smol.adaptation
    with pytest.raises(ValueError, match="not both"):  # what writing path and preset together gave
        Settings.model_validate_json(smol.model_copy(update={"model": smol.model.model_copy(
            update={"path": str(tmp_path)})}).model_dump_json())


def test_every_ablation_switch_is_a_setting_that_defaults_to_on_and_takes_an_override():
    switches = ["adaptation.use_profile_trigger", "feedback.use_implicit", "adaptation.answer_only_head",
                "adaptation.fast_lora_backward", "adaptation.fused_adamw", "evaluation.merge_adapter",
                "selection.embed_without_head", "selection.embed_shared_prefix",
                "adaptation.gate_reuses_feedback"]

    def value(s, dotted: str):
        section, key = dotted.split(".")
        return getattr(getattr(s, section), key)

    default = load_settings()
    assert all(value(default, k) is True for k in switches)
    off = load_settings(None, [f"{k}=false" for k in switches])
    assert all(value(off, k) is False for k in switches)
    for dotted in switches:  # each one documented (the configuration reference is generated from these)
        section, key = dotted.split(".")
        assert type(getattr(default, section)).model_fields[key].description


def test_cost_model_constants_are_the_cost_table():
    from fedasls.sim.cost_model import CostModel
    from fedasls.sim.heterogeneity import HeterogeneityModel

    profile = HeterogeneityModel(seed=0).profile(0)
    default, slower = load_settings(), load_settings(None, ["cost.train_s_per_example=0.16", "cost.latency_s=0"])
    assert default.cost.train_s_per_example == 0.08 and slower.cost.latency_s == 0.0
    assert CostModel(slower.cost).train_seconds(profile, 10) == pytest.approx(2 * CostModel(default.cost).train_seconds(profile, 10))
    assert CostModel(slower.cost).upload_seconds(profile, 1) < CostModel(default.cost).upload_seconds(profile, 1)
    with pytest.raises(ConfigError, match=r"unknown key 'cost.train_s'.*train_s_per_example"):
        load_settings(None, ["cost.train_s=1"])
    with pytest.raises(ConfigError, match="cost.upload_fraction"):
        load_settings(None, ["cost.upload_fraction=0"])
