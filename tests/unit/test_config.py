"""The "qsr" config section: every bad input fails with the key and the file named."""
import json

import pytest

from qsr_ds.config import QSRConfig, QSRConfigError, from_dict, load

GOOD = {"rule": "qsr", "h_base": 4, "alpha": 0.0175, "warmup_steps": 10, "total_steps": 100, "ranks_per_replica": 2}


def write(tmp_path, qsr, name="ds.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "qsr": qsr}))
    return path


def load_error(tmp_path, qsr) -> tuple[str, str]:
    path = write(tmp_path, qsr)
    with pytest.raises(QSRConfigError) as err:
        load(path)
    return str(err.value), str(path)


def test_good_section_loads(tmp_path):
    config = load(write(tmp_path, dict(GOOD, average=["params", "buffers", "params"])))
    assert isinstance(config, QSRConfig)
    assert config.alpha == 0.0175 and isinstance(config.alpha, float)
    assert config.average == ("params", "buffers")
    assert config.schedule().total_steps == 100


def test_unknown_key_suggests_the_close_one(tmp_path):
    bad = dict(GOOD)
    bad["h_bsae"] = bad.pop("h_base")
    message, path = load_error(tmp_path, bad)
    assert path in message and "qsr.h_bsae" in message and "did you mean 'h_base'" in message


def test_unknown_key_without_a_close_match_lists_the_keys(tmp_path):
    message, path = load_error(tmp_path, dict(GOOD, zzz=1))
    assert path in message and "qsr.zzz" in message and "known keys" in message


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("h_base", "4", "expected an integer"),
        ("h_base", 4.0, "expected an integer"),
        ("h_base", True, "expected an integer"),
        ("alpha", "x", "expected a number"),
        ("average", "params", "expected a list of strings"),
        ("check_finite", 1, "expected true or false"),
        ("rule", 2, "expected a string"),
        ("switch_step", 1.5, "expected an integer or null"),
        ("gamma", "2", "expected a number or null"),
        ("compress_route", 1, "expected a string"),
    ],
)
def test_wrong_types(tmp_path, key, value, needle):
    message, path = load_error(tmp_path, dict(GOOD, **{key: value}))
    assert path in message and f"qsr.{key}" in message and needle in message


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("h_base", 0, "must be >= 1"),
        ("alpha", -0.1, "must be a finite number >= 0"),
        ("gamma", 0, "must be > 0"),
        ("gamma", -2, "must be > 0"),
        ("total_steps", 0, "must be >= 1"),
        ("warmup_steps", -1, "must be >= 0"),
        ("ranks_per_replica", 0, "must be >= 1"),
        ("bucket_mb", 0, "must be > 0"),
        ("rule", "quadratic", "unknown rule 'quadratic'"),
        ("kernel", "cuda", "unknown kernel 'cuda'"),
        ("average", ["params", "grads"], "unknown entry 'grads'"),
        ("average", ["buffers"], "must include 'params'"),
        ("compress_route", "ring", "unknown route 'ring'; expected one of gather, owner"),
    ],
)
def test_impossible_values(tmp_path, key, value, needle):
    message, path = load_error(tmp_path, dict(GOOD, **{key: value}))
    assert path in message and f"qsr.{key}" in message and needle in message


def test_post_local_needs_switch_step(tmp_path):
    message, path = load_error(tmp_path, dict(GOOD, rule="post_local"))
    assert path in message and "qsr.switch_step" in message and "post_local" in message


def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "qsr": {\n    "h_base": 4,\n  }\n}\n')
    with pytest.raises(QSRConfigError) as err:
        load(path)
    message = str(err.value)
    assert str(path) in message and "invalid JSON" in message and "line 4 column 3" in message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(QSRConfigError, match="config file not found") as err:
        load(path)
    assert str(path) in str(err.value)


def test_missing_section(tmp_path):
    path = tmp_path / "plain.json"
    path.write_text("{}")
    with pytest.raises(QSRConfigError, match='no "qsr" section') as err:
        load(path)
    assert str(path) in str(err.value)
    assert load(path, required=False) is None


def test_section_must_be_an_object():
    with pytest.raises(QSRConfigError, match="cfg.json.*must be a JSON object"):
        from_dict([1, 2], "cfg.json")


def test_world_size_must_be_a_multiple_of_ranks_per_replica(tmp_path):
    config = load(write(tmp_path, dict(GOOD, ranks_per_replica=4)))
    assert config.num_replicas(8) == 2
    with pytest.raises(QSRConfigError) as err:
        config.num_replicas(6)
    message = str(err.value)
    assert str(tmp_path / "ds.json") in message and "qsr.ranks_per_replica=4" in message and "6" in message


def test_sync_settings_come_one_way_from_a_config_and_keywords():
    from qsr_ds.config import SyncSettings

    assert SyncSettings.from_config() == SyncSettings()
    config = from_dict({"overlap_steps": 2, "compress": "bf16", "average": ["params", "exp_avg"], "kernel": "torch"})
    assert config.settings() == SyncSettings(average=("params", "exp_avg"), overlap_steps=2, compress="bf16",
                                             kernel="torch")
    # a keyword that is not None replaces the config's value; None keeps it
    mixed = SyncSettings.from_config(config, compress="int8", overlap_steps=None, average=("exp_avg_sq",))
    assert (mixed.compress, mixed.overlap_steps, mixed.average) == ("int8", 2, ("params", "exp_avg_sq"))
    with pytest.raises(QSRConfigError, match=r"keyword arguments: qsr\.compress: unknown compression 'int4'"):
        SyncSettings.from_config(compress="int4")
    with pytest.raises(QSRConfigError, match=r"qsr\.overlap_steps: expected an integer"):
        SyncSettings.from_config(config, overlap_steps=1.5)
    with pytest.raises(QSRConfigError, match=r"qsr\.timeout_s: not a round setting"):
        SyncSettings.from_config(timeout_s=5.0)


@pytest.mark.parametrize("outer,message", [
    ({"optimizer": "adam"}, r"qsr\.outer\.optimizer: unknown optimizer 'adam'"),
    ({"lr": 0}, r"qsr\.outer\.lr: must be a finite number > 0, got 0"),
    ({"lr": float("nan")}, r"qsr\.outer\.lr: must be a finite number > 0"),
    ({"momentum": 1.0}, r"qsr\.outer\.momentum: must be a number in \[0, 1\)"),
    ({"momentum": -0.1}, r"qsr\.outer\.momentum: must be a number in \[0, 1\)"),
    ({"optimizer": "nesterov", "momentum": 0.0}, r"qsr\.outer\.momentum: nesterov needs a momentum > 0"),
    ({"optimizer": "sgd", "offload": "yes"}, r"qsr\.outer\.offload: expected true or false"),
    ({"lrr": 0.7}, r"qsr\.outer\.lrr: unknown key"),
    ([0.7], r"qsr\.outer: expected an object"),
])
def test_a_bad_outer_optimizer_is_one_clear_error(tmp_path, outer, message):
    path = write(tmp_path, dict(GOOD, outer=outer))
    with pytest.raises(QSRConfigError, match=message):
        load(path)


def test_the_outer_optimizer_reaches_the_settings_and_refuses_rounds_it_does_not_run_with(tmp_path):
    from qsr_ds.config import OuterSettings, SyncSettings

    config = from_dict(dict(GOOD, outer={"optimizer": "nesterov", "lr": 0.7, "momentum": 0.9}))
    assert config.settings().outer == OuterSettings(optimizer="nesterov", lr=0.7, momentum=0.9)
    assert config.to_dict()["outer"] == {"optimizer": "nesterov", "lr": 0.7, "momentum": 0.9, "offload": False}
    assert from_dict(GOOD).settings().outer is None  # absent: plain averaging
    assert SyncSettings.from_config(outer={"optimizer": "sgd", "lr": 1, "momentum": 0}).outer.lr == 1.0
    path = write(tmp_path, dict(GOOD, outer={"optimizer": "sgd", "lr": 0.5, "momentum": 0.0}, compress="int8"))
    with pytest.raises(QSRConfigError, match=r"qsr\.outer: the outer optimizer does not run with .*compress"):
        load(path)
    with pytest.raises(QSRConfigError, match=r"keyword arguments: qsr\.outer: .*overlap_steps"):
        SyncSettings.from_config(overlap_steps=1, outer={"optimizer": "sgd", "lr": 0.5, "momentum": 0.0})
