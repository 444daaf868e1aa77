"""``ember export --merged`` / ``--gguf`` of a LoRA run whose base trained in a narrower dtype
than its checkpoint (precision = "bf16" over an fp32 base: model.dtype "auto" loads the frozen
base in bf16). Oracle: PEFT's ``merge_and_unload`` on the base as transformers loads it (fp32)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ember.engine.cli import main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module", params=["kaiming", "pissa"])
def bf16_run(request, tiny, tmp_path_factory):
    """lora.init = "pissa": the final adapter is the plain rank-2r LoRA on the original base."""
    root = tmp_path_factory.mktemp("bf16run")
    cfg = root / "c.toml"
    cfg.write_text(
        f'model.name = "{tiny["model"]}"\nrun_dir = "{root / "run"}"\n'
        f'device = "cpu"\nprecision = "bf16"\nmax_steps = 1\nplot = false\n'
        f'[optim]\nlr = 5e-3\n[data]\ntrain = ["{tiny["small"]}"]\n'
        f'max_seq_len = 64\n[eval]\nshow = 0\n[lora]\ninit = "{request.param}"\n'
        "[checkpoint]\nevery_steps = 1\n"
    )
    assert main(["train", str(cfg)]) == 0
    assert 'dtype = "bfloat16"' in (root / "run" / "config.toml").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"])
        merged = peft.PeftModel.from_pretrained(base, root / "run" / "final" / "adapter")
        merged = merged.merge_and_unload()
    assert merged.dtype == torch.float32
    merged.save_pretrained(root / "peft_merged")
    for f in Path(tiny["model"]).iterdir():  # the tokenizer, which --gguf needs
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, root / "peft_merged")
    return {
        "init": request.param,
        "run": root / "run",
        "theirs": merged.state_dict(),
        "peft": root / "peft_merged",
    }


def test_merged_export_merges_into_the_fp32_base_weights(bf16_run, tmp_path):
    """Every tensor equals PEFT's merge on the fp32 base, bit for bit (was: the base's
    bf16-rounded values written as fp32: 15 of 20 tensors off by up to 4.9e-4, the untouched
    embedding included)."""
    out = tmp_path / "merged"
    assert main(["export", str(bf16_run["run"]), "--merged", str(out)]) == 0
    ours, theirs = load_file(out / "model.safetensors"), bf16_run["theirs"]
    assert ours.keys() <= theirs.keys()
    assert [k for k, v in ours.items() if not torch.equal(v, theirs[k])] == []


def test_merged_export_of_a_run_without_its_final_adapter(bf16_run, tmp_path):
    """The same run rebuilt from its last checkpoint (final/ gone: a run stopped early) merges
    the same (was, with PiSSA: the run's bf16 residual base plus B A, 7e-4 off)."""
    run = tmp_path / "run"
    shutil.copytree(bf16_run["run"], run, ignore=shutil.ignore_patterns("final"))
    out = tmp_path / "merged"
    assert main(["export", str(run), "--merged", str(out)]) == 0
    ours, theirs = load_file(out / "model.safetensors"), bf16_run["theirs"]
    assert [k for k, v in ours.items() if not torch.equal(v, theirs[k])] == []


def test_gguf_export_merges_into_the_fp32_base_weights(bf16_run, tmp_path):
    """--gguf of the run is the GGUF of PEFT's fp32 merge (F32: the merged values themselves)."""
    from ember.models.gguf import load_gguf

    ours, theirs = tmp_path / "run.gguf", tmp_path / "peft.gguf"
    assert main(["export", str(bf16_run["run"]), "--gguf", str(ours), "--gguf-type", "f32"]) == 0
    assert main(["export", str(bf16_run["peft"]), "--gguf", str(theirs), "--gguf-type", "f32"]) == 0
    a, b = load_gguf(ours)[1], load_gguf(theirs)[1]
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
