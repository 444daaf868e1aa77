"""Tokenizer: GGUF-built ids and chat rendering equal transformers' for SmolLM2, HF folder round
trips both ways (ours -> transformers, transformers -> ours), llama.cpp pre-tokenizer rules,
sandboxed templates and clear errors."""

from __future__ import annotations

import json

import pytest
import tokenizers

from ember import EmberError
from ember.models.gguf import GGUFFile
from ember.models.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_gguf
from tests.models.test_gguf import _offline, tiny_tokenizer_md

TEXTS = [
    "Hello world",
    "What is the capital of France?",
    "  leading,  double  spaces\t\ttabs\n\n\nnewlines   trailing   ",
    "héllo wörld — naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어, العربية",
    "emoji 🤖🔥👍🏽 and a family 👨‍👩‍👧 in one ZWJ sequence",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    'for (int i = 0; i < n; ++i) { s += a[i]; }  // C\nconsole.log("hi");',
    "numbers 12345, 3.14159, 2024-06-01, 1e-5 and 007",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "it's don't we'll I'M you've THEY'RE",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    "",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! 👋"}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Write code:\n```py\nprint('x')\n```"},
     {"role": "assistant", "content": "Done."}],
]

_CACHE: dict = {}


@pytest.fixture(scope="module")
def smol_gguf():
    from ember.models.hub import builtin_gguf_path

    try:
        return builtin_gguf_path("smollm2")
    except EmberError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ours(smol_gguf) -> Tokenizer:
    with GGUFFile(smol_gguf) as g:
        return tokenizer_from_gguf(g.metadata)


@pytest.fixture(scope="module")
def theirs(smol_gguf):
    transformers = pytest.importorskip("transformers")
    with _offline():
        return transformers.AutoTokenizer.from_pretrained(smol_gguf.parent,
                                                          gguf_file=smol_gguf.name)


def test_ids_match_transformers_gguf_tokenizer(ours, theirs):
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode_batch(TEXTS) == [ours.encode(t) for t in TEXTS]
    assert ours.decode_batch([ours.encode(t) for t in TEXTS[:3]]) == TEXTS[:3]


def test_special_tokens_match_transformers(ours, theirs):
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, name) == getattr(theirs, name), name
        assert getattr(ours, name + "_id") == getattr(theirs, name + "_id"), name
    assert ours.vocab_size == len(theirs) == 49152
    assert ours.eos_token_ids == {theirs.eos_token_id}
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2  # control tokens stay whole
    assert ours.decode(ids) == "user\nhi"  # and are skipped when decoding by default


def test_chat_template_matches_transformers(ours, theirs):
    for chat in CHATS:
        for gen in (False, True):
            text = ours.apply_chat_template(chat, add_generation_prompt=gen)
            assert text == theirs.apply_chat_template(chat, add_generation_prompt=gen,
                                                      tokenize=False)
            ids = ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)
            assert ids == theirs(text, add_special_tokens=False)["input_ids"]
    text = ours.apply_chat_template(CHATS[0], add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "named SmolLM" in text


def test_our_folder_loads_in_transformers_and_back(ours, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours.save_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    for text in TEXTS:
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
        assert again.encode(text) == ours.encode(text)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(theirs, name) == getattr(ours, name) == getattr(again, name)
    assert again.chat_template == ours.chat_template
    chat = CHATS[1]
    assert theirs.apply_chat_template(chat, tokenize=False) == ours.apply_chat_template(chat)


def test_reads_folder_written_by_transformers(theirs, ours, tmp_path):
    theirs.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = load_tokenizer(tmp_path)
    for text in TEXTS:
        assert loaded.encode(text) == ours.encode(text)
    assert loaded.eos_token == "<|im_end|>" and loaded.bos_token == "<|im_start|>"
    assert loaded.eos_token_ids == {0, 2}
    assert loaded.apply_chat_template(CHATS[1]) == ours.apply_chat_template(CHATS[1])


def test_digits_split_like_llama_cpp():
    """llama.cpp splits every digit on its own for the 'smollm' pre-tokenizer (as SmolLM's own
    tokenizer.json does); 'default' (GPT-2) lets the '1 2' merge apply."""
    smol = tokenizer_from_gguf(tiny_tokenizer_md("smollm"))
    with pytest.warns(UserWarning, match="splitting like GPT-2"):
        gpt2 = tokenizer_from_gguf(tiny_tokenizer_md("default"))
    twelve = smol.token_to_id("12")
    assert twelve is not None
    assert twelve not in smol.encode("a 12 b")
    assert twelve in gpt2.encode("a12b")
    assert smol.decode(smol.encode(" the 12")) == " the 12"
    with pytest.raises(EmberError, match="pre-tokenizer 'mystery' is not supported"):
        tokenizer_from_gguf(tiny_tokenizer_md("mystery"))


def test_add_bos_from_gguf_metadata():
    md = tiny_tokenizer_md() | {"tokenizer.ggml.add_bos_token": True}
    tok = tokenizer_from_gguf(md)
    assert tok.encode("he", add_special_tokens=True)[0] == tok.bos_token_id
    assert tok.encode("he") == [tok.token_to_id("he")]


def test_pad_falls_back_to_eos():
    md = dict(tiny_tokenizer_md())
    del md["tokenizer.ggml.padding_token_id"]
    tok = tokenizer_from_gguf(md)
    assert tok.pad_token is None and tok.pad_token_id == tok.eos_token_id == 2


def test_template_sandbox_and_errors():
    md = tiny_tokenizer_md()
    tok = tokenizer_from_gguf(md)
    tok.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(EmberError, match="chat template failed"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok.chat_template = "{{ ''.__class__.__subclasses__() }}"
    with pytest.raises(EmberError, match="chat template failed"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok.chat_template = ("{% if messages[0]['role'] != 'user' %}"
                         "{{ raise_exception('first message must be user') }}{% endif %}"
                         "{% generation %}{{ messages[0]['content'] | tojson }}{% endgeneration %}"
                         "{{ bos_token }}")
    with pytest.raises(EmberError, match="first message must be user"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    assert tok.apply_chat_template([{"role": "user", "content": "é<"}]) == '"é<"<|im_start|>'
    tok.chat_template = "{% for %}"
    with pytest.raises(EmberError, match="does not parse"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok.chat_template = None
    with pytest.raises(EmberError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(EmberError, match="expects a str"):
        tok.encode(["not", "a", "string"])


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(EmberError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(EmberError, match="slow tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(EmberError, match="cannot parse"):
        load_tokenizer(tmp_path)
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 0}, merges=[]))
    with pytest.raises(EmberError, match="not in the vocabulary"):
        Tokenizer(backend, eos_token="</s>")


def test_unknown_special_token_in_config_is_dropped(tmp_path):
    tok = tokenizer_from_gguf(tiny_tokenizer_md())
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["pad_token"] = "<pad>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "special_tokens_map.json").unlink()
    with pytest.warns(UserWarning, match="pad_token '<pad>' is not in tokenizer.json"):
        loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token is None and loaded.pad_token_id == loaded.eos_token_id



def test_template_turn_end_stops_generation(tmp_path):
    """A file whose chat template ends turns with another token than eos (Gemma's <end_of_turn>,
    Phi-3's <|end|>, older Llama 3 files' <|eot_id|>) stops there too, as llama.cpp does."""
    from ember.models.gguf import load_gguf
    from tests.models.test_gguf import write_tiny_gguf

    template = "{% for m in messages %}{{ m['content'] }}<|endoftext|>{% endfor %}"
    md = tiny_tokenizer_md() | {"tokenizer.chat_template": template}
    assert tokenizer_from_gguf(md).eos_token_ids == {2, 0}
    assert tokenizer_from_gguf(tiny_tokenizer_md()).eos_token_ids == {2}  # not in the template
    write_tiny_gguf(tmp_path / "m.gguf", metadata={"tokenizer.chat_template": template})
    cfg, _, tok = load_gguf(tmp_path / "m.gguf")
    assert cfg.eos_token_id == [2, 0] and tok.eos_token_ids == {0, 2}


def test_plain_text_control_tokens_keep_their_ids():
    """llama.cpp's converter writes added tokens of a byte-level vocabulary as plain text, so
    DeepSeek-R1-Distill's specials are not in the byte alphabet: they keep the file's ids, stay
    whole in text and decode back (was: 'Missing SpecialToken(s)' from tokenizers)."""
    md = tiny_tokenizer_md("deepseek-r1-qwen")
    n = len(md["tokenizer.ggml.tokens"])
    md["tokenizer.ggml.tokens"] = [*md["tokenizer.ggml.tokens"], "<｜begin▁of▁sentence｜>",
                                   "<｜end▁of▁sentence｜>", "<｜User｜>"]
    md["tokenizer.ggml.token_type"] = [*md["tokenizer.ggml.token_type"], 3, 3, 4]
    md |= {"tokenizer.ggml.bos_token_id": n, "tokenizer.ggml.eos_token_id": n + 1,
           "tokenizer.ggml.add_bos_token": True}
    tok = tokenizer_from_gguf(md)
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (n, n + 1, n + 3)
    ids = tok.encode("<｜User｜>he<｜end▁of▁sentence｜>", add_special_tokens=True)
    assert ids == [n, n + 2, tok.token_to_id("he"), n + 1]
    assert tok.decode(ids) == "<｜User｜>he"
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<｜begin▁of▁sentence｜><｜User｜>he<｜end▁of▁sentence｜>")


def test_smollm2_digits_follow_its_own_tokenizer_json(ours, smol_gguf):
    """SmolLM2's tokenizer.json splits every digit off before GPT-2's regex, and so does llama.cpp
    for pre 'smollm': whitespace before a digit stays one piece ("  " + "0"). transformers' GGUF
    tokenizer drops that step (GPT-2's regex alone: " " + " 0"); Ember follows the model's own."""
    with GGUFFile(smol_gguf) as g:
        md = g.metadata
    toks = md["tokenizer.ggml.tokens"]
    oracle = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab={t: i for i, t in enumerate(toks)},
        merges=[tuple(m.split(" ")) for m in md["tokenizer.ggml.merges"]]))
    oracle.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for text in ["  0", "x = [\n  1,\n  22\n]", "\r\n  9", "\t\t42", "a   123456789"]:
        assert ours.encode(text) == oracle.encode(text).ids, text


# Reads what the cases below vary: a key that may be null, the reasoning under another name, and
# the end of the last message (continued or closed).
_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.tool_calls is defined %}{{ m.tool_calls[0].name }}{% endif %}"
    "{% if m.reasoning_content is string %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("messages,kw", [
    # OpenAI-style null fields: transformers 5 leaves them out; Ember crashed on tool_calls[0]
    ([{"role": "user", "content": "hi"},
      {"role": "assistant", "content": "yo", "tool_calls": None}], {}),
    # the reasoning under another of its names: Ember dropped it
    ([{"role": "user", "content": "hi"},
      {"role": "assistant", "content": "yo", "reasoning": "think "}], {}),
    ([{"role": "user", "content": "hi"},
      {"role": "assistant", "content": "yo", "thinking": "hm"}], {}),
    # continue_final_message: Ember closed the turn (it became a template variable)
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}],
     {"continue_final_message": True}),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Trailing  "}],
     {"continue_final_message": True}),
    ([{"role": "user", "content": "hi"},
      {"role": "assistant", "content": "x", "reasoning_content": "so"}],
     {"continue_final_message": "reasoning_content"}),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
     {"continue_final_message": True}),
])
def test_chat_template_inputs_as_transformers_renders_them(messages, kw):
    import copy

    transformers = pytest.importorskip("transformers")
    given = copy.deepcopy(messages)
    ours = tokenizer_from_gguf(tiny_tokenizer_md() | {"tokenizer.chat_template": _TEMPLATE})
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=ours.backend,
                                                  eos_token="<|im_end|>", chat_template=_TEMPLATE)
    assert ours.apply_chat_template(messages, **kw) == theirs.apply_chat_template(
        messages, tokenize=False, **kw)
    assert messages == given  # the caller's messages are not edited
    if kw:
        with pytest.raises(EmberError, match="exclude each other"):
            ours.apply_chat_template(messages, add_generation_prompt=True, **kw)


_TOOL_USE = ("{% for t in tools %}[tool {{ t['name'] }}]{% endfor %}"
             "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
_RAG = "{% for d in documents %}<doc>{{ d['text'] }}</doc>{% endfor %}{{ messages[0]['content'] }}"


@pytest.mark.parametrize("layout", ["list", "files"])
def test_named_chat_templates_are_chosen_as_transformers_chooses(tmp_path, layout):
    """Hermes-2-Pro-style folders ship a default and a "tool_use" template (tokenizer_config's
    list form, or transformers 5's chat_template.jinja + additional_chat_templates/): Ember
    rendered the default even when given tools, and chose the first template of a list without
    a default; it did not read additional_chat_templates/ at all."""
    transformers = pytest.importorskip("transformers")
    tokenizer_from_gguf(tiny_tokenizer_md()).save_pretrained(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    default = cfg.pop("chat_template")
    named = {"default": default, "tool_use": _TOOL_USE, "rag": _RAG}
    if layout == "list":
        cfg["chat_template"] = [{"name": n, "template": t} for n, t in named.items()]
    else:
        (tmp_path / "chat_template.jinja").write_text(default)
        (tmp_path / "additional_chat_templates").mkdir()
        for n in ("tool_use", "rag"):
            (tmp_path / "additional_chat_templates" / f"{n}.jinja").write_text(named[n])
    cfg_path.write_text(json.dumps(cfg))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    chat = [{"role": "user", "content": "hi"}]
    tools = [{"name": "get_weather", "description": "x", "parameters": {}}]
    docs = [{"title": "t", "text": "d"}]
    for kw in ({}, {"tools": tools}, {"chat_template": "rag", "documents": docs},
               {"chat_template": "{{ messages | length }}"}, {"add_generation_prompt": True}):
        want = theirs.apply_chat_template(chat, tokenize=False, **kw)
        for ours in (load_tokenizer(tmp_path), _resaved(load_tokenizer(tmp_path), tmp_path)):
            assert ours.apply_chat_template(chat, **kw) == want, kw
        again = transformers.AutoTokenizer.from_pretrained(tmp_path / "resaved")
        assert again.apply_chat_template(chat, tokenize=False, **kw) == want, kw
    assert "[tool get_weather]" in load_tokenizer(tmp_path).apply_chat_template(chat, tools=tools)
    cfg["chat_template"] = [{"name": "tool_use", "template": _TOOL_USE}]  # no default: refused
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    import shutil
    shutil.rmtree(tmp_path / "additional_chat_templates", ignore_errors=True)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(EmberError, match=r"named \['tool_use'\] but no default"):
        load_tokenizer(tmp_path).apply_chat_template(chat)


def _resaved(tok: Tokenizer, tmp_path) -> Tokenizer:
    """tok written by Ember and read back (the named templates survive the round trip)."""
    out = tmp_path / "resaved"
    tok.save_pretrained(out)
    return load_tokenizer(out)


def test_named_chat_templates_travel_through_gguf(tmp_path):
    """GGUF keeps named templates as gguf's add_chat_template writes them
    (tokenizer.chat_template.NAME + tokenizer.chat_templates); both ways they were dropped."""
    from gguf import GGUFReader, GGUFWriter, Keys

    from ember.models.gguf_tokenizer import tokenizer_metadata

    named = [{"name": "default", "template": "{{ messages[0]['content'] }}"},
             {"name": "tool_use", "template": _TOOL_USE}, {"name": "rag", "template": _RAG}]
    w = GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_chat_template(named)  # gguf's own writer: the keys llama.cpp reads
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    fields = GGUFReader(tmp_path / "t.gguf").fields
    md = tiny_tokenizer_md() | {k: f.contents() for k, f in fields.items()
                                if k.startswith("tokenizer.chat_template")}
    tok = tokenizer_from_gguf(md)
    assert tok.chat_template == named[0]["template"]
    assert tok.chat_templates == {"tool_use": _TOOL_USE, "rag": _RAG}
    out = tokenizer_metadata(tok, len(md["tokenizer.ggml.tokens"]))
    assert {k: v for k, v in out.items() if k.startswith(Keys.Tokenizer.CHAT_TEMPLATE)} == {
        k: md[k] for k in md if k.startswith(Keys.Tokenizer.CHAT_TEMPLATE)} | {
        Keys.Tokenizer.CHAT_TEMPLATES: ["rag", "tool_use"]}


def test_tools_given_as_python_functions_are_refused():
    """transformers derives a JSON schema from a Python function given as a tool; Ember put the
    text '<function>' in the prompt instead."""

    def get_weather(city: str) -> str:
        """Weather.

        Args:
            city: where
        """
        return city

    tok = tokenizer_from_gguf(tiny_tokenizer_md())
    with pytest.raises(EmberError, match="tools must be JSON schemas"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=[get_weather])


@pytest.mark.parametrize("adds", ["bos", "eos", "bos+eos", "none"])
def test_bos_eos_flags_follow_the_post_processor(tmp_path, adds):
    """transformers 5 writes no add_bos_token / add_eos_token into tokenizer_config.json (nor
    has Llama 3's), and encodes with tokenizer.json's post-processor whatever the config says:
    the flags follow what encoding adds (they read False, so a GGUF export wrote
    add_bos_token = false and llama.cpp dropped the BOS the model needs)."""
    from tokenizers import processors

    from ember.models.gguf_tokenizer import tokenizer_metadata

    transformers = pytest.importorskip("transformers")
    backend = tokenizer_from_gguf(tiny_tokenizer_md()).backend
    bos, eos = "<|im_start|>", "<|im_end|>"
    single = {"bos": f"{bos} $A", "eos": f"$A {eos}", "bos+eos": f"{bos} $A {eos}",
              "none": "$A"}[adds]
    backend.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(bos, 1), (eos, 2)])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos,
                                              eos_token=eos)
    hf.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(  # (stale flags are ignored)
        json.loads((tmp_path / "tokenizer_config.json").read_text())
        | {"add_bos_token": adds == "none", "add_eos_token": adds == "none"}))
    want = transformers.AutoTokenizer.from_pretrained(tmp_path)("he", add_special_tokens=True)[
        "input_ids"]
    ours = load_tokenizer(tmp_path)
    assert ours.encode("he", add_special_tokens=True) == want
    assert (ours.add_bos_token, ours.add_eos_token) == (want[0] == 1, want[-1] == 2)
    md = tokenizer_metadata(ours, ours.vocab_size)
    assert tokenizer_from_gguf(md).encode("he", add_special_tokens=True) == want


def test_added_tokens_only_in_the_config_are_added_like_transformers(tmp_path):
    """tokenizer_config.json's added_tokens_decoder may list tokens tokenizer.json lacks (a
    config edited by hand or another tool): transformers 5 adds them, in id order, with their
    flags (special, lstrip, rstrip); Ember split them into pieces."""
    transformers = pytest.importorskip("transformers")
    tok = tokenizer_from_gguf(tiny_tokenizer_md())
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    n = tok.vocab_size
    flags = {"normalized": False, "single_word": False}
    cfg["added_tokens_decoder"] |= {
        str(n + 1): {"content": "<tool>", "special": True, "lstrip": True, "rstrip": False,
                     **flags},
        str(n): {"content": "<think>", "special": False, "lstrip": False, "rstrip": True,
                 **flags}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    assert ours.vocab_size == len(theirs) == n + 2
    for text in ["he <think>  12 he <tool>he", "<|im_start|>he\t<tool>\n<think>\n12"]:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip)


def test_named_special_tokens_missing_from_added_tokens_are_matched_whole(tmp_path):
    """A tokenizer.json whose vocabulary has the config's eos / extra special tokens but not as
    added tokens: transformers 5 makes them special added tokens, so the chat template's
    "<|im_end|>" is one token (the eos id) and is skipped when decoding; Ember cut it into
    "<", "|", "im", ... pieces."""
    transformers = pytest.importorskip("transformers")
    tok = tokenizer_from_gguf(tiny_tokenizer_md())
    tok.save_pretrained(tmp_path)
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] == "<|endoftext|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {"0": cfg["added_tokens_decoder"]["0"]}
    cfg.pop("bos_token")
    cfg["extra_special_tokens"] = ["<|im_start|>"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "special_tokens_map.json").unlink()
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    text = "<|im_start|>he<|im_end|>\n<|endoftext|>12"
    ids = ours.encode(text)
    assert ids == theirs(text, add_special_tokens=False)["input_ids"]
    assert ids[:3] == [1, ours.token_to_id("he"), 2] and ours.eos_token_id == 2
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
            ids, skip_special_tokens=skip)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", None])
def test_qwen2_folder_from_gguf_reads_like_transformers(tmp_path, model_type):
    """A qwen2 folder written by ``ember import-gguf`` has no NFC normalizer (GGUF has none);
    transformers 5 reads every model type qwen2 folder with its Qwen2Tokenizer (NFC, Qwen2's
    split), so Ember encoded decomposed accents differently from it on the same folder."""
    transformers = pytest.importorskip("transformers")
    from tests.models.test_gguf_pretokenizers import TRICKY, _trained

    _, md = _trained("qwen2")
    tokenizer_from_gguf(md).save_pretrained(tmp_path)
    if model_type is not None:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with _offline():
        theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    for text in [*TRICKY, "cafe\u0301 na\u0308ive", "\u212b \u1e9b\u0323"]:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"], (model_type, text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("clean", [True, False])
def test_clean_up_tokenization_spaces_decodes_like_transformers(tmp_path, clean):
    """tokenizer_config.json's clean_up_tokenization_spaces: transformers 5 removes the space
    before punctuation and English contractions when decoding a non-BPE tokenizer (a Unigram
    tokenizer.json) and ignores the flag for BPE; Ember ignored it always ("Hello , world ."
    where transformers gives "Hello, world.")."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    transformers = pytest.importorskip("transformers")
    backend = tokenizers.Tokenizer(models.Unigram())
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator([*TEXTS, "Hello , world . don 't do n't ! why ?"] * 5,
                                trainers.UnigramTrainer(vocab_size=150, unk_token="<unk>",
                                                        special_tokens=["<unk>", "</s>"],
                                                        show_progress=False))
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "eos_token": "</s>",
        "clean_up_tokenization_spaces": clean}))
    ours = load_tokenizer(tmp_path)
    ours.save_pretrained(tmp_path / "saved")
    for folder in (tmp_path, tmp_path / "saved"):
        theirs = transformers.AutoTokenizer.from_pretrained(folder)
        texts = ["Hello , world . don 't do n't ! why ?</s>", *TEXTS]
        batch = [theirs(t, add_special_tokens=False)["input_ids"] for t in texts]
        for skip in (False, True):
            want = theirs.batch_decode(batch, skip_special_tokens=skip)
            assert [ours.decode(ids, skip_special_tokens=skip) for ids in batch] == want
            assert ours.decode_batch(batch, skip_special_tokens=skip) == want
    assert ("Hello, world." in want[0]) is clean


def test_clean_up_tokenization_spaces_is_ignored_for_bpe_like_transformers(tmp_path):
    """transformers 5 ignores clean_up_tokenization_spaces for BPE (Llama 3's config sets it):
    the space before punctuation stays."""
    transformers = pytest.importorskip("transformers")
    tokenizer_from_gguf(tiny_tokenizer_md()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        cfg | {"clean_up_tokenization_spaces": True}))
    theirs, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)
    ids = theirs("he , 12 . he", add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids) == "he , 12 . he"


@pytest.mark.parametrize("split", [True, False])
def test_split_special_tokens_encodes_like_transformers(tmp_path, split):
    """tokenizer_config.json's split_special_tokens: transformers encodes a special token
    written in the text as plain text when it is true; Ember matched it as the token."""
    transformers = pytest.importorskip("transformers")
    tokenizer_from_gguf(tiny_tokenizer_md()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        cfg | {"split_special_tokens": split}))
    ours = load_tokenizer(tmp_path)
    ours.save_pretrained(tmp_path / "saved")
    text = "<|im_start|>he<|im_end|>\n12"
    for folder in (tmp_path, tmp_path / "saved"):
        theirs = transformers.AutoTokenizer.from_pretrained(folder)
        want = theirs(text, add_special_tokens=False)["input_ids"]
        assert load_tokenizer(folder).encode(text) == want
        assert (ours.token_to_id("<|im_start|>") in want) is not split


def test_encode_batch_refuses_a_single_text(ours):
    """encode_batch("abc") encoded each character as a text of its own (a str is a sequence),
    where transformers' batch encoding takes one str as one text; a non-str entry failed deep
    in tokenizers."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=ours.backend)
    texts = ["Hello world", "", "12345"]
    assert ours.encode_batch(texts) == hf(texts, add_special_tokens=False)["input_ids"]
    for bad in ("Hello", ["a", None], ("a", 1)):
        with pytest.raises(EmberError, match="list of str"):
            ours.encode_batch(bad)
