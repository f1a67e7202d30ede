"""Config resolution: defaults, a TOML file, then the command line."""



import pytest

from trainer_core import UsageError
from trainer_core.config import RunConfig, load_config, resolve_config, tomllib


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_file_then_command_line(tmp_path):
    path = write(tmp_path, """
epochs = 4
lr = 0.01
[model]
name = "smallcnn"
width = 8
[dataset]
name = "fake"
[plugins.progress]
bar = "off"
""")
    config = resolve_config(path, {"lr": 0.5, "epochs": None}, ["no:progress"], ["model.dropout=0.1"])
    assert (config.epochs, config.lr, config.model, config.dataset) == (4, 0.5, "smallcnn", "fake")
    assert config.model_options == {"width": 8, "dropout": "0.1"}
    assert config.plugins == {"checkpoint": {}}  # the other default plugin stays on


def test_resolved_config_round_trips_through_toml(tmp_path):
    config = resolve_config(None, {"epochs": 3, "clip_grad_norm": 1.5}, [], ["model.width=4", "progress.bar=off"])
    saved = write(tmp_path, "")
    import tomli_w

    saved.write_text(tomli_w.dumps(config.to_toml()))
    assert load_config(saved) == config
    assert tomllib.loads(saved.read_text())["plugins"] == {"progress": {"bar": "off"}, "checkpoint": {}}


def test_a_disabled_default_plugin_stays_disabled_after_a_round_trip(tmp_path):
    import tomli_w

    config = resolve_config(None, {}, ["no:progress"], [])
    saved = write(tmp_path, tomli_w.dumps(config.to_toml()))
    assert load_config(saved).plugins == {"checkpoint": {}}
    config = resolve_config(None, {}, ["no:progress,no:checkpoint"], [])
    assert tomllib.loads(tomli_w.dumps(config.to_toml()))["plugins"] == {"progress": False, "checkpoint": False}
    assert load_config(write(tmp_path, tomli_w.dumps(config.to_toml()))).plugins == {}


@pytest.mark.parametrize("text, message", [
    ("epochs = [", "is not valid TOML"),
    ("epoch = 3", r"unknown setting 'epoch' in config file .* \(did you mean 'epochs'\?\)"),
    ("epochs = 'many'", r"setting 'epochs' in config file .* has invalid value 'many' \(expected int\)"),
    ("optimizer = 'lbfgs'", r"has invalid value 'lbfgs' \(expected one of sgd, adam, adamw\)"),
    ("plugins = ['x']", r"'plugins' in config file .* must be a table"),
    ("[plugins]\nprogress = 3", r"plugins.progress in config file .* must be a table of options, true or false"),
])
def test_bad_files_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(UsageError, match=message) as info:
        load_config(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(UsageError, match="config file .*nope.toml does not exist"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("settings, message", [
    ({"lr": 0}, r"lr must be > 0 \(got 0.0\)"),
    ({"epochs": 0}, r"epochs must be >= 1 \(got 0\)"),
    ({"batch_size": -1}, r"batch_size must be >= 1"),
    ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
    ({"accumulate_grad_batches": 0}, r"accumulate_grad_batches must be >= 1"),
    ({"clip_grad_norm": -1}, r"clip_grad_norm must be > 0"),
    ({"compile_mode": "reduce-overhead"}, r"compile_mode 'reduce-overhead' needs compile = true \(add --compile\)"),
])
def test_out_of_range_values_are_refused(settings, message):
    with pytest.raises(UsageError, match=message):
        resolve_config(None, settings)


@pytest.mark.parametrize("override, message", [
    ("steplr.gamma=0.5", r"option 'steplr.gamma' is for plugin 'steplr', which is not enabled; add --plugins steplr"),
    ("gamma=0.5", r"option 'gamma=0.5' is not of the form NAME.KEY=VALUE"),
    ("model.width", r"is not of the form NAME.KEY=VALUE"),
])
def test_bad_overrides(override, message):
    with pytest.raises(UsageError, match=message):
        resolve_config(None, {}, [], [override])


def test_precision_accepts_a_toml_number(tmp_path):
    assert load_config(write(tmp_path, "precision = 16")).precision == "16"


def test_defaults_are_the_documented_default_run():
    config = RunConfig()
    assert (config.model, config.dataset, config.plugins) == ("smallcnn", "digits", {"progress": {}, "checkpoint": {}})


def test_config_toml_holds_options_as_their_declared_types(tmp_path):
    from click.testing import CliRunner

    from trainer_core.cli import make_cli

    run = tmp_path / "run"
    result = CliRunner().invoke(make_cli(), [
        "run", "--dataset", "fake", "--epochs", "1", "--device", "cpu", "-q", "--run-dir", str(run), "--plugins", "steplr",
        "-o", "steplr.step_size=1", "-o", "steplr.gamma=1", "-o", "model.width=8", "-o", "model.weights=none",
        "-o", "dataset.num_classes=3", "-o", "task.label_smoothing=0",
    ])
    assert result.exit_code == 0, result.output
    saved = tomllib.loads((run / "config.toml").read_text())
    assert saved["plugins"]["steplr"] == {"step_size": 1, "gamma": 1.0} and isinstance(saved["plugins"]["steplr"]["gamma"], float)
    assert saved["model"] == {"name": "smallcnn", "width": 8, "weights": "none"}  # (TOML has no null)
    assert saved["dataset"]["num_classes"] == 3 and saved["task"]["label_smoothing"] == 0.0
    assert resolve_config(run / "config.toml").model_options == {"width": 8, "weights": "none"}

