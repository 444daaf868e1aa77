"""Prompt tuning: PEFT's PROMPT_TUNING format and logits (PEFT itself is the oracle), packed
documents and generation with the virtual tokens."""

from __future__ import annotations

import json

import pytest
import torch

from ember import EmberError
from ember.models.generate import generate_ids
from ember.models.loading import load_hf_folder
from ember.models.prompt_tuning import (
    apply_prompt_tuning,
    load_prompt_adapter,
    prompt_packed,
    save_prompt_adapter,
    virtual_ids,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = 1e-4
P = 5


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def hf_dir(request, tmp_path_factory):
    """Llama, and Gemma 3, whose embedding module scales by sqrt(hidden): PEFT puts the prompt
    after that module, so the virtual tokens are not scaled."""
    torch.manual_seed(0)
    dims = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                tie_word_embeddings=False, rms_norm_eps=1e-5)
    d = tmp_path_factory.mktemp("hf")
    if request.param == "gemma3":
        cfg = transformers.Gemma3TextConfig(**dims, head_dim=12, sliding_window=8)
        transformers.Gemma3ForCausalLM(cfg).save_pretrained(d)
    else:
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**dims)).save_pretrained(d)
    return d


def _scale(model) -> float:
    return model.cfg.embedding_scale or 1.0


def _hf_model(hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def _tuned(hf_dir, seed=0):
    torch.manual_seed(seed)
    model = apply_prompt_tuning(load_hf_folder(hf_dir, torch.float32).eval(), P, "random")
    return model


def _ids(seed=1, shape=(2, 11)):
    return torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(seed))


def _real_logits(model, ids):
    """Logits of the real tokens of unpadded rows, with the virtual tokens in front."""
    virt = torch.tensor(virtual_ids(model)).expand(ids.shape[0], -1)
    return model(torch.cat([virt, ids], dim=1))[:, P:]


def _max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_only_the_prompt_trains_and_init_modes(hf_dir):
    model = _tuned(hf_dir)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["embed.prompt"]
    assert model.embed.prompt.shape == (P, 48) and model.embed.prompt.dtype == torch.float32
    vocab_model = apply_prompt_tuning(load_hf_folder(hf_dir, torch.float32), 3, "vocab")
    vocab, s = vocab_model.embed, _scale(vocab_model)
    rows = (vocab.prompt[:, None] == vocab.weight[None] * s).all(-1).any(-1)
    assert rows.all()  # every virtual token starts as some (scaled) vocabulary embedding

    class Tok:
        def encode(self, text, add_special_tokens=True):
            return [7, 8]

    text = apply_prompt_tuning(load_hf_folder(hf_dir, torch.float32), 3, "text", "hi", Tok())
    assert torch.equal(text.embed.prompt, text.embed.weight[[7, 8, 7]] * _scale(text))
    with pytest.raises(EmberError, match="init_text"):
        apply_prompt_tuning(load_hf_folder(hf_dir, torch.float32), 3, "text")


def test_saved_adapter_matches_peft_logits(hf_dir, tmp_path):
    model = _tuned(hf_dir)
    save_prompt_adapter(model, tmp_path / "a", base_model_name_or_path=str(hf_dir))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["token_dim"] == 48
    assert config["num_virtual_tokens"] == P and config["num_layers"] == 2
    theirs_model = peft.PeftModel.from_pretrained(_hf_model(hf_dir), tmp_path / "a").eval()
    ids = _ids()
    with torch.no_grad():
        theirs = theirs_model(input_ids=ids).logits[:, P:]
        assert _max_diff(_real_logits(model, ids), theirs) <= TOL


def test_peft_adapter_loads_in_ember(hf_dir, tmp_path):
    torch.manual_seed(0)
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    peft_model = peft.get_peft_model(_hf_model(hf_dir), cfg).eval()
    peft_model.save_pretrained(tmp_path / "a")
    ids = _ids(2)
    model = load_prompt_adapter(load_hf_folder(hf_dir, torch.float32).eval(), tmp_path / "a")
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits[:, P:]
        assert _max_diff(_real_logits(model, ids), theirs) <= TOL
    with pytest.raises(EmberError, match="PROMPT_TUNING"):
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
        load_prompt_adapter(load_hf_folder(hf_dir, torch.float32), tmp_path / "a")


def test_packed_documents_each_get_the_prompt(hf_dir):
    model = _tuned(hf_dir)
    docs = [_ids(3, (1, 7)), _ids(4, (1, 12)), _ids(5, (1, 4))]
    lens = [d.shape[1] for d in docs]
    ids = torch.cat(docs, dim=1)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0, 7, 19, 23], dtype=torch.int32)
    new_ids, new_pos, new_cu, max_len, real = prompt_packed(model, ids, pos, cu, 12)
    assert new_cu.tolist() == [0, 12, 29, 38] and max_len == 12 + P
    assert torch.equal(new_ids[0, real], ids[0]) and torch.equal(new_pos[0, real], pos[0] + P)
    with torch.no_grad():
        h = model.hidden_states(new_ids, new_pos, cu_seqlens=new_cu, max_seqlen=max_len)
        packed = model.logits(h[0, real])
        alone = torch.cat([_real_logits(model, d)[0] for d in docs])
    assert _max_diff(packed, alone) <= TOL


def test_generation_sees_the_virtual_tokens(hf_dir):
    model = _tuned(hf_dir)
    with torch.no_grad():  # a prompt large enough to decide the continuation
        model.embed.prompt.mul_(30)
    prompts = [_ids(6, (1, 4))[0].tolist(), _ids(7, (1, 9))[0].tolist()]
    out = generate_ids(model, prompts, max_new_tokens=6)
    for p, gen in zip(prompts, out, strict=True):
        seq = list(p)
        for _ in range(6):  # recompute the full sequence for every token
            with torch.no_grad():
                seq.append(int(_real_logits(model, torch.tensor([seq]))[0, -1].argmax()))
        assert gen == seq[len(p):]
    # drafts (greedy verification) give the same output
    assert generate_ids(model, prompts, max_new_tokens=6, drafts=[o[:3] for o in out]) == out
    base = load_hf_folder(hf_dir, torch.float32).eval()
    assert generate_ids(base, prompts, max_new_tokens=6) != out


def test_peft_adapters_with_whole_modules_are_refused(hf_dir, tmp_path):
    """PEFT's SEQ_CLS prompt tuning saves the classifier head beside the prompt, and
    modules_to_save a trained lm_head: Ember loaded the prompt alone and dropped them
    silently (other logits than PEFT's)."""
    torch.manual_seed(0)
    hf_cls = transformers.AutoModelForSequenceClassification.from_pretrained(
        hf_dir, num_labels=3, pad_token_id=0)
    cls_cfg = peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P)
    peft.get_peft_model(hf_cls, cls_cfg).save_pretrained(tmp_path / "cls")
    lm_cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                     modules_to_save=["lm_head"])
    peft.get_peft_model(_hf_model(hf_dir), lm_cfg).save_pretrained(tmp_path / "head")
    for name, needle in (("cls", r"score\.weight"), ("head", r"lm_head\.weight")):
        with pytest.raises(EmberError, match=f"replaces whole modules.*{needle}"):
            load_prompt_adapter(load_hf_folder(hf_dir, torch.float32), tmp_path / name)
    # a config that disagrees with its tensor (hand-edited or mixed files) is refused too
    save_prompt_adapter(_tuned(hf_dir), tmp_path / "n")
    path = tmp_path / "n" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_virtual_tokens": P + 1}))
    with pytest.raises(EmberError, match=f"{P} rows but num_virtual_tokens is {P + 1}"):
        load_prompt_adapter(load_hf_folder(hf_dir, torch.float32), tmp_path / "n")


def test_text_initialised_prompt_loads_in_peft(hf_dir, tmp_path):
    """A prompt initialised from text was saved as PEFT's TEXT without prompt_tuning_init_text
    (and without a tokenizer when no base name was given): PeftModel.from_pretrained refused
    it. Its saved embeddings are what count; PEFT now loads them."""

    class Tok:
        def encode(self, text, add_special_tokens=True):
            return [7, 8]

    model = apply_prompt_tuning(load_hf_folder(hf_dir, torch.float32).eval(), P, "text", "hi",
                                Tok())
    save_prompt_adapter(model, tmp_path / "a")
    ids = _ids(3)
    theirs = peft.PeftModel.from_pretrained(_hf_model(hf_dir), tmp_path / "a").eval()
    with torch.no_grad():
        assert _max_diff(_real_logits(model, ids), theirs(input_ids=ids).logits[:, P:]) <= TOL


def test_prompt_tuning_a_classifier_is_refused_and_a_prompted_model_is_no_folder(hf_dir,
                                                                                tmp_path):
    """PEFT's SEQ_CLS prompt tuning saves the classifier head beside the prompt (its file holds
    base_model.score.weight); Ember's prompt adapter is a causal-LM one, and save_prompt_adapter
    wrote a classifier's adapter without its head (the trained head lost, silently).
    save_pretrained of a prompt-tuned model said it had LoRA adapters."""
    from safetensors.torch import load_file

    from ember.models.heads import add_classification_head
    from ember.models.loading import save_pretrained

    hf_cls = transformers.AutoModelForSequenceClassification.from_pretrained(
        hf_dir, num_labels=2, pad_token_id=0)
    cls_cfg = peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P)
    peft.get_peft_model(hf_cls, cls_cfg).save_pretrained(tmp_path / "peft")
    assert "base_model.score.weight" in load_file(tmp_path / "peft" / "adapter_model.safetensors")
    classifier = add_classification_head(load_hf_folder(hf_dir, torch.float32), ["a", "b"])
    with pytest.raises(EmberError, match="prompt tuning on a classifier"):
        apply_prompt_tuning(classifier, P, "random")
    tuned = _tuned(hf_dir)
    with pytest.raises(EmberError, match="save_prompt_adapter"):
        save_pretrained(tuned, tmp_path / "folder")
    add_classification_head(tuned, ["a", "b"])  # a head added after the prompt
    with pytest.raises(EmberError, match="is a classifier"):
        save_prompt_adapter(tuned, tmp_path / "ember")


@pytest.mark.parametrize("bad", [2.5, 4.0, "4", 0])
def test_num_virtual_tokens_must_be_a_whole_number(hf_dir, tmp_path, bad):
    """PEFT cannot build a prompt of 2.5 (or "4", 0) virtual tokens (a deep TypeError or an
    empty prompt); Ember took a float silently in PromptTuningConfig / apply_prompt_tuning and
    failed later in torch. Both it and an adapter_config.json with such a count are clear
    errors."""
    from ember.models.prompt_tuning import PromptTuningConfig

    hf = _hf_model(hf_dir)
    if bad != 0:  # peft accepts 0 silently: no virtual tokens at all
        with pytest.raises((TypeError, ValueError)):
            cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=bad)
            peft.get_peft_model(hf, cfg)
    with pytest.raises(EmberError, match="num_virtual_tokens must be a whole number >= 1"):
        PromptTuningConfig(num_virtual_tokens=bad)
    with pytest.raises(EmberError, match="num_virtual_tokens must be a whole number >= 1"):
        apply_prompt_tuning(load_hf_folder(hf_dir, torch.float32), bad, "random")
    save_prompt_adapter(_tuned(hf_dir), tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_virtual_tokens": bad}))
    with pytest.raises(EmberError, match="num_virtual_tokens in adapter_config.json must be"):
        load_prompt_adapter(load_hf_folder(hf_dir, torch.float32), tmp_path / "a")


def test_adapter_config_fields_as_peft_reads_them(hf_dir, tmp_path):
    """PEFT fills a null num_transformer_submodules in (1 for a causal LM) and loads the
    adapter: Ember refused it. A token_dim that is not the tensor's width PEFT refuses (a
    size mismatch): Ember loaded it silently. A SEQ_2_SEQ_LM prompt is refused by name."""
    torch.manual_seed(0)
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    peft.get_peft_model(_hf_model(hf_dir), cfg).save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "num_transformer_submodules": None}))
    theirs = peft.PeftModel.from_pretrained(_hf_model(hf_dir), tmp_path / "a").eval()
    model = load_prompt_adapter(load_hf_folder(hf_dir, torch.float32).eval(), tmp_path / "a")
    ids = _ids(4)
    with torch.no_grad():
        assert _max_diff(_real_logits(model, ids), theirs(input_ids=ids).logits[:, P:]) <= TOL
    path.write_text(json.dumps({**saved, "token_dim": 7}))
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(_hf_model(hf_dir), tmp_path / "a")
    with pytest.raises(EmberError, match="48 columns but token_dim in adapter_config.json is 7"):
        load_prompt_adapter(load_hf_folder(hf_dir, torch.float32), tmp_path / "a")
    path.write_text(json.dumps({**saved, "num_transformer_submodules": None,
                                "task_type": "SEQ_2_SEQ_LM"}))
    with pytest.raises(EmberError, match="num_transformer_submodules is 2"):
        load_prompt_adapter(load_hf_folder(hf_dir, torch.float32), tmp_path / "a")


def test_distillation_of_a_prompt_tuned_student_keeps_the_token_0_terms(hf_dir, tmp_path):
    """objective = "distill" with method = "prompt": at alpha = 0 the loss is the SFT loss PEFT
    gives (token 0 predicted by the last virtual token included), and the objective weighs the
    batch by those terms too. It dropped them (and weighed by the answer tokens only)."""
    from ember.engine.losses import distill_sft_loss, sft_loss_tokens
    from ember.engine.objectives import SFT, Distill
    from ember.engine.packing import IGNORE, Example, collate

    torch.manual_seed(0)
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    peft_model = peft.get_peft_model(_hf_model(hf_dir), cfg).eval()
    peft_model.save_pretrained(tmp_path / "a")
    model = load_prompt_adapter(load_hf_folder(hf_dir, torch.float32).eval(), tmp_path / "a")
    teacher = load_hf_folder(hf_dir, torch.float32).eval()
    docs = [_ids(7, (1, n))[0].tolist() for n in (4, 8)]
    batch = collate([Example(d, d[1:] + [IGNORE], f"t:{i}", first_label=d[0])
                     for i, d in enumerate(docs)])
    objective = Distill.__new__(Distill)
    SFT.__init__(objective)
    objective.teacher, objective.teacher_tok = teacher, None
    objective.check_model(model, None)
    n = objective.weight(batch)
    assert n == sft_loss_tokens(batch, prompt_tuned=True) == 12
    with torch.no_grad():
        loss, _, sft = distill_sft_loss(model, teacher, batch, n, 2.0, 0.0)
        theirs = sum(peft_model(input_ids=torch.tensor([d]), labels=torch.tensor([d])).loss
                     * len(d) for d in docs) / n
    assert abs(loss.item() - theirs.item()) <= 1e-5 and abs(sft.item() - theirs.item()) <= 1e-5
