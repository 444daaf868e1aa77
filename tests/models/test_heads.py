"""Sequence classification head: parity with transformers' ``*ForSequenceClassification`` (logits
of a right-padded batch in HF against a packed batch in Ember, gradients), HF folders in and out,
PEFT SEQ_CLS adapters both ways, the pooling rule and clear errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ember import EmberError
from ember.models import LoRAConfig, ModelConfig, Transformer, apply_lora, load_adapter
from ember.models.heads import add_classification_head, classify, last_token_positions
from ember.models.loading import load_pretrained, save_pretrained
from ember.models.lora import save_adapter

transformers = pytest.importorskip("transformers")

PAD = 0
LABELS = ("neg", "neutral", "pos")
BASE = dict(
    vocab_size=83,
    intermediate_size=72,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    pad_token_id=PAD,
)
CASES = {
    "llama": dict(hidden_size=48),
    "llama_tied": dict(hidden_size=48, tie_word_embeddings=True),
    "qwen2_bias": dict(
        model_type="qwen2", hidden_size=40, num_heads=5, num_kv_heads=1, attention_bias=True
    ),
    "mistral_window": dict(model_type="mistral", hidden_size=48, sliding_window=4),
}
# Documents of varied lengths; the third ends in two pad ids that are real tokens (the head pools
# before them, as transformers' rightmost-non-pad rule does), the fourth is a single token.
DOCS = [
    [5, 9, 17, 33, 2, 8, 41],
    [12, 3, 77],
    [7, 19, 23, 6, PAD, PAD],
    [50],
    [11, 13, 15, 17, 19, 21, 23, 25, 27],
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (tests/conftest.py: one_thread)."""


def _classifier(case: str, seed: int = 0) -> Transformer:
    cfg = ModelConfig(**{**BASE, **CASES[case]}, labels=LABELS)
    return Transformer(cfg).init_weights(std=0.1, seed=seed).eval()


def _packed(docs=DOCS):
    ids = torch.tensor([[t for d in docs for t in d]])
    pos = torch.tensor([[p for d in docs for p in range(len(d))]])
    cu = torch.tensor(
        [0, *torch.tensor([len(d) for d in docs]).cumsum(0).tolist()], dtype=torch.int32
    )
    return ids, pos, cu, max(map(len, docs))


def _padded(docs=DOCS):
    """Right-padded (B, T) ids and the attention mask of the documents' real lengths."""
    T = max(map(len, docs))
    ids = torch.tensor([d + [PAD] * (T - len(d)) for d in docs])
    mask = torch.tensor([[1] * len(d) + [0] * (T - len(d)) for d in docs])
    return ids, mask


def _ember_logits(model, docs=DOCS):
    ids, pos, cu, max_len = _packed(docs)
    return classify(model, ids, pos, cu_seqlens=cu, max_seqlen=max_len)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_packed_vs_padded(case, tmp_path):
    model = _classifier(case)
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    arch = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[model.cfg.model_type]
    assert config["architectures"] == [f"{arch}ForSequenceClassification"]
    assert config["num_labels"] == 3 and config["pad_token_id"] == PAD
    assert config["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    assert config["label2id"] == {"neg": 0, "neutral": 1, "pos": 2}
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == f"{arch}ForSequenceClassification"
    assert hf.config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    ids, mask = _padded()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        ours = _ember_logits(model)
        rows = classify(model, ids)  # the padded batch in Ember too (right padding)
    assert ours.shape == (len(DOCS), 3)
    assert (ours - ref).abs().max() < 1e-5, (ours - ref).abs().max()
    assert (rows - ref).abs().max() < 1e-5
    # Not a vacuous match: the logits differ between documents and from a wrong pooling position.
    assert (ref[0] - ref[1]).abs().max() > 1e-3
    with torch.no_grad():
        h = model.hidden_states(ids)
        wrong = F.linear(h[2, -1], model.score.weight)  # the trailing pad of document 3
    assert (wrong - ref[2]).abs().max() > 1e-3
    left = torch.cat([torch.full((1, 2), PAD), ids[:1, :-2]], 1)  # the same row, left-padded
    with pytest.raises(EmberError, match="left padding"):
        classify(model, left)


def test_pad_that_is_the_bos_right_padded_rows_match_transformers(tmp_path):
    """A model padding with its BOS (pad_token_id == bos_token_id): right-padded rows start with
    the pad id, and transformers pools them at the rightmost non-pad token as usual (Ember
    refused them as left padding); a row left-padded before its BOS is still refused."""
    bos = 1
    cfg = ModelConfig(**{**BASE, **CASES["llama"], "pad_token_id": bos}, bos_token_id=bos,
                      labels=LABELS)
    model = Transformer(cfg).init_weights(std=0.1, seed=3).eval()
    save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert hf.config.pad_token_id == hf.config.bos_token_id == bos
    docs = [[bos, 5, 9, 17, 33], [bos, 12], [bos, 7, 19, 23, 6, 8, 2], [bos]]
    T = max(map(len, docs))
    ids = torch.tensor([d + [bos] * (T - len(d)) for d in docs])
    mask = torch.tensor([[1] * len(d) + [0] * (T - len(d)) for d in docs])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        ours = classify(model, ids)
    assert (ours - ref).abs().max() < 1e-5, (ours - ref).abs().max()
    assert (ref[0] - ref[1]).abs().max() > 1e-3
    left = torch.tensor([[bos, bos, bos, 12, 14], [bos, 5, 9, 17, 33]])
    with pytest.raises(EmberError, match="left padding"):
        classify(model, left)


def test_hf_classifier_folder_round_trip(tmp_path):
    """transformers' LlamaForSequenceClassification -> Ember -> HF folder: identical tensors and
    label fields, same logits."""
    cfg = transformers.LlamaConfig(
        vocab_size=83,
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
        num_labels=3,
        id2label={0: "a", 1: "b", 2: "c"},
        label2id={"a": 0, "b": 1, "c": 2},
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForSequenceClassification(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    model, _ = load_pretrained(tmp_path / "hf")
    assert model.cfg.labels == ("a", "b", "c") and model.lm_head is None
    ids, mask = _padded()
    with torch.no_grad():
        assert (
            _ember_logits(model) - hf(input_ids=ids, attention_mask=mask).logits
        ).abs().max() < 1e-5
    save_pretrained(model, tmp_path / "out")
    a, b = (
        load_file(tmp_path / "hf" / "model.safetensors"),
        load_file(tmp_path / "out" / "model.safetensors"),
    )
    assert sorted(a) == sorted(b) and "score.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["id2label"] == {"0": "a", "1": "b", "2": "c"} and out["num_labels"] == 3


@pytest.mark.parametrize("problem", [None, "regression"])
def test_one_output_head_round_trip(tmp_path, problem):
    # num_labels = 1: a reward model (problem_type unset, as TRL saves it) or regression, whose
    # MSE transformers computes from problem_type.
    cfg = ModelConfig(**{**BASE, **CASES["llama"]}, labels=("LABEL_0",), problem_type=problem)
    model = Transformer(cfg).init_weights(std=0.1, seed=2).eval()
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_labels"] == 1 and config.get("problem_type") == problem
    again, _ = load_pretrained(tmp_path)
    assert again.cfg.labels == ("LABEL_0",) and again.cfg.problem_type == problem
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids, mask = _padded()
    y = torch.randn(len(DOCS))
    with torch.no_grad():
        ours = _ember_logits(model)
        out = hf(input_ids=ids, attention_mask=mask, labels=y)
    assert (out.logits - ours).abs().max() < 1e-5
    assert float(out.loss) == pytest.approx(float(F.mse_loss(ours[:, 0], y)), abs=1e-6)
    with pytest.raises(ValueError, match="one-output head"):
        ModelConfig(**{**BASE, **CASES["llama"]}, labels=LABELS, problem_type="regression")


def test_head_gradients_match_transformers(tmp_path):
    model = _classifier("llama", seed=1).train()
    save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).train()
    y = torch.tensor([2, 0, 1, 1, 0])
    ids, mask = _padded()
    hf(input_ids=ids, attention_mask=mask, labels=y).loss.backward()  # mean CE over the batch
    loss = F.cross_entropy(_ember_logits(model), y)
    loss.backward()
    grads = {
        "score.weight": hf.score.weight.grad,
        "embed.weight": hf.model.embed_tokens.weight.grad,
        "layers.0.attn.q_proj.weight": hf.model.layers[0].self_attn.q_proj.weight.grad,
        "layers.1.mlp.down_proj.weight": hf.model.layers[1].mlp.down_proj.weight.grad,
    }
    params = dict(model.named_parameters())
    for name, ref in grads.items():
        assert ref.abs().max() > 0, name
        err = (params[name].grad - ref).abs().max() / ref.abs().max()
        assert err < 1e-4, (name, err)


def test_a_new_heads_pad_token_gets_transformers_gradient(tmp_path):
    """add_classification_head(pad_token_id=...) on a base without a pad token: transformers
    builds the saved classifier's embedding with padding_idx = that id, so its lookups add no
    gradient; Ember used to keep training the row (the embedding kept the base's padding)."""
    cfg = ModelConfig(**{**BASE, "pad_token_id": None}, hidden_size=48)
    model = Transformer(cfg).init_weights(std=0.1, seed=3)
    add_classification_head(model, LABELS, pad_token_id=7, seed=0)
    save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    docs = [[5, 7, 9, 7, 11], [7, 3, 8, 2, 4]]  # the pad id inside documents, never last
    ids = torch.tensor(docs)
    hf(input_ids=ids, labels=torch.tensor([2, 0])).loss.backward()
    F.cross_entropy(_ember_logits(model, docs), torch.tensor([2, 0])).backward()
    ref = hf.model.embed_tokens.weight.grad
    assert ref[7].abs().max() == 0 and ref[5].abs().max() > 0
    assert (model.embed.weight.grad - ref).abs().max() / ref.abs().max() < 1e-4


def _causal_base(tmp_path):
    cfg = ModelConfig(**BASE, hidden_size=48)
    save_pretrained(Transformer(cfg).init_weights(std=0.1, seed=2), tmp_path / "base")
    return tmp_path / "base"


def _randomize_(model, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_lora_classifier_adapter_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = _causal_base(tmp_path)
    model, _ = load_pretrained(base)
    add_classification_head(model, LABELS, seed=0)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q", "v", "down")))
    model.score.weight.requires_grad_(True)  # modules_to_save: the head trains whole
    _randomize_(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    hf_base = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
    pm = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    ids, mask = _padded()
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask).logits
        ours = _ember_logits(model.eval())
    assert (ours - ref).abs().max() < 1e-5, (ours - ref).abs().max()

    # ...and back: the adapter onto a fresh Ember classifier gives the same logits.
    again, _ = load_pretrained(base)
    add_classification_head(again, LABELS, seed=9)
    load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(_ember_logits(again.eval()), ours)


def test_peft_seq_cls_adapter_loads_in_ember(tmp_path):
    peft = pytest.importorskip("peft")
    base = _causal_base(tmp_path)
    torch.manual_seed(0)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
    pm = peft.get_peft_model(
        hf,
        peft.LoraConfig(
            task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"]
        ),
    )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(tmp_path / "peft")
    model, _ = load_pretrained(base)
    add_classification_head(model, LABELS)
    load_adapter(model, tmp_path / "peft")
    assert model.score.weight.requires_grad
    ids, mask = _padded()
    with torch.no_grad():
        ref = pm.eval()(input_ids=ids, attention_mask=mask).logits
        assert (_ember_logits(model.eval()) - ref).abs().max() < 1e-5


def test_last_token_positions_rule():
    ids = torch.tensor([[4, 5, 0, 0], [0, 0, 0, 0], [0, 7, 0, 9]])
    assert last_token_positions(ids, 0).tolist() == [1, 4, 11]  # an all-pad row: its first
    assert last_token_positions(ids, None).tolist() == [3, 7, 11]
    cu = torch.tensor([0, 3, 5, 12], dtype=torch.int32)
    assert last_token_positions(ids.reshape(1, -1), 0, cu).tolist() == [1, 3, 11]


def test_head_errors(tmp_path):
    model = _classifier("llama")
    assert model.cfg.num_params() == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="without an LM head"):
        _ = model.output_weight
    with pytest.raises(EmberError, match="already a classifier"):
        add_classification_head(model, ("x", "y"))
    assert add_classification_head(model, LABELS) is model  # same labels: kept as it is
    with pytest.raises(ValueError, match="labels must be distinct non-empty names"):
        ModelConfig(**BASE, hidden_size=48, labels=("a", "a"))
    base = _causal_base(tmp_path)
    lm, _ = load_pretrained(base)
    with pytest.raises(EmberError, match="no classification head"):
        classify(lm, torch.tensor([[1, 2]]))
    apply_lora(model, LoRAConfig(rank=2))
    save_adapter(model, tmp_path / "ad")
    with pytest.raises(EmberError, match="holds a classification head"):
        load_adapter(lm, tmp_path / "ad")
    other, _ = load_pretrained(base)
    add_classification_head(other, ("a", "b"))
    with pytest.raises(EmberError, match="different number of labels"):
        load_adapter(other, tmp_path / "ad")


@pytest.mark.parametrize(
    "edit,match",
    [
        ({"problem_type": "regression"}, "problem_type 'regression' with num_labels 3"),
        ({"problem_type": "multi_label_classification"}, "is not supported"),
        ({"num_labels": 0, "id2label": {}}, "num_labels must be an integer >= 1"),
        ({"id2label": {"0": "a", "5": "b"}, "num_labels": 2}, "id2label must map"),
        ({"architectures": ["LlamaForTokenClassification"]}, "not supported"),
    ],
)
def test_bad_classifier_configs(tmp_path, edit, match):
    save_pretrained(_classifier("llama"), tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(EmberError, match=match):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("edit", [
    {"num_labels": 3, "id2label": {"0": "a", "1": "b"}, "label2id": {"a": 0, "b": 1}},
    {"num_labels": 3, "id2label": None, "label2id": None},
])
def test_num_labels_and_id2label_read_as_transformers_reads_them(tmp_path, edit):
    """config.json's num_labels against its id2label, as transformers 5 reads them: num_labels
    wins over an id2label of another length (the classes are then LABEL_i; Ember refused the
    folder)."""
    save_pretrained(_classifier("llama"), tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
        model, _ = load_pretrained(tmp_path)
    assert model.cfg.labels == tuple(hf.config.id2label[i] for i in range(hf.config.num_labels))
    ids, mask = _padded()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        assert (_ember_logits(model) - ref).abs().max() < 1e-5


_MOE = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=5, moe_intermediate_size=24,
                                          shared_expert_intermediate_size=40)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=5, moe_intermediate_size=24, head_dim=12)),
}


@pytest.mark.parametrize("case", sorted(_MOE))
def test_moe_classifier_folder_round_trip_matches_transformers(tmp_path, case):
    """transformers' Mixtral / Qwen2-MoE / Qwen3-MoE *ForSequenceClassification folders load
    with their labels and logits, and export back to a folder transformers loads with no missing
    or unexpected keys and the same logits (the MoE config reader refused the classifier)."""
    cls, kw = _MOE[case]
    cfg = getattr(transformers, cls)(
        vocab_size=83, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, pad_token_id=PAD,
        id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2}, **kw,
    )
    torch.manual_seed(0)
    hf = transformers.AutoModelForSequenceClassification.from_config(cfg).eval()
    _randomize_(hf)
    hf.save_pretrained(tmp_path / "hf")
    model, _ = load_pretrained(tmp_path / "hf")
    assert model.cfg.labels == ("a", "b", "c") and model.cfg.num_experts == cfg.num_experts
    ids, mask = _padded()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        assert (_ember_logits(model.eval()) - ref).abs().max() < 1e-5
    save_pretrained(model, tmp_path / "out")
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["architectures"] == [type(hf).__name__] and out["model_type"] == case
    assert out["id2label"] == {"0": "a", "1": "b", "2": "c"}
    again, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out", output_loading_info=True)
    assert type(again) is type(hf) and not any(info.values()), info
    with torch.no_grad():
        assert torch.equal(again.eval()(input_ids=ids, attention_mask=mask).logits, ref)


def test_gemma3_text_classifier_from_transformers(tmp_path):
    """transformers names Gemma 3's text classifier Gemma3TextForSequenceClassification (its
    Gemma3ForSequenceClassification is the multimodal model's): Ember refused the folder
    transformers saves, and wrote the multimodal name. Folders Ember wrote before still load."""
    from tests.models.test_interop_hf import randomize_

    cfg = transformers.Gemma3TextConfig(
        vocab_size=BASE["vocab_size"], hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
        pad_token_id=PAD, num_labels=3)
    hf = transformers.AutoModelForSequenceClassification.from_config(cfg)
    randomize_(hf, 7)
    hf.save_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "hf", attn_implementation="eager").eval()
    model, _ = load_pretrained(tmp_path / "hf")
    ids, mask = _padded()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask).logits
        assert (classify(model, ids) - want).abs().max().item() <= 1e-5
    save_pretrained(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Gemma3TextForSequenceClassification"]
    config["architectures"] = ["Gemma3ForSequenceClassification"]  # Ember's earlier exports
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    assert load_pretrained(tmp_path / "out")[0].cfg.labels == model.cfg.labels


def test_classifier_of_a_family_transformers_has_no_classifier_for_is_refused(tmp_path):
    """transformers has no GraniteForSequenceClassification (AutoModelForSequenceClassification
    refuses a GraniteConfig): a Granite classifier's merged folder was refused, but its SEQ_CLS
    adapter was written, for a base no PEFT model can be built on; both are refused by name."""
    config = transformers.GraniteConfig(
        vocab_size=83, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2, residual_multiplier=0.5)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        transformers.AutoModelForSequenceClassification.from_config(config)
    model, _ = load_pretrained(tmp_path / "base")
    add_classification_head(model, LABELS, seed=0)
    with pytest.raises(EmberError, match="no GraniteForSequenceClassification"):
        save_pretrained(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    apply_lora(model, LoRAConfig(rank=2, targets=("q",)))
    with pytest.raises(EmberError, match="no GraniteForSequenceClassification"):
        save_adapter(model, tmp_path / "adapter")


def test_classifier_quantized_while_loading_keeps_its_head_dense_as_bitsandbytes(tmp_path):
    """quantize="nf4" on a *ForSequenceClassification folder quantized the ``score`` head too
    (classify then crashed: 'Linear4bit' object has no attribute 'weight'); transformers +
    bitsandbytes leave it dense. Same class logits as transformers' 4-bit classifier, and the
    export loads in transformers with the head dense."""
    pytest.importorskip("bitsandbytes")
    cfg = transformers.LlamaConfig(
        vocab_size=83, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, num_labels=3)
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "hf")
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "hf", quantization_config=bnb).eval()
    model, _ = load_pretrained(tmp_path / "hf", quantize="nf4", double_quant=False)
    assert type(model.score) is torch.nn.Linear
    ids, mask = _padded()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        assert (_ember_logits(model) - ref).abs().max() < 1e-5
    save_pretrained(model, tmp_path / "out")
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["quantization_config"]["llm_int8_skip_modules"] == ["score"]
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out").eval()
    with torch.no_grad():
        assert (reloaded(input_ids=ids, attention_mask=mask).logits - ref).abs().max() < 1e-5


@pytest.mark.parametrize("sharded", [False, True])
def test_folder_without_architectures_loads_the_head_its_weights_hold(tmp_path, sharded):
    """config.json without ``architectures`` (transformers' Auto classes never need it): a
    classifier's ``score.weight`` was refused as an unexpected key; it loads as the classifier
    AutoModelForSequenceClassification loads, a causal LM as AutoModelForCausalLM's."""
    from ember.models.safetensors_io import read_config

    kw = dict(vocab_size=83, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD)
    shard = {"max_shard_size": "40KB"} if sharded else {}
    torch.manual_seed(0)
    cls = transformers.LlamaConfig(**kw, num_labels=3, id2label=dict(enumerate(LABELS)),
                                   label2id={v: i for i, v in enumerate(LABELS)})
    transformers.LlamaForSequenceClassification(cls).save_pretrained(tmp_path / "c", **shard)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).save_pretrained(
        tmp_path / "l", **shard)
    for name in ("c", "l"):
        path = tmp_path / name / "config.json"
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items()
                                    if k != "architectures"}))
    assert (tmp_path / "c" / "model.safetensors.index.json").is_file() == sharded
    ids, mask = _padded()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "c").eval()
    model, _ = load_pretrained(tmp_path / "c")
    assert read_config(tmp_path / "c").labels == LABELS == model.cfg.labels
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        assert (_ember_logits(model) - ref).abs().max() < 1e-5
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "l").eval()
    model, _ = load_pretrained(tmp_path / "l")
    assert model.cfg.labels is None and model.lm_head is not None
    with torch.no_grad():
        ref = hf(input_ids=ids[:1, :7]).logits
        assert (model(ids[:1, :7]) - ref).abs().max() < 1e-5
