"""The hook documentation is generated from the code: these fail when it drifts."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from trainer_core import apidoc, docgen, hookspecs
from trainer_core.config import tomllib
from trainer_core.pluginmanager import hook_names

ROOT = Path(__file__).resolve().parent.parent
REGENERATE = "run `python -m trainer_core.docgen` and commit the result"


def test_hook_reference_matches_the_specs() -> None:
    assert (ROOT / "docs" / "hooks.md").read_text(encoding="utf-8") == docgen.render_hooks(), REGENERATE


def test_hook_order_table_matches_a_real_run() -> None:
    guide = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    assert guide == docgen.replace_section(guide, docgen.render_order()), REGENERATE


def test_api_reference_matches_the_docstrings() -> None:
    assert (ROOT / "docs" / "api.md").read_text(encoding="utf-8") == apidoc.render_api(), REGENERATE


def test_api_reference_covers_what_plugin_model_and_dataset_authors_use() -> None:
    import dataclasses

    from trainer_core.config import RunConfig
    from trainer_core.plugin_api import PluginAPI

    page = apidoc.render_api()
    for heading in ("### run_tiny", "### tiny_data", "### tiny_model", "### write_fake_distribution", "### HookRecorder",
                    "#### recorder.names", "### DataBundle", "### TensorSplit", "## TrainState", "## RunConfig",
                    "#### trainer.request_stop", "#### trainer.save_checkpoint", "#### trainer.evaluate"):
        assert f"\n{heading}\n" in page, heading
    assert "- `data`: " in page and "- `model`: " in page and "- `calls`: " in page and "- `fake_entry_points`: " in page
    assert all(f"| `{f.name}` |" in page for f in dataclasses.fields(RunConfig))
    assert all(f"| `trainer.{name}` |" in page for name in ("config", "state", "model", "optimizer", "data", "task", "strategy"))
    assert set(apidoc._ivars(PluginAPI)) <= set(inspect.get_annotations(PluginAPI))


def test_api_reference_refuses_an_undocumented_field() -> None:
    import dataclasses

    @dataclasses.dataclass
    class Half:
        """Half documented.

        :ivar kept: documented.
        """

        kept: int = 0
        forgotten: int = 1

    with pytest.raises(ValueError, match=r"Half.forgotten is not documented"):
        apidoc._dataclass_table(Half)


@pytest.mark.parametrize("name", hook_names())
def test_every_hook_documents_each_argument_and_its_return(name: str) -> None:
    function = getattr(hookspecs, name)
    _, params, returns = docgen.split_fields(function.__doc__ or "")
    assert [p for p, _ in params] == list(inspect.signature(function).parameters)
    assert returns, f"{name} does not say what its return value means"


@pytest.mark.parametrize("name", hook_names())
def test_every_hook_has_a_section_with_its_signature(name: str) -> None:
    reference = docgen.render_hooks()
    assert f"\n## {name}\n\n```python\n{name}{inspect.signature(getattr(hookspecs, name))}".replace("'", "") in reference


def test_the_order_table_records_every_hook_but_on_exception() -> None:
    recorded = {name for _, name, *_ in docgen.record_runs()}
    assert recorded == set(hook_names()) - {"on_exception"}


@pytest.mark.slow
def test_check_fails_on_a_stale_reference_and_regenerating_fixes_it(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "plugins.md", tmp_path / "docs" / "plugins.md")
    stale = docgen.render_hooks().replace("Called once, after the model is built", "Called whenever")
    (tmp_path / "docs" / "hooks.md").write_text(stale, encoding="utf-8")
    command = [sys.executable, "-m", "trainer_core.docgen", "--root", str(tmp_path), "--check"]
    checked = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 1 and "hooks.md" in checked.stderr
    assert docgen.main(["--root", str(tmp_path)]) == 0
    assert (tmp_path / "docs" / "hooks.md").read_text(encoding="utf-8") == docgen.render_hooks()
    assert docgen.main(["--root", str(tmp_path), "--check"]) == 0


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


@pytest.mark.slow
def test_the_guides_plugin_package_installs_lists_and_passes_its_tests(tmp_path: Path) -> None:
    """Follow docs/plugins.md literally: its files, pip install, `trainer plugins`, its tests."""
    guide = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    python = code_blocks(guide, "python")
    package = tmp_path / "trainer-loss-alarm"
    module = package / "src" / "trainer_loss_alarm" / "__init__.py"
    module.parent.mkdir(parents=True)
    module.write_text(next(b for b in python if b.startswith("# src/trainer_loss_alarm/__init__.py")))
    (package / "pyproject.toml").write_text(next(b for b in code_blocks(guide, "toml") if b.startswith("# pyproject.toml")))
    (package / "tests").mkdir()
    (package / "tests" / "conftest.py").write_text(next(b for b in python if b.startswith("pytest_plugins")))
    (package / "tests" / "test_loss_alarm.py").write_text(next(b for b in python if "def test_hook_in_isolation" in b))

    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), str(package)]
    installed = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    env = {**os.environ, "PYTHONPATH": str(site)}

    console = next(b for b in code_blocks(guide, "console") if "$ trainer plugins" in b)
    expected = console.split("$ trainer plugins\n")[1].split("$ ")[0]
    listed = subprocess.run([sys.executable, "-m", "trainer_core", "plugins"], capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0 and expected in listed.stdout, listed.stdout

    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=package,
                           capture_output=True, text=True, env=env, timeout=300)
    assert tests.returncode == 0 and "3 passed" in tests.stdout, tests.stdout[-3000:]


def test_the_readme_says_how_to_get_pytorchs_cpu_build_first() -> None:
    """Issue 15, item 9: a machine without a GPU need not download CUDA wheels."""
    first_screen = (ROOT / "README.md").read_text(encoding="utf-8").split("\n---\n")[0]
    command = next(line.split() for line in first_screen.splitlines() if "download.pytorch.org/whl/cpu" in line)
    assert command[command.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    torch_family = {re.match(r"[\w-]+", d).group() for d in project["dependencies"] if d.startswith("torch")}
    assert torch_family and torch_family <= set(command), f"the CPU install must name every torch package we need: {torch_family}"
    venv = [line for line in first_screen.splitlines() if line.startswith("    python3 -m venv")]
    assert "--index-url" not in venv[0] + venv[1]  # the two first-screen commands stay as they were


# -- the docs' examples run -------------------------------------------------------------------------------------
# Every ```python block of the README and docs/*.md (not the generated references) runs here, in order,
# one namespace per document, as a reader would paste them.  A block that starts with a comment naming a
# file ("# my_plugin.py", "# src/pkg/__init__.py") is also importable as that module.  Then the test_*
# functions the blocks define are called, and every plugin class they define trains in one tiny run.
# A block that cannot run here (a GPU, a download) starts with SKIP and says why: rarely, and visibly.
SKIP = "# Not run by tests/test_docs.py:"
GENERATED = "<!-- Generated from"
DOCUMENTS = sorted(p.relative_to(ROOT).as_posix() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
                   if GENERATED not in p.read_text(encoding="utf-8")[:500])


def python_examples(text: str) -> list[str]:
    """Every ```python block, fenced at any indentation (in a list item too), dedented."""
    return [textwrap.dedent(block) for _, block in re.findall(r"^( *)```python\n(.*?)^\1```", text, flags=re.M | re.S)]


def module_named(block: str) -> str | None:
    """``my_plugin`` for a block whose first line is ``# my_plugin.py`` (or ``# src/my_plugin/__init__.py``)."""
    first = re.fullmatch(r"# ([\w/]+)\.py", block.splitlines()[0].strip()) if block.strip() else None
    if first is None:
        return None
    parts = first.group(1).split("/")
    parts = parts[1:] if parts[0] == "src" else parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_plugin_class(value: object) -> bool:
    return inspect.isclass(value) and any(hasattr(getattr(value, a, None), "trainer_impl") for a in dir(value))


def test_every_document_with_examples_is_checked() -> None:
    assert {"README.md", "docs/plugins.md", "docs/tasks.md"} <= set(DOCUMENTS)
    assert "docs/hooks.md" not in DOCUMENTS  # generated from the code, checked above


@pytest.mark.parametrize("document", DOCUMENTS)
def test_the_documents_python_examples_run(document: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer_core.testing import run_tiny

    blocks = python_examples((ROOT / document).read_text(encoding="utf-8"))
    namespace: dict[str, object] = {"__name__": "docs_example"}
    monkeypatch.chdir(tmp_path)
    for number, block in enumerate(blocks, 1):
        if block.startswith(SKIP):
            continue
        where = f"{document}, python block {number}"
        name = module_named(block)
        if name is None:
            exec(compile(block, where, "exec"), namespace)
            continue
        module = types.ModuleType(name)
        module.__file__ = str(tmp_path / f"{name}.py")
        monkeypatch.setitem(sys.modules, name, module)
        exec(compile(block, where, "exec"), module.__dict__)
        namespace.update({k: v for k, v in vars(module).items() if not k.startswith("_")})

    for name, test in [(n, v) for n, v in namespace.items() if n.startswith("test_") and callable(v)]:
        folder = tmp_path / name
        folder.mkdir()
        test(**{"tmp_path": folder} if "tmp_path" in inspect.signature(test).parameters else {})
    plugins = {name.lower(): value() for name, value in namespace.items() if is_plugin_class(value)
               and all(p.default is not p.empty for p in inspect.signature(value).parameters.values())}
    if plugins:
        trainer = run_tiny(plugins, epochs=2)
        assert trainer.state.epoch >= 1 and trainer.state.metrics


@pytest.mark.parametrize("document", DOCUMENTS)
def test_the_documents_run_configs_load(document: str) -> None:
    from trainer_core.config import apply_mapping, RunConfig

    for block in code_blocks((ROOT / document).read_text(encoding="utf-8"), "toml"):
        data = tomllib.loads(block)
        if not {"project", "build-system"} & data.keys():  # (a package's pyproject.toml)
            apply_mapping(RunConfig(), data, document).validate()


def test_a_broken_example_fails_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's example as issue 15 found it: its LossAlarm refuses limit=0.0, so its test fails."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "LossAlarm(limit=1e-9)" in readme
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "README.md").write_text(readme.replace("LossAlarm(limit=1e-9)", "LossAlarm(limit=0.0)"))
    with pytest.raises(ValueError, match="limit must be > 0"):
        test_the_documents_python_examples_run("README.md", tmp_path, monkeypatch)



# -- what the hook docs say holds in a real run (issue 15, item 7) ----------------------------------------------


def test_a_first_ctrl_c_ends_the_run_through_on_fit_end_not_on_exception() -> None:
    import signal

    from trainer_core import hookimpl
    from trainer_core.testing import HookRecorder, run_tiny

    class CtrlC:
        @hookimpl
        def on_batch_end(self, batch_idx: int) -> None:
            if batch_idx == 0:
                os.kill(os.getpid(), signal.SIGINT)

    recorder = HookRecorder()
    trainer = run_tiny({"rec": recorder, "ctrl-c": CtrlC()}, epochs=2)
    assert trainer.signals.exit_code == 130 and trainer.state.stop_reason == "received SIGINT"
    assert "on_fit_end" in recorder.names() and "on_exception" not in recorder.names()


def test_a_mid_epoch_resume_calls_on_epoch_start_again_with_a_later_first_batch(tmp_path: Path) -> None:
    from trainer_core import hookimpl, load_checkpoint
    from trainer_core.testing import HookRecorder, run_tiny, tiny_data, tiny_model
    from trainer_core.trainer import Trainer

    saved = tmp_path / "mid-epoch.pt"

    class SaveAfterTheFirstBatch:
        @hookimpl(trylast=True)
        def on_batch_end(self, trainer, batch_idx: int) -> None:
            if batch_idx == 0:
                trainer.save_checkpoint(saved)
                trainer.request_stop("saved mid-epoch")

    run_tiny({"saver": SaveAfterTheFirstBatch()}, epochs=1)
    recorder = HookRecorder()
    config = run_tiny(fit=False, epochs=1).config
    Trainer(tiny_model(), tiny_data(), config, plugins={"rec": recorder}, resume=load_checkpoint(saved)).fit()
    assert recorder.kwargs("on_epoch_start")[0]["epoch"] == 1
    assert [k["batch_idx"] for k in recorder.kwargs("on_batch_start")] == [1, 2]


def test_under_accumulation_on_before_optimizer_step_runs_only_for_batches_that_step() -> None:
    from trainer_core.testing import HookRecorder, run_tiny

    recorder = HookRecorder()
    run_tiny({"rec": recorder}, epochs=1, accumulate_grad_batches=2)  # 3 batches: steps after the 2nd and the last
    assert len(recorder.kwargs("on_batch_start")) == 3 and len(recorder.kwargs("on_before_optimizer_step")) == 2
    assert [k["optimizer_stepped"] for k in recorder.kwargs("on_batch_end")] == [False, True, True]
