"""Model folders exactly as the Hugging Face tools write and read them: what transformers'
``save_pretrained`` writes loads here, and Ember's export carries every file transformers'
``from_pretrained`` / ``generate`` read from the folder it was loaded from."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from ember import EmberError
from ember.models.loading import load_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

BASE = dict(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _hf_model(**kw):
    """A tiny random transformers Llama (seeded, every weight random)."""
    config = transformers.LlamaConfig(**{**BASE, **kw})
    model = transformers.AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _hf_logits(folder, ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return hf(ids).logits


def test_export_keeps_the_sampling_defaults_of_generation_config(tmp_path, one_thread):
    """An instruct model's generation_config.json holds its sampling defaults (Llama 3 Instruct:
    do_sample, temperature 0.6, top_p 0.9) and more stop ids than config.json; transformers'
    save_pretrained writes it back as it is. Ember's export wrote bos / eos alone, so
    transformers' generate on a fine-tuned export decoded greedily."""
    hf = _hf_model(bos_token_id=1, eos_token_id=2)
    gen = hf.generation_config
    gen.do_sample, gen.temperature, gen.top_p, gen.top_k = True, 0.6, 0.9, 20
    gen.eos_token_id, gen.max_new_tokens, gen.repetition_penalty = [2, 5], 77, 1.1
    hf.save_pretrained(tmp_path / "src")
    model, _ = load_pretrained(tmp_path / "src")
    out = save_pretrained(model, tmp_path / "export")
    want = transformers.GenerationConfig.from_pretrained(tmp_path / "src").to_diff_dict()
    got = transformers.GenerationConfig.from_pretrained(out).to_diff_dict()
    assert got == want
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 2


@pytest.mark.parametrize("cls,kw", [
    ("LlamaConfig", {}),
    ("Qwen3Config", {"head_dim": 16}),
    ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16}),
], ids=["llama", "qwen3", "gemma3_text"])
def test_a_bare_base_model_loads_as_transformers_loads_it(tmp_path, one_thread, cls, kw):
    """``LlamaModel.save_pretrained`` writes ``embed_tokens.weight``... without the ``model.``
    prefix and without lm_head (architectures ["LlamaModel"]); AutoModelForCausalLM adds the
    prefix and ties the head. Ember refused the architectures name; untied, it names the
    missing head (transformers would start from a random one)."""
    config = getattr(transformers, cls)(**{**BASE, **kw}, tie_word_embeddings=True)
    base = transformers.AutoModel.from_config(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    base.save_pretrained(tmp_path / "bare")
    assert not any(k.startswith("model.") for k in base.state_dict())
    ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=g)
    model, _ = load_pretrained(tmp_path / "bare")
    with torch.no_grad():
        ours = model(ids)
    assert (ours - _hf_logits(tmp_path / "bare", ids)).abs().max().item() <= 1e-4
    out = save_pretrained(model, tmp_path / "export")
    assert (ours - _hf_logits(out, ids)).abs().max().item() <= 1e-4

    raw = json.loads((tmp_path / "bare" / "config.json").read_text())
    (tmp_path / "bare" / "config.json").write_text(json.dumps({**raw,
                                                               "tie_word_embeddings": False}))
    with pytest.raises(EmberError, match=r"missing key\(s\): lm_head.weight \(untied.*LlamaModel"):
        load_pretrained(tmp_path / "bare")


def test_saving_without_a_tokenizer_over_a_folder_names_the_tokenizer_files_it_drops(tmp_path):
    """transformers' model.save_pretrained over a model folder leaves its tokenizer there;
    Ember's save replaces the folder as a whole (tests/models/test_interop_hf.py) and dropped the
    tokenizer silently: now a warning names the files and says to pass the tokenizer."""
    from ember.models.tokenizer import tokenizer_from_gguf
    from tests.models.test_gguf import tiny_tokenizer_md

    hf = _hf_model()
    for name in ("ember", "hf"):
        hf.save_pretrained(tmp_path / name)
        tokenizer_from_gguf(tiny_tokenizer_md()).save_pretrained(tmp_path / name)
    hf.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").is_file()  # transformers keeps it
    model, tok = load_pretrained(tmp_path / "ember")
    with pytest.warns(UserWarning, match=r"tokenizer.json.*pass the tokenizer"):
        save_pretrained(model, tmp_path / "ember")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with the tokenizer, nothing is dropped
        save_pretrained(model, tmp_path / "ember", tok)
    assert (tmp_path / "ember" / "tokenizer.json").is_file()


def test_a_tied_checkpoint_holding_only_the_head_loads_as_transformers_ties_it(tmp_path):
    """tie_word_embeddings=true with lm_head.weight stored and model.embed_tokens.weight not
    (converters that keep the head's name for the shared matrix): transformers ties the
    embedding to the head; Ember refused it as missing the embedding."""
    from safetensors.torch import load_file, save_file

    hf = _hf_model(tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "src")
    path = tmp_path / "src" / "model.safetensors"
    sd = load_file(path)
    sd["lm_head.weight"] = sd.pop("model.embed_tokens.weight")
    save_file(sd, path, metadata={"format": "pt"})
    ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))
    model, _ = load_pretrained(tmp_path / "src")
    with torch.no_grad():
        ours = model(ids)
        assert (ours - hf(ids).logits).abs().max().item() <= 1e-4
    assert (ours - _hf_logits(tmp_path / "src", ids)).abs().max().item() <= 1e-4
    assert (ours - _hf_logits(save_pretrained(model, tmp_path / "out"), ids)).abs().max() <= 1e-4


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod.",
                                    "_orig_mod.module."])
def test_a_state_dict_saved_through_a_wrapper_loads_without_its_prefix(tmp_path, prefix):
    """Weights saved from a torch.compile'd (``_orig_mod.``) or DDP (``module.``) model carry the
    wrapper's prefix on every name; transformers finds none of them and starts from random
    weights (its load report says so), Ember refused them as unexpected keys. They load as the
    unwrapped model's, with a warning naming the prefix; nested wrappers too, in either order
    (nanoGPT compiles, then wraps in DDP: ``module._orig_mod.``, which was refused)."""
    from safetensors.torch import load_file, save_file

    hf = _hf_model()
    hf.save_pretrained(tmp_path / "src")
    path = tmp_path / "src" / "model.safetensors"
    ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(4))
    want = _hf_logits(tmp_path / "src", ids)
    save_file({prefix + k: v for k, v in load_file(path).items()}, path,
              metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=f"starts with '{prefix}'"):
        model, _ = load_pretrained(tmp_path / "src")
    with torch.no_grad():
        assert (model(ids) - want).abs().max().item() <= 1e-4


def test_a_full_fine_tune_is_exported_in_the_dtype_of_its_base(tmp_path):
    """A bf16 checkpoint trained with fp32 master weights (model.dtype "auto" on CPU, full
    fine-tuning) was exported in fp32: a folder twice the size of its base, where transformers 5
    loads, trains and saves that model in bf16."""
    from safetensors import safe_open

    from ember.engine.config import load_config
    from ember.engine.distributed import DistInfo
    from ember.engine.state import export_final

    _hf_model().to(torch.bfloat16).save_pretrained(tmp_path / "base")
    model, _ = load_pretrained(tmp_path / "base", "float32")  # as the trainer loads it
    cfg = load_config(None, [f'model.name="{tmp_path / "base"}"', f'run_dir="{tmp_path / "run"}"',
                             'method="full"'])
    out = export_final(model, cfg, None, DistInfo())
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(5))
    assert torch.equal(_hf_logits(out, ids), _hf_logits(tmp_path / "base", ids))


@pytest.mark.parametrize("stored,config_dtype", [(torch.float32, "bfloat16"),
                                                 (torch.bfloat16, "float32")])
def test_a_full_fine_tune_is_exported_in_the_dtype_transformers_saves(tmp_path, stored,
                                                                      config_dtype):
    """A checkpoint whose config.json names another dtype than its weights': transformers 5
    loads it in config.json's (dtype="auto", its default), trains and saves it so; the export
    took the stored dtype (fp32 weights under a bf16 config doubled the folder; bf16 weights
    under a float32 config rounded a fine-tune transformers keeps in fp32 to bf16)."""
    from safetensors import safe_open

    from ember.engine.config import load_config
    from ember.engine.distributed import DistInfo
    from ember.engine.state import export_final

    _hf_model().to(stored).save_pretrained(tmp_path / "base")
    path = tmp_path / "base" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "dtype": config_dtype}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").save_pretrained(
            tmp_path / "hf")

    def dtypes(folder):
        with safe_open(folder / "model.safetensors", "pt") as f:
            return {f.get_slice(k).get_dtype() for k in f.keys()}

    model, _ = load_pretrained(tmp_path / "base", "float32")  # as the trainer loads it
    cfg = load_config(None, [f'model.name="{tmp_path / "base"}"', f'run_dir="{tmp_path / "run"}"',
                             'method="full"'])
    out = export_final(model, cfg, None, DistInfo())
    stored_name = {torch.float32: "F32", torch.bfloat16: "BF16"}[stored]
    assert dtypes(out) == dtypes(tmp_path / "hf") != {stored_name}  # (the oracle differs)
    assert json.loads((out / "config.json").read_text())["dtype"] == config_dtype


@pytest.mark.parametrize("config_dtype", ["bfloat16", None])
def test_dtype_auto_loads_as_transformers_auto_loads(tmp_path, config_dtype):
    """transformers 5's ``from_pretrained(dtype="auto")`` (its default) takes config.json's dtype,
    else the stored one; Ember refused "auto" (its None keeps the stored dtype)."""
    _hf_model().save_pretrained(tmp_path / "m")  # fp32 weights
    path = tmp_path / "m" / "config.json"
    raw = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("dtype",
                                                                              "torch_dtype")}
    path.write_text(json.dumps({**raw, "dtype": config_dtype} if config_dtype else raw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype="auto")
    model, _ = load_pretrained(tmp_path / "m", dtype="auto")
    assert model.embed.weight.dtype == hf.dtype == getattr(torch, config_dtype or "float32")
    ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (model(ids).float() - hf(ids).logits.float()).abs().max().item() <= 0.05
    assert load_pretrained(tmp_path / "m")[0].embed.weight.dtype == torch.float32  # None: stored


def test_a_sharded_run_exports_the_generation_config_of_its_base(tmp_path, monkeypatch):
    """Under FSDP rank 0 rebuilds the model from the gathered weights before the export; the
    rebuilt model had lost the base's generation_config.json (sampling defaults), which
    transformers' generate then went without."""
    from ember.engine import state as state_mod
    from ember.engine.config import load_config
    from ember.engine.distributed import DistInfo

    hf = _hf_model(eos_token_id=2)
    hf.generation_config.do_sample, hf.generation_config.temperature = True, 0.7
    hf.save_pretrained(tmp_path / "base")
    model, _ = load_pretrained(tmp_path / "base")
    monkeypatch.setattr(state_mod, "gather_full_state_dict",
                        lambda m, trainable_only: dict(m.state_dict()))  # one process stands in
    cfg = load_config(None, [f'model.name="{tmp_path / "base"}"', f'run_dir="{tmp_path / "run"}"',
                             'method="full"'])
    out = state_mod.export_final(model, cfg, None, DistInfo(world_size=2))
    want = transformers.GenerationConfig.from_pretrained(tmp_path / "base").to_diff_dict()
    assert transformers.GenerationConfig.from_pretrained(out).to_diff_dict() == want


def test_saving_into_a_symlinked_folder_writes_where_it_points(tmp_path):
    """out_dir a symlink to a folder (an output on another disk): transformers writes into the
    folder it points to. Ember renamed the link away and put a new folder in its place, leaving
    the target stale and a dangling '.out.old-*' link behind."""
    hf = _hf_model()
    (tmp_path / "disk").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "disk")
    hf.save_pretrained(tmp_path / "out")  # the oracle: through the link
    assert (tmp_path / "disk" / "model.safetensors").is_file()
    model, _ = load_pretrained(tmp_path / "out")
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    save_pretrained(model, tmp_path / "out")
    assert (tmp_path / "out").is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == [
        "disk", "out"]
    reloaded, _ = load_pretrained(tmp_path / "disk")
    assert torch.equal(reloaded.norm.weight, model.norm.weight)


@pytest.mark.parametrize("previous", [False, True])
def test_saving_into_the_working_folder_writes_there(tmp_path, monkeypatch, previous):
    """out_dir "." (``ember export RUN --merged .``): transformers writes into the working folder.
    Ember renamed "." away to swap in the new folder, an OSError (EBUSY); renaming the absolute
    path would leave the process in a deleted folder."""
    hf = _hf_model()
    src = tmp_path / "src"
    hf.save_pretrained(src)
    model, _ = load_pretrained(src)
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    work = tmp_path / "work"
    work.mkdir()
    if previous:  # a model folder from an earlier, sharded save: its shards go
        hf.save_pretrained(work, max_shard_size="20KB")
    monkeypatch.chdir(work)
    save_pretrained(model, ".")
    assert sorted(p.name for p in work.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "work"]
    assert Path.cwd().samefile(work)
    ids = torch.randint(0, BASE["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert (_hf_logits(work, ids) - model(ids)).abs().max().item() <= 1e-4


def test_a_shard_the_index_does_not_list_is_named(tmp_path):
    """An index from another save that does not list one of the folder's shards: transformers
    loads without that shard's tensors (reported missing, initialized at random). Ember refused
    naming only the missing keys; the shard is what to look at."""
    folder = tmp_path / "sharded"
    _hf_model().save_pretrained(folder, max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != files[-1]}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, info = transformers.AutoModelForCausalLM.from_pretrained(
            folder, output_loading_info=True)
    assert info["missing_keys"]
    with pytest.raises(EmberError, match="missing key") as err:
        load_pretrained(folder)
    assert files[-1] in str(err.value)


@pytest.mark.parametrize("size", ["9KB", "10KB"])
def test_shards_are_cut_as_transformers_cuts_them(tmp_path, size):
    """max_shard_size below some tensors' sizes: transformers (huggingface_hub) gives each such
    tensor a shard of its own and keeps filling the open shard with the smaller ones; Ember
    closed the open shard at each large tensor, writing more, smaller shards (15 for 14)."""
    hf = _hf_model()
    hf.save_pretrained(tmp_path / "theirs", max_shard_size=size)
    model, _ = load_pretrained(tmp_path / "theirs")
    save_pretrained(model, tmp_path / "ours", max_shard_size=size)
    theirs, ours = (json.loads((tmp_path / d / "model.safetensors.index.json").read_text())
                    for d in ("theirs", "ours"))
    assert len(set(ours["weight_map"].values())) == len(set(theirs["weight_map"].values()))
    assert ours["metadata"] == theirs["metadata"]
    assert sorted(ours["weight_map"]) == sorted(theirs["weight_map"])


def test_a_git_lfs_pointer_in_place_of_the_weights_says_so(tmp_path):
    """A model repository cloned without git-lfs holds pointer files where the weights go;
    transformers and Ember both fail to read them ("header too large"), and Ember called the
    file truncated or corrupt. The error now says what the file is and what to run."""
    _hf_model().save_pretrained(tmp_path / "m", max_shard_size="50KB")
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[0]
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 1\n"
    shard.write_text(pointer)
    with pytest.raises(Exception):  # noqa: B017 - transformers fails too, with another message
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with pytest.raises(EmberError, match=f"{shard.name} .*Git LFS pointer.*git lfs pull"):
        load_pretrained(tmp_path / "m")
    for f in (tmp_path / "m").glob("model*"):
        f.unlink()
    (tmp_path / "m" / "pytorch_model.bin").write_text(pointer)
    with pytest.raises(EmberError, match="pytorch_model.bin .*Git LFS pointer"):
        load_pretrained(tmp_path / "m")


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model"])
def test_a_git_lfs_pointer_in_place_of_the_tokenizer_says_so(tmp_path, name):
    """tokenizer.json (Gemma's 33 MB, Llama 3's 9 MB) or tokenizer.model goes through Git LFS
    on the Hub too: cloned without git-lfs (or after ``git lfs pull --include="*.safetensors"``)
    it is a pointer that transformers' AutoTokenizer fails on (a JSON or protobuf error), and so
    did Ember ("cannot parse ...: expected value at line 1 column 1"). The error now says what
    the file is and what to run."""
    from ember.models.tokenizer import load_tokenizer

    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 1\n"
    (tmp_path / name).write_text(pointer)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer"}))
    with warnings.catch_warnings(), pytest.raises(Exception):  # noqa: B017 - another message
        warnings.simplefilter("ignore")
        transformers.AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(EmberError, match=f"{name}: it is a Git LFS pointer, not the tokenizer.*"
                                         "git lfs pull"):
        load_tokenizer(tmp_path)


def _extras(folder: Path) -> None:
    """The files ``hf download --local-dir`` and a Trainer checkpoint leave beside a model."""
    (folder / ".cache" / "huggingface" / "download").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "download" / "config.json.metadata").write_text("sha")
    (folder / "README.md").write_text("# my model\n")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (folder / "training_args.bin").write_bytes(b"\x80\x04not read")
    (folder / "trainer_state.json").write_text('{"global_step": 3}')


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("previous", [False, True])
def test_saving_into_a_folder_of_other_files_keeps_them_as_transformers_does(tmp_path, previous):
    """A folder holding only non-model files (a README, ``hf download``'s .cache/, a Trainer
    checkpoint's state) was refused ("choose a new or empty folder"); transformers writes the
    model into it and keeps them. Ember does too, a previous (sharded) model's files replaced."""
    hf = _hf_model()
    model, _ = load_pretrained(hf.save_pretrained(tmp_path / "src") or tmp_path / "src")
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    for name in ("ember", "hf"):
        _extras(tmp_path / name)
        if previous:
            hf.save_pretrained(tmp_path / name, max_shard_size="20KB")
    hf.save_pretrained(tmp_path / "hf")  # the oracle: which files transformers leaves
    save_pretrained(model, tmp_path / "ember")
    theirs, ours = _tree(tmp_path / "hf"), _tree(tmp_path / "ember")
    kept = {k: v for k, v in theirs.items() if not k.startswith(("model", "config", "generation"))}
    assert kept and {k: ours.get(k) for k in kept} == kept
    # the same files, no stale shard left (transformers leaves the earlier save's index)
    assert sorted(ours) == sorted(set(theirs) - {"model.safetensors.index.json"})
    ids = torch.randint(0, BASE["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert (_hf_logits(tmp_path / "ember", ids) - model(ids)).abs().max().item() <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ember", "hf", "src"]


def test_saving_into_a_folder_holding_an_adapter_is_refused(tmp_path):
    """A PEFT adapter's files beside a full model would make the folder load as the adapter:
    refused, nothing written or removed."""
    model, _ = load_pretrained(_hf_model().save_pretrained(tmp_path / "src") or tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    (out / "README.md").write_text("mine")
    with pytest.raises(EmberError, match=r"holds a PEFT adapter \(adapter_config\.json\).*choose "
                                         r"another folder"):
        save_pretrained(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16}
SHARD_FAMILIES = {
    "llama": (transformers.LlamaConfig, {}, "AutoModelForCausalLM"),
    "phi3_fused": (transformers.Phi3Config, {"pad_token_id": 0}, "AutoModelForCausalLM"),
    "phi_biases": (transformers.PhiConfig, {}, "AutoModelForCausalLM"),
    "gemma2": (transformers.Gemma2Config, {"head_dim": 12}, "AutoModelForCausalLM"),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 12}, "AutoModelForCausalLM"),
    # transformers 5 sorts a MoE state dict by name and writes each stack expert by expert
    "qwen3_moe": (transformers.Qwen3MoeConfig, {"head_dim": 12, **MOE}, "AutoModelForCausalLM"),
    "qwen2_moe_shared": (transformers.Qwen2MoeConfig,
                         {**MOE, "shared_expert_intermediate_size": 24}, "AutoModelForCausalLM"),
    "mixtral": (transformers.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2},
                "AutoModelForCausalLM"),
    "classifier": (transformers.LlamaConfig, {"num_labels": 3, "pad_token_id": 0},
                   "AutoModelForSequenceClassification"),
}


@pytest.mark.parametrize("family", sorted(SHARD_FAMILIES))
def test_each_tensor_is_in_the_shard_transformers_puts_it_in(tmp_path, family):
    """transformers fills shards in its state-dict order (per layer: attention, MLP, then the
    norms; Phi-3's o_proj before qkv_proj; a weight before its bias); Ember wrote its own order
    (norms first, fused tensors last), so the same model's index files differed. MoE: transformers
    sorts the names and places each expert stack's views as one tensor (Ember: 14 shards for
    12)."""
    config_cls, extra, auto = SHARD_FAMILIES[family]
    torch.manual_seed(0)
    hf = getattr(transformers, auto).from_config(config_cls(**{**BASE, **extra}))
    hf.save_pretrained(tmp_path / "theirs", max_shard_size="20KB")
    model, _ = load_pretrained(tmp_path / "theirs")
    save_pretrained(model, tmp_path / "ours", max_shard_size="20KB")
    theirs, ours = (json.loads((tmp_path / d / "model.safetensors.index.json").read_text())
                    for d in ("theirs", "ours"))
    assert len(set(theirs["weight_map"].values())) > 3
    assert ours["weight_map"] == theirs["weight_map"]
