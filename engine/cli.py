"""The ``ember`` command line.

    ember train CONFIG.toml|RECIPE|RUN_DIR [--set key=value ...] [--resume]
    ember eval RUN_DIR|MODEL [--data FILE] [--adapter DIR] [--metrics exact_match,...]
        (a DPO / ORPO / SimPO / KTO run: its validation scores on FILE, against its reference)
    ember generate RUN_DIR|MODEL --prompt TEXT [--prompt TEXT ...] [--adapter DIR] [--stream]
    ember chat RUN_DIR|MODEL [--system TEXT]      (one message per line on standard input)
    ember export RUN_DIR (--adapter OUT | --merged OUT)
    ember import-gguf FILE.gguf OUT_DIR
    ember config [CONFIG|RECIPE|RUN_DIR] [--set key=value ...]   (every setting, explained)
    ember recipes | ember models

Errors the user can fix print one message and exit with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ember import EmberError

EXIT_USER_ERROR = 2


def _cmd_train(a) -> None:
    from ember.engine.config import load_config
    from ember.engine.distributed import shutdown
    from ember.engine.trainer import train

    cfg = load_config(a.config, a.set or [])
    try:
        train(cfg, resume=a.resume)
    except BaseException:
        shutdown()  # leave torchrun's process group at once: the other ranks may be stuck
        raise
    if shutdown(together=True):  # (a no-op for one process)
        # A torchrun process whose run finished and whose files are written ends here, without
        # interpreter shutdown: c10d's gloo teardown there aborted ~4% of finished 2-process runs
        # ('terminate called without an active exception' with no Python frame, exit code -6).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _note(msg: str) -> None:
    print(msg, file=sys.stderr)


def _is_run_dir(path: str) -> bool:
    return (Path(path) / "config.toml").is_file()


def _check_device(device: str | None) -> None:
    """--device: a name torch takes, on a machine that has it (was torch's RuntimeError or
    "Torch not compiled with CUDA enabled" as a traceback; a run directory fell back to the
    CPU without a word)."""
    import re

    import torch

    if device is None:
        return
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", device):
        raise EmberError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device != "cpu" and not torch.cuda.is_available():
        raise EmberError(f"--device {device}: CUDA is not available here (torch "
                         f"{torch.__version__}); use --device cpu, or leave --device out")
    index = int(device.partition(":")[2] or 0)
    if device != "cpu" and index >= torch.cuda.device_count():
        raise EmberError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                         f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def _load(target: str, adapter: str | None, device: str | None, raw: bool = False):
    """(model, tokenizer, DataConfig used to render prompts) for a run directory or a model."""
    import torch

    from ember.engine.data import DataConfig

    _check_device(device)
    if _is_run_dir(target):
        from ember.engine.state import load_run_model

        model, tok, cfg = load_run_model(target, device, echo=_note)
        data_cfg = cfg.data
        if adapter is not None or raw:
            raise EmberError("--adapter / --raw are for a model; a run directory brings its own "
                             "adapter and prompt format")
    else:
        from ember.models.loading import load_pretrained
        from ember.models.lora import load_adapter
        from ember.models.prompt_tuning import is_prompt_adapter, load_prompt_adapter

        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tok = load_pretrained(target, "float32" if dev == "cpu" else "bfloat16", dev)
        if adapter is not None:
            (load_prompt_adapter if is_prompt_adapter(adapter) else load_adapter)(model, adapter)
        data_cfg = DataConfig(use_chat_template=False if raw else None)
    if tok is None:
        raise EmberError(f"{target} has no tokenizer.json")
    model.eval()
    return model, tok, data_cfg


class _Stream:
    """Prints a row's text as its tokens arrive (``generate_ids``' ``should_stop`` hook): the
    whole prefix is decoded each time, and a tail that may be an incomplete UTF-8 character
    (decoded as U+FFFD) waits for the next token."""

    def __init__(self, tok):
        self.tok, self.shown = tok, ""

    def __call__(self, row: int, ids: list[int]) -> bool:
        text = self.tok.decode(ids, skip_special_tokens=True)
        if not text.endswith("\ufffd") and text.startswith(self.shown):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text
        return False

    def finish(self, ids: list[int]) -> str:
        text = self.tok.decode(ids, skip_special_tokens=True)
        print(text[len(self.shown):] if text.startswith(self.shown) else "\n" + text, flush=True)
        self.shown = ""
        return text


def _generator(model, tok, a):
    """``run(prompt_ids, stream) -> new ids per prompt`` with the command line's sampling."""
    from ember.models.generate import check_sampling, generate_ids
    from ember.models.heads import is_classifier
    from ember.models.tokenizer import generation_ids

    # before the first message: ember chat reports a failed answer and reads the next line
    if a.max_new_tokens < 1:  # 0 printed nothing (transformers' generate refuses it too)
        raise EmberError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    check_sampling(a.max_new_tokens, a.temperature, a.top_p, a.top_k, a.min_p,
                   a.repetition_penalty)
    if is_classifier(model):
        raise EmberError(f"{a.model} is a sequence classifier (labels {list(model.cfg.labels)}): "
                         "it has no LM head to generate with; score text with ember eval")
    eos, pad = generation_ids(tok)

    def run(ids: list[list[int]], stream: _Stream | None = None) -> list[list[int]]:
        return generate_ids(model, ids, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                            top_p=a.top_p, top_k=a.top_k, seed=a.seed, eos_token_ids=eos,
                            pad_token_id=pad, should_stop=stream, min_p=a.min_p,
                            repetition_penalty=a.repetition_penalty)

    return run


def _cmd_generate(a) -> None:
    from ember.engine.data import render_prompt

    model, tok, data_cfg = _load(a.model, a.adapter, a.device, a.raw)
    run = _generator(model, tok, a)
    ids = [render_prompt(tok, data_cfg, p, a.system) for p in a.prompt]
    if a.stream:
        for i, p in enumerate(ids):  # one prompt at a time, each printed as it is generated
            if len(ids) > 1:
                print(f"--- {i}")
            stream = _Stream(tok)
            stream.finish(run([p], stream)[0])
        return
    for i, gen in enumerate(run(ids)):
        if len(ids) > 1:
            print(f"--- {i}")
        print(tok.decode(gen, skip_special_tokens=True))


def _cmd_chat(a) -> None:
    from ember.engine.data import render_chat

    model, tok, data_cfg = _load(a.model, a.adapter, a.device)
    run = _generator(model, tok, a)
    system = [{"role": "system", "content": a.system}] if a.system is not None else []
    messages: list[dict] = []
    render_chat(tok, data_cfg, [*system, {"role": "user", "content": "hi"}])  # fails early
    interactive = sys.stdin.isatty()
    if interactive:
        print("ember chat: /reset starts over, /exit (or Ctrl-D) quits", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages.clear()
            continue
        if not text:
            continue
        turn = [*messages, {"role": "user", "content": text}]
        stream = _Stream(tok)
        try:
            ids = render_chat(tok, data_cfg, [*system, *turn])
            if interactive:
                print("assistant> ", end="", flush=True)
            answer = stream.finish(run([ids], stream)[0])
        except EmberError as e:  # e.g. the conversation outgrew the context: say so, keep going
            print(f"ember: error: {e} (/reset starts a new conversation)", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the conversation
            print(flush=True)
            print("ember: answer interrupted (Ctrl-D or /exit quits)", file=sys.stderr)
            answer = stream.shown  # what was printed is what the conversation goes on from
        messages = [*turn, {"role": "assistant", "content": answer}]


def _cmd_eval(a) -> None:
    import torch

    from ember.engine.choices import choice_metrics, is_choice_file, load_choices, score_choices
    from ember.engine.data import load_examples
    from ember.engine.evaluation import generation_eval, validation_loss
    from ember.engine.metrics import perplexity
    from ember.engine.runtime import autocast_for

    for name in ("max_examples", "batch_size", "max_new_tokens"):
        v = getattr(a, name)
        if v is not None and v < 1:  # a negative --max-examples silently dropped examples
            raise EmberError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    model, tok, data_cfg = _load(a.model, a.adapter, a.device, a.raw)
    data = a.data or data_cfg.test or data_cfg.validation
    if isinstance(data, tuple):
        raise EmberError(f"the run has {len(data)} validation files and no test file; choose "
                         "one with --data FILE.jsonl")
    if data is None:
        raise EmberError("give the examples to score with --data FILE.jsonl")
    from ember.models.heads import is_classifier

    if is_classifier(model):
        from ember.engine.classification import eval_classifier
        from ember.engine.reward import eval_one_output

        field, kind = "label", "regression" if model.cfg.problem_type else "reward"
        center = 0.0
        if _is_run_dir(a.model):
            from ember.engine.config import load_config

            head = load_config(a.model).head
            field, center = head.label_field, head.center_rewards_coefficient
        if len(model.cfg.labels) == 1:  # a reward or regression head
            scores, report = eval_one_output(model, tok, data, data_cfg, kind, a.metrics, field,
                                             a.max_examples, center)
        else:
            scores, report = eval_classifier(model, tok, data, data_cfg, a.metrics, field,
                                             a.max_examples)
        print(report.summary(), file=sys.stderr)
        print(json.dumps(scores))
        return
    device = str(next(model.parameters()).device)
    precision = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    autocast = autocast_for(device, precision)
    if _is_run_dir(a.model) and not is_choice_file(data):
        scores = _eval_preference_run(a.model, model, tok, data, device, autocast, a)
        if scores is not None:
            print(json.dumps(scores))
            return
    if is_choice_file(data):
        asked = set((a.metrics or "").split(",")) - {""}
        if asked - {"choice_accuracy", "choice_accuracy_norm"}:
            raise EmberError(f"{data} is a multiple-choice file: its metrics are choice_accuracy "
                             f"and choice_accuracy_norm (both reported), not {sorted(asked)}")
        examples, questions, report = load_choices(data, data_cfg, tok)
        print(report.summary(), file=sys.stderr)
        examples, questions = examples[:a.max_examples], questions[:a.max_examples]
        scores = score_choices(model, examples, data_cfg.tokens_per_batch, device, autocast)
        print(json.dumps({"data": str(data), "examples": len(examples),
                          **choice_metrics(scores, questions)}))
        return
    examples, report = load_examples(data, data_cfg, tok)
    print(report.summary(), file=sys.stderr)
    examples = examples[:a.max_examples]  # loss and generation metrics on the same examples
    loss, _ = validation_loss(model, examples, max(data_cfg.tokens_per_batch,
                                                   max(len(e) for e in examples)), device,
                              autocast)
    scores = {"loss": loss, "perplexity": perplexity(loss)}
    metrics = [m for m in (a.metrics or "").split(",") if m]
    if not metrics and _is_run_dir(a.model):  # the metrics the run was evaluated with
        from ember.engine.config import load_config

        metrics = list(load_config(a.model).eval.metrics)
    metrics = metrics or ["exact_match"]
    if any(e.reference is not None for e in examples):
        res = generation_eval(model, tok, examples, metrics, max_new_tokens=a.max_new_tokens,
                              batch_size=a.batch_size, autocast=autocast)
        scores.update(res.scores)
    print(json.dumps({"data": str(data), "examples": len(examples), **scores}))


def _eval_preference_run(run_dir: str, model, tok, data: str, device: str, autocast, a
                         ) -> dict | None:
    """A DPO / ORPO / SimPO / KTO run's validation scores on ``data`` (its own line format and
    metrics, against its reference, as its evaluations during training); None for other runs
    and for a file of plain SFT lines (scored as any run's test split, as ``data.test`` takes)."""
    from dataclasses import replace

    from ember.engine.choices import first_record
    from ember.engine.config import load_config
    from ember.engine.distributed import DistInfo
    from ember.engine.objectives import make_objective
    from ember.engine.runtime import build_model, resolve

    cfg = load_config(run_dir)
    if cfg.objective not in ("dpo", "orpo", "simpo", "kto"):
        return None
    if not {"label", "chosen", "rejected"} & (first_record(data) or {}).keys():
        return None  # plain SFT lines, as the run's data.test takes them: loss and metrics
    cfg = resolve(cfg.replace(device=device))
    if a.metrics:
        raise EmberError(f"{run_dir} is an objective = \"{cfg.objective}\" run: ember eval "
                         "reports its validation scores (reward accuracy, margins, ...); drop "
                         "--metrics")
    obj = make_objective(cfg, DistInfo())
    if getattr(obj, "snapshot", False):  # a continued adapter: the reference is it as loaded
        start, _ = build_model(cfg, device)
        obj.check_model(start, tok)
        del start
    data_cfg = replace(cfg.data, train=(str(data),), mix=(), validation=None, val_fraction=0.0,
                       test=None)
    ds = obj.load_datasets(data_cfg, tok)
    obj.check_data(ds)
    print(ds.summary(), file=sys.stderr)
    examples = ds.train[:a.max_examples]
    scores = obj.val_scores(model, examples, max(data_cfg.tokens_per_batch,
                                                 max(len(e) for e in examples)),
                            device, autocast, None)
    return {"data": str(data), "examples": len(examples), **scores}


def _cmd_export(a) -> None:
    import torch

    from ember.engine.stages import base_of
    from ember.engine.state import load_run_model, multimodal_base
    from ember.models.loading import load_pretrained, save_pretrained
    from ember.models.lora import lora_modules, merge_lora, save_adapter
    from ember.models.nf4 import is_quantized
    from ember.models.prompt_tuning import prompt_embedding, save_prompt_adapter

    if a.gguf:  # before loading the model: a typo costs nothing
        from ember.models.gguf_export import GGUF_TYPES

        if a.gguf_type.lower() not in GGUF_TYPES:
            raise EmberError(f"--gguf-type {a.gguf_type!r} is not one of "
                             f"{', '.join(GGUF_TYPES)} (llama.cpp's names, any case)")
        if Path(a.gguf).is_dir():  # was an IsADirectoryError after the merge and quantization
            raise EmberError(f"--gguf {a.gguf} is a folder; give the file to write, e.g. "
                             f"{Path(a.gguf) / 'model.gguf'}")
    if a.merged and Path(a.merged).exists() and not Path(a.merged).is_dir():
        raise EmberError(f"--merged {a.merged} is a file; give the folder to write the model in")

    if _is_run_dir(a.run_dir):
        model, tok, cfg = load_run_model(a.run_dir, "cpu", echo=_note)
    elif a.adapter:
        raise EmberError(f"{a.run_dir} is not a run directory (no config.toml)")
    else:  # a model (folder, .gguf, built-in name) converted as it is
        (model, tok), cfg = load_pretrained(a.run_dir), None
    if prompt_embedding(model) is not None:
        if not a.adapter:
            raise EmberError(f"{a.run_dir} is a prompt tuning run: its virtual tokens are inputs, "
                             "not weights to merge; use --adapter OUT (a PEFT adapter)")
        out = save_prompt_adapter(model, a.adapter, base_model_name_or_path=base_of(cfg))
    elif a.adapter:
        if not lora_modules(model):
            raise EmberError(f"{a.run_dir} is a full fine-tuning run: it has no adapter; use "
                             "--merged OUT to export the model")
        out = save_adapter(model, a.adapter, base_model_name_or_path=base_of(cfg))
    elif a.gguf:
        from ember.models.gguf_export import save_gguf

        # merged in fp32 (a QLoRA base dequantized into it): the GGUF type is the only rounding
        if lora_modules(model):
            merge_lora(model, torch.float32 if is_quantized(model) else None)
        out = save_gguf(model, tok, a.gguf, dtype=a.gguf_type)
    else:
        # A QLoRA run's 4-bit base is dequantized: the merged model is a plain bf16 HF model.
        nf4 = is_quantized(model)
        bf16 = torch.bfloat16 if nf4 else None
        if lora_modules(model):
            merge_lora(model, bf16)
        out = save_pretrained(model, a.merged, tok, dtype=bf16, dequantize=nf4,
                              multimodal_base=multimodal_base(model, cfg) if cfg else None)
    print(f"wrote {out}")


def _cmd_import_gguf(a) -> None:
    from ember.models.gguf import import_gguf
    from ember.models.hub import is_gguf_file
    from ember.models.loading import resolve_dtype

    src = Path(a.file)
    if not is_gguf_file(src):
        raise EmberError(f"{src} is not a .gguf file")
    print(f"wrote {import_gguf(src, a.out_dir, resolve_dtype(a.dtype))}")


def _cmd_recipes(a) -> None:
    from ember.engine.config import recipe_names

    print("\n".join(recipe_names()))


def _cmd_config(a) -> None:
    from ember.engine.config import load_config
    from ember.engine.config_doc import annotated_toml

    print(annotated_toml(load_config(a.config, a.set or [])), end="")


def _cmd_models(a) -> None:
    from ember.models.hub import BUILTIN_MODELS

    for m in BUILTIN_MODELS.values():
        print(f"{m.name}: {m.description}")


def build_parser() -> argparse.ArgumentParser:
    from ember import __version__

    ap = argparse.ArgumentParser(prog="ember", description="Fine-tune language models.")
    ap.add_argument("--version", action="version", version=f"ember {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train from a TOML config, a recipe or a run directory")
    p.add_argument("config", help="CONFIG.toml, a recipe name (ember recipes) or a RUN_DIR")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set lora.rank=8 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.set_defaults(fn=_cmd_train)

    def model_args(p, what: str, raw: bool = True):
        p.add_argument("model", metavar="RUN_DIR|MODEL",
                       help=f"a run directory, or a model (built-in name, HF folder, .gguf) {what}")
        p.add_argument("--adapter", help="a PEFT adapter folder (LoRA or prompt tuning) to "
                                         "load onto MODEL")
        p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
        p.add_argument("--max-new-tokens", type=int, default=128)
        if not raw:
            return
        p.add_argument("--raw", action="store_true",
                       help="MODEL: prompts without the chat template (as data.use_chat_template "
                            "= false trained them)")

    def sampling_args(p):
        p.add_argument("--system", help="system prompt (chat templates; replaces the run's "
                                        "data.system_prompt)")
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
        p.add_argument("--min-p", type=float, default=0.0,
                       help="drop tokens less likely than this times the best one (0 = off)")
        p.add_argument("--repetition-penalty", type=float, default=1.0,
                       help="transformers' repetition penalty on prompt and output (1 = off)")
        p.add_argument("--seed", type=int, default=None)

    p = sub.add_parser("generate", help="complete prompts")
    model_args(p, "to generate with")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    sampling_args(p)
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.set_defaults(fn=_cmd_generate)

    p = sub.add_parser("chat", help="talk to a chat model: one message per line on standard "
                                    "input, answers streamed")
    model_args(p, "to chat with", raw=False)
    sampling_args(p)
    p.set_defaults(fn=_cmd_chat)

    p = sub.add_parser("eval", help="loss, perplexity and generation metrics on a JSONL file; "
                                    "multiple-choice accuracy on question/choices/answer lines")
    model_args(p, "to evaluate")
    p.add_argument("--data", help="JSONL examples (default: the run's test split)")
    p.add_argument("--metrics", help="comma-separated: exact_match, accuracy, f1, macro_f1, "
                                     "json_match, field_accuracy (default: a run's "
                                     "eval.metrics, else exact_match; a classifier: "
                                     "accuracy,macro_f1; a reward head: accuracy,margin; a "
                                     "regression head: mse,rmse,pearson)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="prompts completed at once for generation metrics (default 64)")
    p.add_argument("--max-examples", type=int, default=None, metavar="N",
                   help="score only the file's first N examples: loss, perplexity and "
                        "generation metrics alike (as choice, classifier and preference-run "
                        "scores)")
    p.set_defaults(fn=_cmd_eval)

    p = sub.add_parser("export", help="write a run's adapter (PEFT), merged model (HF) or GGUF "
                                      "file (llama.cpp, Ollama)")
    p.add_argument("run_dir", metavar="RUN_DIR|MODEL",
                   help="a run directory, or a model (built-in name, HF folder, .gguf) for "
                        "--merged / --gguf")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--adapter", metavar="OUT", help="PEFT adapter folder")
    g.add_argument("--merged", metavar="OUT", help="HF model folder with the adapter merged")
    g.add_argument("--gguf", metavar="OUT.gguf",
                   help="GGUF file for llama.cpp / Ollama / LM Studio, adapter merged")
    p.add_argument("--gguf-type", default="f16", metavar="TYPE",
                   help="f16 (default), bf16, f32, or a llama-quantize type, any case: Q8_0, "
                        "Q4_0, Q4_1, Q5_0, Q5_1, Q4_K_S, Q4_K_M (= Q4_K), Q5_K_S, "
                        "Q5_K_M (= Q5_K), Q6_K (per-tensor types as llama-quantize picks them; "
                        "norms stay f32)")
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser("import-gguf", help="convert a .gguf file to an HF model folder")
    p.add_argument("file")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.set_defaults(fn=_cmd_import_gguf)

    p = sub.add_parser("config", help="print every setting of a config (defaults filled in, "
                                      "each key with its meaning) as TOML")
    p.add_argument("config", nargs="?", default="quickstart",
                   help="CONFIG.toml, a recipe name or a RUN_DIR (default: quickstart)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a value")
    p.set_defaults(fn=_cmd_config)

    sub.add_parser("recipes", help="list the built-in recipes").set_defaults(fn=_cmd_recipes)
    sub.add_parser("models", help="list the built-in models").set_defaults(fn=_cmd_models)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except EmberError as e:
        print(f"ember: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("ember: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a path the user gave: missing folder, no permission, disk full
        if isinstance(e, (ConnectionError, TimeoutError)) or e.errno is None:
            raise
        print(f"ember: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
