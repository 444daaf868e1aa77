"""ember generate --stream / --system / --top-k and ember chat on a tiny random chat model; the
oracle is generate_ids on conversations rendered with the chat template directly."""

from __future__ import annotations

import io

import pytest

from ember import __version__
from ember.engine.cli import main
from ember.engine.data import DataConfig, render_chat, render_prompt
from ember.models.config import ModelConfig
from ember.models.generate import generate_ids
from ember.models.loading import load_pretrained, save_pretrained
from ember.models.tokenizer import Tokenizer
from ember.models.transformer import Transformer
from tests.engine.test_formats import CHATML, chat_backend

MAX_NEW = 6


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat") / "model"
    tok = Tokenizer(chat_backend(), eos_token="<|im_end|>", pad_token="<pad>",
                    chat_template=CHATML)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    save_pretrained(Transformer(cfg).init_weights(std=0.3, seed=0), folder, tok)
    return folder


def _answer(folder, messages, **sampling) -> str:
    """The oracle: the template rendered here, generate_ids, decode."""
    model, tok = load_pretrained(folder, "float32", "cpu")
    model.eval()
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text)
    out = generate_ids(model, [ids], max_new_tokens=MAX_NEW, eos_token_ids=[tok.eos_token_id],
                       pad_token_id=tok.pad_token_id, **sampling)[0]
    return tok.decode(out, skip_special_tokens=True)


def _run(capsys, argv, stdin: str | None = None, monkeypatch=None) -> str:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_stream_prints_what_generate_prints(chat_model, capsys):
    args = ["generate", str(chat_model), "--prompt", "red dog", "--prompt", "a blue cat",
            "--max-new-tokens", str(MAX_NEW)]
    plain, streamed = _run(capsys, args), _run(capsys, [*args, "--stream"])
    assert streamed == plain
    first = plain.split("--- 1\n")[0].removeprefix("--- 0\n").removesuffix("\n")
    assert first == _answer(chat_model, [{"role": "user", "content": "red dog"}])


def test_system_and_top_k(chat_model, capsys):
    sys_msg = {"role": "system", "content": "Answer in one word."}
    out = _run(capsys, ["generate", str(chat_model), "--prompt", "red dog", "--system",
                        sys_msg["content"], "--max-new-tokens", str(MAX_NEW)])
    assert out == _answer(chat_model, [sys_msg, {"role": "user", "content": "red dog"}]) + "\n"
    out = _run(capsys, ["generate", str(chat_model), "--prompt", "red dog", "--temperature",
                        "1.0", "--top-k", "1", "--seed", "3", "--max-new-tokens", str(MAX_NEW)])
    # top-k 1 is greedy whatever the temperature
    assert out == _answer(chat_model, [{"role": "user", "content": "red dog"}]) + "\n"


def test_chat_keeps_the_conversation(chat_model, capsys, monkeypatch):
    out = _run(capsys, ["chat", str(chat_model), "--max-new-tokens", str(MAX_NEW)],
               "red dog\n\nand a cat?\n/reset\nred dog\n/exit\nnever read\n", monkeypatch)
    a1, a2, a3 = out.split("\n")[:3]
    assert out.count("\n") == 3
    u1, u2 = {"role": "user", "content": "red dog"}, {"role": "user", "content": "and a cat?"}
    assert a1 == _answer(chat_model, [u1])
    assert a2 == _answer(chat_model, [u1, {"role": "assistant", "content": a1}, u2])
    assert a3 == a1  # /reset forgot the first exchange


def test_chat_reads_a_bom_and_crlf_input_as_plain(chat_model, capsys, monkeypatch):
    """Standard input from a file saved with a UTF-8 BOM and CRLF line ends: the BOM is not
    part of the first message (was: "\\ufeff/exit" answered as a message, not a command)."""
    argv = ["chat", str(chat_model), "--max-new-tokens", str(MAX_NEW)]
    plain = _run(capsys, argv, "red dog\n/exit\n", monkeypatch)
    assert _run(capsys, argv, "\ufeffred dog\r\n/exit\r\n", monkeypatch) == plain
    assert _run(capsys, argv, "\ufeff/exit\r\nred dog\r\n", monkeypatch) == ""

def test_render_chat_puts_the_run_system_prompt_first(chat_model):
    _, tok = load_pretrained(chat_model, "float32", "cpu")
    cfg = DataConfig(system_prompt="S")
    msgs = [{"role": "user", "content": "u"}]
    want = tok.encode(tok.apply_chat_template([{"role": "system", "content": "S"}, *msgs],
                                              add_generation_prompt=True, tokenize=False))
    assert render_chat(tok, cfg, msgs) == want == render_prompt(tok, DataConfig(), "u", "S")
    own = [{"role": "system", "content": "mine"}, *msgs]
    assert render_chat(tok, cfg, own) == tok.encode(tok.apply_chat_template(
        own, add_generation_prompt=True, tokenize=False))


def test_errors_and_version(chat_model, capsys):
    assert main(["generate", str(chat_model), "--raw", "--prompt", "x", "--system", "s"]) == 2
    assert "system prompt needs a chat template" in capsys.readouterr().err
    # a prompt with no room for --max-new-tokens says what to lower (it only said it exceeds)
    assert main(["generate", str(chat_model), "--prompt", "x", "--max-new-tokens", "600"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "exceeds the model's context of 512 tokens; lower max_new_tokens (--max-new-tokens) or "
        "shorten the prompt")
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"ember {__version__}"


def test_config_prints_every_setting_explained(capsys, tmp_path):
    from ember.engine.config import TrainConfig, from_dict, load_config, parse_toml

    assert main(["config", "quickstart", "--set", "lora.rank=8"]) == 0
    text = capsys.readouterr().out
    assert from_dict(TrainConfig, parse_toml(text, "out")) == load_config(
        "quickstart", ["lora.rank=8"])  # a valid config that loads back to the same settings
    assert "\n[lora]\nrank = 8  # " in text
    assert '# run_dir = (unset)  # None: runs/<name>' in text  # unset keys, commented out
    assert 'method = "lora"  # "lora" (adapters only) | "full"' in text  # the field's comment
    assert main(["config", str(tmp_path / "missing.toml")]) == 2


def test_generate_with_a_model_that_has_no_eos(chat_model, capsys, tmp_path):
    """A base model whose folder names no eos token anywhere (tokenizer config, generation and
    model config): ember generate runs max_new_tokens tokens like transformers' generate (was a
    TypeError from an eos id of None). Oracle: transformers on the same folder."""
    import json
    import shutil

    import torch

    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "no_eos"
    shutil.copytree(chat_model, folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "config.json"):
        path = folder / name
        if path.is_file():
            cfg = json.loads(path.read_text())
            for key in ("eos_token", "pad_token", "eos_token_id", "pad_token_id"):
                cfg.pop(key, None)
            path.write_text(json.dumps(cfg))
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf_tok.eos_token is None and hf_tok.pad_token is None
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([hf_tok("red dog", add_special_tokens=True)["input_ids"]])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                      do_sample=False)[0, ids.shape[1]:]
    assert len(out) == MAX_NEW
    want = hf_tok.decode(out, skip_special_tokens=True)
    got = _run(capsys, ["generate", str(folder), "--raw", "--prompt", "red dog",
                        "--max-new-tokens", str(MAX_NEW)])
    assert got == want + "\n"


def test_min_p_and_repetition_penalty_flags(chat_model, capsys):
    """--repetition-penalty reaches generation (the oracle: generate_ids with the penalty, on
    the conversation rendered here); --min-p 1 keeps only the best token: greedy."""
    model, tok = load_pretrained(chat_model, "float32", "cpu")
    msgs = [{"role": "user", "content": "red dog"}]
    ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
    want = tok.decode(generate_ids(model.eval(), [ids], max_new_tokens=MAX_NEW,
                                   eos_token_ids=[tok.eos_token_id], repetition_penalty=3.0)[0])
    assert want != _answer(chat_model, msgs)
    out = _run(capsys, ["generate", str(chat_model), "--prompt", "red dog",
                        "--repetition-penalty", "3", "--max-new-tokens", str(MAX_NEW)])
    assert out == want + "\n"
    out = _run(capsys, ["generate", str(chat_model), "--prompt", "red dog", "--temperature",
                        "2", "--min-p", "1", "--seed", "1", "--max-new-tokens", str(MAX_NEW)])
    assert out == _answer(chat_model, msgs) + "\n"


def test_ctrl_c_stops_the_answer_not_the_chat(chat_model, capsys, monkeypatch):
    """Ctrl-C while an answer streams ends that answer (kept as far as it was shown) and the
    chat goes on (it ended the whole session, losing the conversation)."""
    import importlib

    gen_mod = importlib.import_module("ember.models.generate")
    real = gen_mod.generate_ids
    calls = []

    def interrupted_once(model, prompts, **kw):
        calls.append(prompts[0])
        if len(calls) > 1:
            return real(model, prompts, **kw)
        stop = kw["should_stop"]
        out = real(model, prompts, **{**kw, "should_stop": None, "max_new_tokens": 3})[0]
        for n in range(1, len(out) + 1):
            stop(0, out[:n])  # stream the first tokens...
        raise KeyboardInterrupt  # ...then the user presses Ctrl-C

    monkeypatch.setattr(gen_mod, "generate_ids", interrupted_once)
    out = _run(capsys, ["chat", str(chat_model), "--max-new-tokens", str(MAX_NEW)],
               "red dog\nand a cat?\n", monkeypatch)
    a1, a2 = out.split("\n")[:2]
    u1, u2 = {"role": "user", "content": "red dog"}, {"role": "user", "content": "and a cat?"}
    _, tok = load_pretrained(chat_model, "float32", "cpu")
    first = tok.decode(real(load_pretrained(chat_model, "float32", "cpu")[0].eval(), [calls[0]],
                            max_new_tokens=3, eos_token_ids=[tok.eos_token_id])[0])
    assert a1 == first.rstrip("\ufffd")  # the shown part of the interrupted answer
    assert a2 == _answer(chat_model, [u1, {"role": "assistant", "content": a1}, u2])


def test_chat_refuses_bad_sampling_before_the_first_message(chat_model, capsys, monkeypatch):
    """A setting transformers' processors refuse (a negative temperature) ends ember chat at
    once with the reason; it was reported as a failed answer for every message ('... /reset
    starts a new conversation'), the chat reading on."""
    lp = pytest.importorskip("transformers.generation.logits_process")
    with pytest.raises(ValueError):
        lp.TemperatureLogitsWarper(-1.0)
    monkeypatch.setattr("sys.stdin", io.StringIO("red dog\nand a cat?\n"))
    capsys.readouterr()
    assert main(["chat", str(chat_model), "--temperature", "-1"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("temperature must be >= 0") == 1
    assert "/reset" not in out.err


def test_a_seed_beyond_64_bits_is_one_clean_line(chat_model, capsys):
    """--seed 2**64 was torch's 'Overflow when unpacking long long' traceback out of ember
    generate; every seed torch.Generator takes (the oracle) still works."""
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="Overflow"):
        torch.Generator().manual_seed(2**64)
    argv = ["generate", str(chat_model), "--prompt", "x", "--max-new-tokens", "2",
            "--temperature", "1"]
    for seed in (2**64, -2**63 - 1):
        capsys.readouterr()
        assert main([*argv, "--seed", str(seed)]) == 2
        err = capsys.readouterr().err
        assert err == f"ember: error: --seed must be a 64-bit integer (torch.Generator's " \
                      f"seed), got {seed}\n"
    for seed in (2**64 - 1, -2**63):
        torch.Generator().manual_seed(seed)
        assert main([*argv, "--seed", str(seed)]) == 0


def test_multi_turn_chat_equals_transformers_on_the_llama_3_1_template(tmp_path, capsys,
                                                                        monkeypatch):
    """ember chat (piped lines, --system, /reset) against transformers: each turn's prompt is
    ``apply_chat_template`` of the history with the earlier answers as decoded, and each answer
    is transformers' greedy ``generate`` continuation (stopping at generation_config.json's
    eos list) decoded without special tokens."""
    import importlib
    import warnings

    import torch
    import transformers

    from ember.models.generate import generate_ids as real_generate_ids
    from tests.engine.test_chat_parity import LLAMA31
    from tests.engine.test_formats import chat_backend

    backend = chat_backend()
    backend.add_special_tokens(["<|begin_of_text|>", "<|start_header_id|>",
                                "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"])
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        chat_template=LLAMA31)
    stops = hf_tok.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=hf_tok.bos_token_id, eos_token_id=stops)).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp_path)
    hf_tok.save_pretrained(tmp_path)

    lines = ["red dog", "and a cat?", "/reset", "a blue cat"]
    system = [{"role": "system", "content": "Answer in one word."}]
    history, prompts, answers = [], [], []
    for line in lines:
        if line == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": line})
        ids = hf_tok.apply_chat_template(system + history, add_generation_prompt=True,
                                         return_dict=False)
        t = torch.tensor([ids])
        new = hf.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=MAX_NEW,
                          do_sample=False)[0, len(ids):]
        answers.append(hf_tok.decode(new, skip_special_tokens=True))
        prompts.append(ids)
        history.append({"role": "assistant", "content": answers[-1]})

    fed = []

    def spy(model, ids, **kw):
        fed.append(list(ids[0]))
        return real_generate_ids(model, ids, **kw)

    # (ember.models.generate is also the name of the function the package exports)
    monkeypatch.setattr(importlib.import_module("ember.models.generate"), "generate_ids", spy)
    out = _run(capsys, ["chat", str(tmp_path), "--system", system[0]["content"], "--device",
                        "cpu", "--max-new-tokens", str(MAX_NEW)], "\n".join(lines) + "\n",
               monkeypatch)
    assert fed == prompts
    assert out == "".join(a + "\n" for a in answers)


def test_bytes_that_are_not_utf8_are_one_clear_error(chat_model, capsys, monkeypatch):
    """A line of standard input (or a --prompt) with bytes that are not UTF-8 reaches Python as
    lone surrogates (surrogateescape), which the tokenizer refuses with a bare TypeError
    (transformers' tokenizer too: checked): the chat died with a traceback. Now that line is one
    error and the chat goes on as if it had not been typed."""
    import transformers

    bad = b"\xff\xfe dog".decode("utf-8", "surrogateescape")
    hf_tok = transformers.AutoTokenizer.from_pretrained(chat_model)
    with pytest.raises(TypeError):
        hf_tok.apply_chat_template([{"role": "user", "content": bad}], tokenize=True)
    out = _run(capsys, ["chat", str(chat_model), "--max-new-tokens", str(MAX_NEW)],
               f"red dog\n{bad}\nand a cat?\n", monkeypatch)
    a1, a2 = out.split("\n")[:2]
    u1, u2 = {"role": "user", "content": "red dog"}, {"role": "user", "content": "and a cat?"}
    assert out.count("\n") == 2 and a1 == _answer(chat_model, [u1])
    assert a2 == _answer(chat_model, [u1, {"role": "assistant", "content": a1}, u2])
    assert main(["generate", str(chat_model), "--prompt", "ok", "--prompt", bad]) == 2
    err = capsys.readouterr().err
    assert "--prompt 2 is not valid UTF-8" in err and "Traceback" not in err


def test_an_empty_raw_prompt_generates_from_the_tokenizer_s_bos_as_transformers(tmp_path,
                                                                                 capsys):
    """``--raw --prompt ""`` with a tokenizer whose post-processor adds BOS: transformers
    encodes "" as [BOS] and generates from it (a base model's unconditional samples); Ember
    encoded nothing and refused the prompt as empty."""
    import torch
    from tokenizers import processors

    transformers = pytest.importorskip("transformers")
    backend = chat_backend()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    tok = Tokenizer(backend, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>")
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=64,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    save_pretrained(Transformer(cfg).init_weights(std=0.3, seed=0), tmp_path, tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([hf_tok("")["input_ids"]])
    assert ids.tolist() == [[hf_tok.bos_token_id]]
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                      do_sample=False)[0, 1:]
    got = _run(capsys, ["generate", str(tmp_path), "--raw", "--prompt", "", "--device", "cpu",
                        "--max-new-tokens", str(MAX_NEW)])
    assert got == hf_tok.decode(out, skip_special_tokens=True) + "\n"


def test_a_seed_samples_the_same_text_with_and_without_stream(chat_model, capsys):
    """--seed with --temperature: the batch path sampled all prompts from one generator while
    --stream sampled each alone from a fresh one, so the same seed printed other text. Each
    prompt now has its own generator (seed + its index), whatever is generated beside it."""
    prompts = ["red dog", "a blue cat", "and a cat?"]
    args = ["generate", str(chat_model), "--temperature", "1", "--top-k", "0",
            "--max-new-tokens", str(MAX_NEW)]
    for p in prompts:
        args += ["--prompt", p]
    plain = _run(capsys, [*args, "--seed", "1"])
    streamed = _run(capsys, [*args, "--seed", "1", "--stream"])
    assert streamed == plain
    for i, p in enumerate(prompts):  # prompt i alone, as --seed 1+i samples it
        alone = _run(capsys, ["generate", str(chat_model), "--prompt", p, "--temperature", "1",
                              "--top-k", "0", "--seed", str(1 + i), "--max-new-tokens",
                              str(MAX_NEW)])
        assert f"--- {i}\n{alone}" in plain
    assert plain != _run(capsys, [*args, "--seed", "2"])
