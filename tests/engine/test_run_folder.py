"""A config.toml is taken for a run (``ember train RUN/config.toml``, ``ember eval
RUN/config.toml``) only when it is one Ember wrote beside Ember's own output; a project's own
config.toml beside a folder named checkpoints/ or final/, or a metrics.jsonl, that another tool
or the user made is a project config, as at 317df72: its run goes to runs/<name> and the file is
left as written."""

from __future__ import annotations

import shutil

import pytest

from ember.engine.cli import main
from ember.engine.config import load_config, run_folder
from ember.engine.trainer import train
from tests.engine._tiny import tiny_config


def _project(tiny, proj, **files) -> str:
    proj.mkdir()
    text = (
        "\n".join(
            [
                "# my project config, with comments",
                'name = "exp1"',
                'device = "cpu"',
                'precision = "fp32"',
                "max_steps = 1",
                "plot = false",
                "[model]",
                f'name = "{tiny["model"]}"',
                "[data]",
                f'train = ["{tiny["train"]}"]',
                "max_seq_len = 64",
                "tokens_per_batch = 128",
                "[eval]",
                "metrics = []",
                "before = false",
            ]
        )
        + "\n"
    )
    (proj / "config.toml").write_text(text)
    for rel, content in files.items():
        f = proj / rel.replace("__", "/")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(content)
    return text


@pytest.fixture(scope="module")
def ember_run(tiny, tmp_path_factory):
    """A finished one-step LoRA run (checkpoints/step_1 and final/)."""
    run = tmp_path_factory.mktemp("run") / "run"
    train(
        tiny_config(
            tiny,
            run,
            "max_steps=1",
            "eval.metrics=[]",
            "eval.before=false",
            "checkpoint.every_steps=1",
        ),
        echo=lambda *a: None,
        progress=False,
    )
    assert any((run / "checkpoints").iterdir()) and (run / "final").is_dir()
    return run


def test_a_project_config_beside_another_tools_checkpoints_trains_into_runs_name(
    tiny, tmp_path, monkeypatch, capsys
):
    """Was: trained into the project folder (run_dir "."), wrote step_1 into the user's
    checkpoints/, final/ and metrics.jsonl beside it, and overwrote the hand-written
    config.toml with the resolved one."""
    proj = tmp_path / "proj"
    text = _project(tiny, proj, checkpoints__notes_txt="mine", checkpoints__step_3__w_bin="x")
    monkeypatch.chdir(proj)
    assert run_folder("config.toml") is None
    assert main(["train", "config.toml"]) == 0
    assert (proj / "config.toml").read_text() == text
    assert sorted(p.name for p in (proj / "checkpoints").iterdir()) == ["notes_txt", "step_3"]
    assert not (proj / "final").exists() and not (proj / "metrics.jsonl").exists()
    assert (proj / "runs" / "exp1" / "final").is_dir()


@pytest.mark.parametrize(
    "files",
    [
        {"metrics.jsonl": '{"kind": "train", "step": 1, "loss": 1.0}\n'},
        {"final__model.safetensors": "not Ember's"},  # was refused: "holds a finished run's final/"
        {"checkpoints__step_1__manifest.json": '{"format": "other-tool/2"}'},
    ],
    ids=["metrics.jsonl", "final", "foreign-manifest"],
)
def test_a_project_config_beside_output_ember_did_not_write_is_not_a_run(
    tiny, tmp_path, monkeypatch, capsys, files
):
    proj = tmp_path / "proj"
    _project(tiny, proj, **files)
    monkeypatch.chdir(proj)
    assert run_folder("config.toml") is None
    assert load_config("config.toml").out_dir.resolve() == (proj / "runs" / "exp1").resolve()
    capsys.readouterr()
    assert main(["generate", "config.toml", "--prompt", "x"]) == 2  # not taken for a run
    assert capsys.readouterr().err.startswith(
        "ember: error: config.toml is a config file, not a run's (no Ember checkpoint"
    )


@pytest.mark.parametrize("output", ["checkpoints", "final"])
def test_a_hand_written_config_beside_ember_output_is_not_a_run(
    tiny, tmp_path, ember_run, monkeypatch, output
):
    """Ember's own output (copied from a run) beside a project's own config.toml: the file is
    not one Ember wrote into a run directory (it names a few settings), so not that run's."""
    proj = tmp_path / "proj"
    _project(tiny, proj)
    shutil.copytree(ember_run / output, proj / output)
    monkeypatch.chdir(proj)
    assert run_folder("config.toml") is None
    assert load_config("config.toml").out_dir.resolve() == (proj / "runs" / "exp1").resolve()


@pytest.mark.parametrize("kept", ["checkpoints", "final"])
def test_a_runs_own_config_beside_either_output_is_the_run(ember_run, tmp_path, monkeypatch, kept):
    run = tmp_path / "moved"
    run.mkdir()
    shutil.copy(ember_run / "config.toml", run / "config.toml")
    shutil.copytree(ember_run / kept, run / kept)
    monkeypatch.chdir(tmp_path)
    assert run_folder("moved/config.toml") == run.relative_to(tmp_path)
    assert load_config("moved/config.toml").out_dir.resolve() == run.resolve()
