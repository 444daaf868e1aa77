"""``ember export --adapter``'s note for PEFT users of a model.rope_scaling run: said after an
adapter is written (a full fine-tune has none), and without importing a .gguf or built-in base
just to print it."""

from __future__ import annotations

from ember.engine import cli
from ember.engine.cli import main
from ember.engine.config import load_config
from ember.engine.trainer import train
from tests.engine._tiny import tiny_config

ROPE = ('model.rope_scaling="yarn"', "model.rope_factor=4.0")


def test_a_full_fine_tune_exported_as_an_adapter_gets_the_error_not_the_rope_note(
    tiny, tmp_path, capsys
):
    """Was: the note for PEFT users, then "it has no adapter"."""
    run = tmp_path / "run"
    train(
        tiny_config(tiny, run, *ROPE, "method=full", "max_steps=1", "eval.metrics=[]"),
        echo=lambda *a: None,
        progress=False,
    )
    capsys.readouterr()
    assert main(["export", str(run), "--adapter", str(tmp_path / "ad")]) == 2
    err = capsys.readouterr().err
    assert "has no adapter" in err and "rope_scaling" not in err
    assert not (tmp_path / "ad").exists()


def test_the_rope_note_does_not_import_a_gguf_base(tmp_path, monkeypatch, capsys):
    """Was: resolve_model imported (converted) the .gguf into the cache to read config.json."""
    import ember.models.hub as hub

    def refused(*a, **k):
        raise AssertionError("the base was imported to print a note")

    monkeypatch.setattr(hub, "import_cached", refused)
    monkeypatch.setattr(hub, "resolve_model", refused)
    gguf = tmp_path / "base.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    cfg = load_config(None, [f"model.name={gguf}", *ROPE])
    cli._rope_note(cfg)
    err = capsys.readouterr().err
    assert "model.rope_scaling = 'yarn'" in err
    assert "rope_parameters and max_position_embeddings as --merged writes them" in err
