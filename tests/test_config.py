import pytest
from conftest import REPO

from dfdetect.config import Params, ParamsError, load_params, parse_params


def test_repository_params_are_valid():
    from dfdetect.models import available_models

    params = load_params(REPO / "params.yaml")
    assert params.model.name in available_models()
    assert params.evaluate.threshold == "val"


def test_defaults_fill_missing_sections():
    assert parse_params({}) == Params()


def test_unknown_key_is_named():
    with pytest.raises(ParamsError) as err:
        parse_params({"train": {"learning_rate": 0.1}}, "params.yaml")
    assert "params.yaml is invalid" in str(err.value)
    assert "train.learning_rate: unknown key (value 0.1)" in str(err.value)


def test_unknown_section_is_named():
    with pytest.raises(ParamsError, match=r"trian: unknown key"):
        parse_params({"trian": {"epochs": 3}})


def test_wrong_type_names_key_value_and_expectation():
    with pytest.raises(ParamsError) as err:
        parse_params({"train": {"epochs": "many"}})
    assert "train.epochs: got 'many'" in str(err.value)
    assert "integer" in str(err.value)


def test_a_rule_across_a_section_s_keys_names_them_without_dumping_the_section():
    with pytest.raises(ParamsError) as err:
        parse_params({"train": {"epochs": 2, "probe_epochs": 2}})
    assert "train: Value error, probe_epochs (2) must be fewer than epochs (2)" in str(err.value)
    assert "batch_size" not in str(err.value)  # the section's other keys are noise here
    with pytest.raises(ParamsError, match=r"train.epochs: got \{'x': 1\}"):  # a wrong type still shows its value
        parse_params({"train": {"epochs": {"x": 1}}})


def test_out_of_range_names_the_bound():
    with pytest.raises(ParamsError) as err:
        parse_params({"train": {"lr": -1}})
    assert "train.lr: got -1" in str(err.value)
    assert "greater than 0" in str(err.value)


def test_choice_lists_what_is_allowed():
    with pytest.raises(ParamsError) as err:
        parse_params({"train": {"optimizer": "adamw"}})
    assert "train.optimizer: got 'adamw'" in str(err.value)
    assert "'adam' or 'sgd'" in str(err.value)


def test_threshold_accepts_val_or_probability():
    assert parse_params({"evaluate": {"threshold": 0.3}}).evaluate.threshold == 0.3
    with pytest.raises(ParamsError, match="evaluate"):
        parse_params({"evaluate": {"threshold": 1.5}})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(listed)


def test_params_are_immutable():
    params = Params()
    with pytest.raises(Exception):
        params.train.epochs = 3


def test_a_batch_hold_as_long_as_the_latency_limit_is_refused_naming_both():
    with pytest.raises(ParamsError, match=r"batch_wait_ms \(500.0\) must be below max_latency_ms \(500\)"):
        parse_params({"serving": {"batch_wait_ms": 500, "max_latency_ms": 500}})
    assert parse_params({"serving": {"batch_wait_ms": 0}}).serving.batch_wait_ms == 0
