"""Adapters written by older PEFT versions (and the tools built on them), whose files peft 0.21
reads by its own rules. The old files are recorded here by structure (their adapter_config.json
fields, checked against files PEFT 0.6.2 / 0.10 / 0.13 / 0.14 saved) and rebuilt from peft 0.21's
own files: CI has only peft 0.21. Where peft 0.21 misreads an old file, the PEFT that wrote it is
the oracle: what the adapter computed when it was trained."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import save_file

from ember import EmberError
from ember.models.loading import load_pretrained
from ember.models.lora import load_adapter
from tests.models.test_interop_peft import _peft_adapter, save_random_model
from tests.models.test_moe import _hf_model, _ids, _load

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.json")

# Every field of the adapter_config.json PEFT 0.13.2 saves (all of its LoraConfig's; 0.6.2 writes
# a subset of these), and the three PEFT 0.14.0 added.
PEFT_0_13_FIELDS = """
    alpha_pattern auto_mapping base_model_name_or_path bias fan_in_fan_out inference_mode
    init_lora_weights layer_replication layers_pattern layers_to_transform loftq_config lora_alpha
    lora_dropout megatron_config megatron_core modules_to_save peft_type r rank_pattern revision
    target_modules task_type use_dora use_rslora
""".split()
PEFT_0_14_FIELDS = [*PEFT_0_13_FIELDS, "lora_bias", "eva_config", "exclude_modules"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama, a peft 0.21 adapter on its q_proj (rank 2 by rank_pattern) and v_proj with
    random A and B, and one PEFT model to load that adapter's variants into: (base folder,
    adapter folder, PEFT model, ids)."""
    root = tmp_path_factory.mktemp("old_peft")
    base = save_random_model(root / "base", transformers.LlamaConfig, seed=11)
    ids, _ = _peft_adapter(
        base, root / "new", target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
        pm = peft.PeftModel.from_pretrained(hf, root / "new").eval()
    return base, root / "new", pm, ids


def _peft_logits_of(saved, folder):
    """peft 0.21's logits with the adapter in ``folder``."""
    pm, ids = saved[2], saved[3]
    name = f"{folder.parent.name}_{folder.name}"  # an adapter name no other test took
    pm.load_adapter(folder, adapter_name=name)
    pm.set_adapter(name)
    with torch.no_grad():
        return pm(ids).logits


def _assert_loads_to(saved, folder, ref) -> None:
    model, _ = load_pretrained(saved[0])
    load_adapter(model, folder)
    with torch.no_grad():
        out = model.eval()(saved[3])
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def _variant(saved, out, fields=None, **patterns):
    """The saved adapter with other rank_pattern / alpha_pattern, its config cut to ``fields``
    (those an older PEFT writes)."""
    shutil.copytree(saved[1], out)
    path = out / "adapter_config.json"
    config = {**json.loads(path.read_text()), "rank_pattern": {"q_proj": 2}, **patterns}
    path.write_text(json.dumps({k: v for k, v in config.items() if not fields or k in fields}))
    return out


@pytest.mark.parametrize(
    "writer,alpha_pattern,old_alpha_pattern",
    [
        # PEFT <= 0.13 took one key for rank and alpha: the first rank_pattern key, then
        # alpha_pattern key, that matches. Layer 0's q_proj matched rank key "q_proj" and took
        # alpha_pattern.get("q_proj", lora_alpha) = 8, not the 32 (or 3) its own alpha key says.
        (PEFT_0_13_FIELDS, {"layers.0.self_attn.q_proj": 32}, {}),
        (PEFT_0_13_FIELDS, {"layers.0.self_attn.q_proj": 3, "q_proj": 32}, {"q_proj": 32}),
        # PEFT <= 0.14 matched a key as `.*\.key$` (then the module's exact name as a key): a regex
        # from the model's root matches no module, so lora_alpha applies.
        (PEFT_0_13_FIELDS, {r"model\.layers\.1\.self_attn\.v_proj": 32}, {}),
        (PEFT_0_14_FIELDS, {r"model\.layers\.1\.self_attn\.v_proj": 32}, {}),
    ],
    ids=["0.13_rank_key_wins", "0.13_first_key", "0.13_root_regex", "0.14_root_regex"],
)
def test_old_peft_patterns_scale_as_the_peft_that_wrote_them(
    saved, tmp_path, writer, alpha_pattern, old_alpha_pattern
):
    """An adapter saved by PEFT 0.6-0.14 with rank_pattern and alpha_pattern: Ember followed
    PEFT 0.21's get_pattern_key (each pattern on its own, a key matching as `(.*\\.)?key$`) and
    scaled such a module's update by 32/2 where the PEFT that trained it used 8/2 (logits off
    by 0.77 of their size on files PEFT 0.6.2, 0.10 and 0.13 saved; peft 0.21 misreads them the
    same way). Ember now reads the patterns by the rule of the PEFT whose fields the config has."""
    old = _variant(saved, tmp_path / "old", writer, alpha_pattern=alpha_pattern)
    # the old PEFT's reading, written as a peft 0.21 config
    ref = _peft_logits_of(saved, _variant(saved, tmp_path / "ref", alpha_pattern=old_alpha_pattern))
    assert not torch.allclose(ref, _peft_logits_of(saved, old))  # peft 0.21 misreads it
    _assert_loads_to(saved, old, ref)


def test_new_and_hand_written_configs_keep_peft_0_21_patterns(saved, tmp_path):
    """A config with a field newer than PEFT 0.14 (peft_version, trainable_token_indices, ...),
    or without the fields PEFT's own save writes (hand-written), reads its patterns as peft 0.21
    does."""
    pattern = {"layers.0.self_attn.q_proj": 32}
    hand = ["peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern"]
    for folder in (
        _variant(saved, tmp_path / "new", alpha_pattern=pattern),
        _variant(saved, tmp_path / "hand", hand, alpha_pattern=pattern),
    ):
        _assert_loads_to(saved, folder, _peft_logits_of(saved, folder))


def test_transformers_4_qwen2_moe_expert_adapter_loads_as_its_writer(tmp_path):
    """A Qwen2-MoE adapter PEFT made on transformers 4 names each expert's modules
    ``mlp.experts.E.gate_proj`` / ``up_proj`` / ``down_proj``. peft 0.21 on transformers 5 drops
    these weights without a word (logits off by 1.0 on a file PEFT 0.13.2 saved on
    transformers 4.46), Ember applies them as the PEFT that wrote the file did (1.5e-7 there).
    With ``layers_to_transform`` PEFT 0.7-0.17 took the last number in a module's name for the
    layer: expert 1 of every layer (and layer 1's shared expert) carries the adapter, as here.
    The oracle: transformers 5 with each update added into its fused expert weights."""
    layers = [1]
    hf = _hf_model("qwen2_moe")
    hf.save_pretrained(tmp_path / "m")
    c, g, sd = hf.config, torch.Generator().manual_seed(0), {}
    D, F, S = c.hidden_size, c.moe_intermediate_size, c.shared_expert_intermediate_size
    leaves = {"gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}
    updates = {}
    for i in range(c.num_hidden_layers):
        mods = {
            f"mlp.experts.{e}.{n}": shape
            for e in range(c.num_experts)
            if e in layers
            for n, shape in leaves.items()
        }
        if i in layers:
            mods.update(
                {f"mlp.shared_expert.{n}": (S, D) if n == "down_proj" else (D, S) for n in leaves}
            )
        for name, (fin, fout) in mods.items():
            key = f"base_model.model.model.layers.{i}.{name}"
            A, B = 0.3 * torch.randn(2, fin, generator=g), 0.3 * torch.randn(fout, 2, generator=g)
            sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = A, B
            updates[(i, name)] = 2 * B @ A  # lora_alpha / r = 2
    (tmp_path / "v4").mkdir()
    save_file(sd, tmp_path / "v4" / "adapter_model.safetensors")
    (tmp_path / "v4" / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": 2,
                "lora_alpha": 4,
                "target_modules": list(leaves),
                "layers_to_transform": layers,
                "lora_dropout": 0.0,
                "bias": "none",
            }
        )
    )
    with torch.no_grad():
        for (i, name), dw in updates.items():
            mlp = hf.model.layers[i].mlp
            if name.startswith("mlp.shared_expert."):
                getattr(mlp.shared_expert, name.rpartition(".")[2]).weight.add_(dw)
                continue
            e, leaf = int(name.split(".")[2]), name.rpartition(".")[2]
            if leaf == "down_proj":
                mlp.experts.down_proj[e].add_(dw)
            else:  # gate_up_proj (E, 2F, D): gate's rows, then up's
                mlp.experts.gate_up_proj[e, (0 if leaf == "gate_proj" else F) :][:F].add_(dw)
        ids = _ids()
        want = hf(ids).logits
        model = load_adapter(_load(tmp_path / "m"), tmp_path / "v4")
        assert (model(ids) - want).abs().max().item() <= 1e-4
        assert (_load(tmp_path / "m")(ids) - want).abs().max().item() > 1e-1  # it matters


@pytest.mark.parametrize("layers_pattern", ["layers", ["layers"]])
def test_old_peft_layers_pattern_without_layer_indices_adapts_every_layer(
    saved, tmp_path, layers_pattern
):
    """PEFT 0.6-0.13 saved a config with layers_pattern and no layers_to_transform (axolotl's
    peft_layers_pattern alone, say) and adapted every layer, the pattern unused; PEFT 0.14+
    refuses such a config, and Ember refused the old files too. They load as their writer
    computed them (checked on files PEFT 0.6.2 and 0.13.2 saved: Ember's logits equal theirs);
    from a newer PEFT the config is still refused by name."""
    old = _variant(saved, tmp_path / "old", PEFT_0_13_FIELDS, layers_pattern=layers_pattern)
    _assert_loads_to(saved, old, _peft_logits_of(saved, saved[1]))
    new = _variant(saved, tmp_path / "new", PEFT_0_14_FIELDS, layers_pattern=layers_pattern)
    with pytest.raises(EmberError, match="layers_pattern=.* is set without layers_to_transform"):
        load_adapter(load_pretrained(saved[0])[0], new)


@pytest.mark.parametrize("pattern", ["alpha_pattern", "rank_pattern"])
def test_old_peft_patterns_of_phi3_fused_modules(tmp_path, pattern):
    """Phi-3's fused qkv_proj in an adapter PEFT <= 0.13 saved, its rank or alpha set by a
    pattern: the parts Ember splits it into (q/k/v_proj, each given the fused module's values
    under its escaped full name) fell back to r / lora_alpha under the old writer's rule,
    which needs a '.' before the key (alpha: a silently wrong scale; rank: refused). The
    reference: peft 0.21 on the same file with a field newer than 0.14 (both rules give
    qkv_proj's value there)."""
    base = save_random_model(tmp_path / "base", transformers.Phi3Config, seed=5,
                             pad_token_id=0)
    value = {"rank_pattern": {"qkv_proj": 2}, "alpha_pattern": {"qkv_proj": 32}}[pattern]
    ids, ref = _peft_adapter(base, tmp_path / "new", target_modules=["qkv_proj", "o_proj"],
                             **{pattern: value})
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old)
    path = old / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in config.items() if k in PEFT_0_13_FIELDS}))
    model, _ = load_pretrained(base)
    load_adapter(model, old)
    with torch.no_grad():
        out = model.eval()(ids)
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_an_old_lora_only_file_without_its_biases_is_said(tmp_path):
    """PEFT 0.10-0.17 trained the adapted modules' biases with bias="lora_only" but saved none
    (it looked for q_proj.bias, not q_proj.base_layer.bias): Ember, like peft 0.21, loads such a
    file with the base's biases, and now says the trained biases are lost. A file that holds
    them (peft 0.21's save) loads without a word."""
    from safetensors.torch import load_file

    base = save_random_model(tmp_path / "base", transformers.Qwen2Config, seed=4)
    _peft_adapter(base, tmp_path / "new", target_modules=["q_proj", "v_proj"], bias="lora_only")
    tensors = load_file(tmp_path / "new" / "adapter_model.safetensors")
    assert any(k.endswith("base_layer.bias") for k in tensors)  # peft 0.21 saves them
    old = tmp_path / "old"
    old.mkdir()
    save_file({k: v for k, v in tensors.items() if not k.endswith(".bias")},
              old / "adapter_model.safetensors")
    config = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    (old / "adapter_config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k in PEFT_0_13_FIELDS}))
    for folder, said in ((tmp_path / "new", False), (old, True)):
        model, _ = load_pretrained(base)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            load_adapter(model, folder)
        lost = [w for w in seen if "lost the biases it trained" in str(w.message)]
        assert bool(lost) == said, [str(w.message) for w in seen]
