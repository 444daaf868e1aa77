"""transformers' generation settings as Ember reads them: the sampling knobs' checks, the values
a model's generation_config.json gives those not passed (as transformers' ``generate()`` takes
them), the settings of that file Ember does not apply, and the hints for transformers' options
that ``generate()`` does not take."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ember import EmberError

if TYPE_CHECKING:
    from ember.models.transformer import Transformer


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                   min_p: float = 0.0, repetition_penalty: float = 1.0, min_new_tokens: int = 0,
                   no_repeat_ngram_size: int = 0, min_length: int = 0, typical_p: float = 1.0,
                   epsilon_cutoff: float = 0.0, eta_cutoff: float = 0.0,
                   top_h: float = 0.0) -> None:
    """EmberError naming the first invalid setting of ``generate_ids``' sampling knobs."""
    for name, v in (("max_new_tokens", max_new_tokens), ("min_new_tokens", min_new_tokens),
                    ("no_repeat_ngram_size", no_repeat_ngram_size), ("min_length", min_length)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise EmberError(f"{name} must be an int >= 0 (0 = off), got {v!r}")
    for name, v in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p),
                    ("repetition_penalty", repetition_penalty), ("typical_p", typical_p),
                    ("epsilon_cutoff", epsilon_cutoff), ("eta_cutoff", eta_cutoff),
                    ("top_h", top_h)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v):
            raise EmberError(f"{name} must be a number, got {v!r}")
    if temperature < 0:
        raise EmberError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 <= top_p <= 1:  # 0 keeps only the most likely token, as transformers' TopP does
        raise EmberError(f"top_p must be in [0, 1] (1 = off), got {top_p}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise EmberError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not 0 <= min_p <= 1:
        raise EmberError(f"min_p must be in [0, 1] (0 = off), got {min_p}")
    if not repetition_penalty > 0:
        raise EmberError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")
    if not 0 < typical_p <= 1:  # transformers' TypicalLogitsWarper refuses 0
        raise EmberError(f"typical_p must be in (0, 1] (1 = off), got {typical_p}")
    for name, v in (("epsilon_cutoff", epsilon_cutoff), ("eta_cutoff", eta_cutoff)):
        if not 0 <= v < 1:
            raise EmberError(f"{name} must be in [0, 1) (0 = off), got {v}")
    if not 0 <= top_h <= 1:  # transformers' TopHLogitsWarper takes (0, 1]; its off is None
        raise EmberError(f"top_h must be in [0, 1] (0 = off), got {top_h}")


def _ban(default: Any = None) -> Any:
    return field(default=default, metadata={"ban": True})


def _warper(default: float) -> Any:
    return field(default=default, metadata={"warper": True, "sample_next": True})


@dataclass(frozen=True, kw_only=True)
class Knobs:
    """transformers' logits processors and warpers that ``generate_ids`` applies, each at the
    value that leaves it off: the one list of them. ``generate_ids`` takes them as keywords
    (``Knobs.of``), passes the bans to ``token_bans.TokenBans`` (``bans``), and a speculative
    draft needs every processor off (``processors_on``; the warpers act only when sampling)."""

    # processors: they change greedy decoding too
    repetition_penalty: float = 1.0
    min_new_tokens: int = _ban(0)
    min_length: int = _ban(0)
    no_repeat_ngram_size: int = _ban(0)
    bad_words_ids: Sequence[Sequence[int]] | None = _ban()
    suppress_tokens: Sequence[int] | None = _ban()
    begin_suppress_tokens: Sequence[int] | None = _ban()
    forced_eos_token_id: int | Sequence[int] | None = _ban()
    forced_bos_token_id: int | None = _ban()
    sequence_bias: Sequence | Mapping | None = _ban()
    exponential_decay_length_penalty: Sequence | None = _ban()
    renormalize_logits: bool = field(default=False, metadata={"sample_next": True})
    # warpers: sampling only
    top_h: float = _warper(0.0)
    top_k: int = _warper(0)
    top_p: float = _warper(1.0)
    min_p: float = _warper(0.0)
    typical_p: float = _warper(1.0)
    epsilon_cutoff: float = _warper(0.0)
    eta_cutoff: float = _warper(0.0)

    @classmethod
    def of(cls, given: Mapping[str, Any]) -> Knobs:
        """``given`` (None: off) as Knobs; EmberError naming a keyword that is none of them."""
        names = [f.name for f in fields(cls)]
        unknown = [k for k in given if k not in names]
        if unknown:
            raise EmberError(f"generate_ids() does not take {', '.join(map(repr, unknown))} "
                             f"(its logits processors and warpers: {', '.join(names)})")
        return cls(**{k: v for k, v in given.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def sampling(self) -> dict[str, Any]:
        """The keywords of ``sampling.sample_next``."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.metadata.get("sample_next")}

    def bans(self) -> dict[str, Any]:
        """The keywords of ``token_bans.TokenBans``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("ban")}

    def processors_on(self) -> list[str]:
        """The processors set (not the warpers): what changes greedy decoding's tokens."""
        return [f.name for f in fields(self) if not f.metadata.get("warper")
                and getattr(self, f.name) not in (f.default, None, [], ())]


# transformers' generate() options a user coming from it may pass, and what Ember does instead
_HF_HINTS = {
    "do_sample": "sampling is temperature > 0 (temperature = 0: greedy)",
    "max_length": "give max_new_tokens (tokens after the prompt)",
    "num_beams": "not supported: greedy or sampling only",
    "eos_token_id": "generation stops at the tokenizer's eos_token_ids and the model's "
                    "generation_config.json ones; use stop_strings for more",
    "pad_token_id": "not needed: batches are left-padded internally",
    "generation_config": "pass its fields as keywords (temperature, max_new_tokens and the "
                         "logits processors listed below)",
}


def unsupported_options(options: dict) -> str:
    """The error for keywords ``generate`` does not take, with what to do for transformers'."""
    lines = [f"{k}: {_HF_HINTS.get(k, 'not an option of ember generate')}" for k in options]
    return ("generate() does not take " + ", ".join(map(repr, options)) + "\n  "
            + "\n  ".join(lines) + "\n(its options: max_new_tokens, temperature, "
            + ", ".join(Knobs().as_dict()) + ", num_return_sequences, seed, stop_strings, "
            "chat, template_kwargs)")


# transformers 5's defaults (GenerationConfig._get_default_generation_params) for the knobs a
# model's generation_config.json may set: top_k is 50 when sampling, not off; top_h's is None
# (off), which is 0 here (transformers refuses 0) so that a keyword can turn the file's off
HF_SAMPLING_DEFAULTS = {"top_k": 50, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
                        "min_new_tokens": 0, "no_repeat_ngram_size": 0, "min_length": 0,
                        "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
                        "top_h": 0.0}
_INT_KNOBS = ("top_k", "min_new_tokens", "no_repeat_ngram_size", "min_length")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral)


# A generation_config.json's knob as transformers 5.24's generate() takes it: whether it builds
# that logits processor / warper for the value (no: the knob is off), then whether that
# processor's __init__ accepts it (no: transformers raises), and the valid range. The warpers
# are built only when sampling, so a bad one raises only then.
_FILE_RANGES: dict[str, tuple[Any, Any, str]] = {
    # its processor takes a float only: a file's 2 (an int) is refused, its 1 builds none
    "repetition_penalty": (lambda v: v != 1, lambda v: isinstance(v, float) and v > 0,
                           "a float > 0 (1 = off)"),
    "min_new_tokens": (lambda v: v > 0, _is_int, "an int >= 0 (0 = off)"),
    "no_repeat_ngram_size": (lambda v: v > 0, _is_int, "an int >= 0 (0 = off)"),
    "min_length": (lambda v: v > 0, _is_int, "an int >= 0 (0 = off)"),
    "top_h": (lambda v: True, lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v != 0, lambda v: v > 0 and _is_int(v), "an int >= 0 (0 = off)"),
    "top_p": (lambda v: v < 1, lambda v: v >= 0, "in [0, 1] (1 = off)"),
    "min_p": (lambda v: True, lambda v: 0 <= v <= 1, "in [0, 1] (0 = off)"),
    "typical_p": (lambda v: v < 1, lambda v: v > 0, "in (0, 1] (1 = off)"),
    "epsilon_cutoff": (lambda v: 0 < v < 1, lambda v: True, "in [0, 1) (0 = off)"),
    "eta_cutoff": (lambda v: 0 < v < 1, lambda v: True, "in [0, 1) (0 = off)"),
}
_WARPERS = {f.name for f in fields(Knobs) if f.metadata.get("warper")}


def _file_knob(model: Transformer, name: str, v: Any, sampling: bool) -> Any:
    """The generation_config.json's ``name`` = ``v`` as transformers' generate() takes it: the
    value, its off value where transformers builds no processor for it (a top_p of 1.5, a
    negative no_repeat_ngram_size), None when unset; EmberError where transformers refuses it
    (a top_k of -1 when sampling, a repetition_penalty of 0 always: its processors' checks)."""
    number = isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v)
    if v is None or (name in _WARPERS and not sampling):
        # no warper is built for greedy decoding: a valid value is kept (unused), any other unset
        try:
            ok = number and (name not in _INT_KNOBS or _is_int(v))
            ok = ok and check_sampling(0, 0.0, **{**HF_SAMPLING_DEFAULTS, name: v}) is None
        except EmberError:
            ok = False
        return v if ok else None
    built, accepted, valid = _FILE_RANGES[name]
    if number and not built(v):
        return Knobs().as_dict()[name]
    if not number or not accepted(v):
        where = getattr(model, "hf_generation_config_path", None) or "generation_config.json"
        mode = " when sampling" if name in _WARPERS else ""
        raise EmberError(f"{where}: {name} = {v!r} is invalid ({name} must be {valid}); "
                         f"transformers' generate() refuses it too{mode}: fix or remove it in "
                         f"that file, or pass {name} to override it")
    return v


def sampling_defaults(model: Transformer, *, sampling: bool = False, **given) -> dict:
    """The knobs of ``HF_SAMPLING_DEFAULTS`` as transformers' ``generate()`` takes those not
    passed: ``given`` where not None, else the generation_config.json the model was loaded with
    (Qwen2.5-Instruct's top_k 20, top_p 0.8, repetition_penalty 1.05, which transformers applies
    to greedy decoding too), else transformers' default. Its do_sample / temperature are not
    taken: Ember is greedy unless a temperature > 0 is given. ``sampling``: whether it is: a
    file's value transformers refuses is an EmberError then for the warpers, always for the
    processors (``_file_knob``); one for which it builds no processor is off."""
    gen = getattr(model, "hf_generation_config", None)
    gen = gen if isinstance(gen, dict) else {}
    out = {}
    for name, default in HF_SAMPLING_DEFAULTS.items():
        v = given.get(name)
        if v is None:
            v = _file_knob(model, name, gen.get(name), sampling)
            v = default if v is None else v
        out[name] = v
    return out


# settings of a generation_config.json that ``generate_ids`` takes as they are (``token_bans``
# checks the token ids): every other Knobs field
TOKEN_BAN_SETTINGS = tuple(f.name for f in fields(Knobs) if f.name not in HF_SAMPLING_DEFAULTS)


def knob_defaults(model: Transformer, *, sampling: bool = False, **given) -> dict:
    """Every ``Knobs`` field as transformers' ``generate()`` takes it: ``given`` where not None,
    else the generation_config.json's (``sampling_defaults``, ``token_ban_defaults``).
    ``sampling``: temperature > 0 (the file's warpers are checked then only)."""
    return (sampling_defaults(model, sampling=sampling, **given)
            | token_ban_defaults(model, **given))


def token_ban_defaults(model: Transformer, **given) -> dict:
    """``TOKEN_BAN_SETTINGS``: ``given`` where not None, else the generation_config.json's the
    model was loaded with (as transformers' ``generate()`` takes them), else None."""
    gen = getattr(model, "hf_generation_config", None)
    gen = gen if isinstance(gen, dict) else {}
    out = {k: given[k] if given.get(k) is not None else gen.get(k) for k in TOKEN_BAN_SETTINGS}
    bias = gen.get("sequence_bias") if given.get("sequence_bias") is None else None
    if isinstance(bias, list) and any(isinstance(p, list) and len(p) == 2 and _is_int(p[1])
                                      for p in bias):
        # transformers' SequenceBias takes a float bias only (the keyword's -10 is Ember's -10.0)
        where = getattr(model, "hf_generation_config_path", None) or "generation_config.json"
        raise EmberError(f"{where}: sequence_bias = {bias!r} is invalid (each bias must be a "
                         "float, e.g. -10.0); transformers' generate() refuses it too: fix or "
                         "remove it in that file, or pass sequence_bias to override it")
    return out


# generation_config.json settings that change transformers' generate() output and that Ember
# does not apply, with the value that leaves each off
_UNAPPLIED = {"num_beams": 1, "guidance_scale": 1.0, "watermarking_config": None,
              "token_healing": False}


def unapplied_settings(model: Transformer) -> str | None:
    """What to tell about the settings of the model's generation_config.json that transformers'
    ``generate()`` applies and Ember does not (beams, guidance_scale...), named
    as ``name=value``: Ember's output may differ from transformers' there. None: there are none."""
    gen = getattr(model, "hf_generation_config", None)
    if not isinstance(gen, dict):
        return None
    unapplied = [f"{k}={gen[k]!r}" for k, off in _UNAPPLIED.items()
                 if gen.get(k, off) not in (off, None) and gen.get(k) != []]
    if not unapplied:
        return None
    return (f"the model's generation_config.json sets {', '.join(unapplied)}, which Ember's "
            "generation does not apply (transformers' generate() does): answers may differ "
            "from transformers' there")
