"""Every recipe's settings, checked before any work: a misspelt or unknown key is an error.

OmegaConf accepts any key on the command line, so ``max_step=2`` used to train the config's
``max_steps`` and ``foo=1`` passed unnoticed. :func:`check_recipe_config` names an unknown key
with the closest known one: ``speechmapper_pretrain: unknown setting 'max_step' (did you mean
'max_steps'?)``, and integer settings below their minimum (``gradient_accumulation_steps=0``).

Known keys are dotted paths. A section with declared sub-keys has them checked; ``section.*``
takes any sub-key; a key without declared sub-keys takes any value. A ``_component_`` section
is checked against the component's signature (``inspect.signature``), so a misspelt keyword
(``loss.sigmma``) is named before anything loads. Plain Python (omegaconf only to read a DictConfig).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set

COMPONENT = "_component_"

_LLM_TABLE = ("llm.name", "llm.chat_format", "llm.checkpoint", "llm.tokenizer", "llm.pad_id", "llm.embedding_key")
_LLM = ("llm.name", "llm.checkpoint", "llm.tokenizer", "llm.chat_format", "llm.dtype", "llm.pad_id")  # SpeechLM's llm
_PROMPT = ("system", "user", "instruction", "assistant_prefix", "instructions.*")  # PromptTemplate's fields
_LORA = ("lora.rank", "lora.alpha", "lora.dropout", "lora.attn_modules", "lora.apply_to_mlp")
_AUGMENT = ("time_masks", "time_width", "feature_masks", "feature_width")  # data.augment.MASK_KEYS
_TRAINING = (
    "output_dir",
    "seed",
    "device",
    "resume",
    "prepare",
    "model",
    "loss",
    "optimizer",
    "lr_scheduler",
    "max_steps",
    "gradient_accumulation_steps",
    "clip_grad_norm",
    "log_every_n_steps",
    "val_every_n_steps",
    "save_every_n_steps",
    "keep_last_n_checkpoints",
    "metric_loggers",
)


def _under(section: str, keys: Iterable[str]) -> List[str]:
    return [f"{section}.{k}" for k in keys]


RECIPE_KEYS: Dict[str, Set[str]] = {
    "speechmapper_pretrain": {
        *_TRAINING,
        "dtype",
        "dry_run",
        *_LLM_TABLE,
        "init_projector",
        "validate_at_start",
        "data.train_manifest",
        "data.val_manifest",
        "data.max_val_items",
        "data.max_tokens_per_batch",
        "data.num_workers",
        "data.target_text",
        *_under("data.augment", _AUGMENT),
    },
    "speechmapper_adapt": {
        *_TRAINING,
        *_LLM,
        "projector_checkpoint",
        "from_scratch",
        *_under("prompt", _PROMPT),
        *_under("asr_prompt", _PROMPT),
        *_LORA,
        "trim_pad_vectors",
        "batch_size",
        "max_seq_len",
        "enable_activation_checkpointing",
        "validate_at_start",
        "llm.quantize",
        *_under("data.train", ("manifest", "instructions", "task", "asr_mix_ratio", "num_workers", "target_text")),
        *_under("data.train.augment", _AUGMENT),  # validation never sees masked features: no data.val.augment
        *_under(
            "data.val", ("manifest", "instructions", "task", "asr_mix_ratio", "num_workers", "max_items", "target_text")
        ),
    },
    "speechmapper_generate": {
        "output_dir",
        "projector_checkpoint",
        "manifest",
        "device",
        "seed",
        *_LLM,
        *_under("prompt", _PROMPT),
        "span_source",
        "cascade.model_dir",
        "cascade.compute_type",
        "trim_pad_vectors",
        "batch_size",
        "max_new_tokens",
        "max_seq_len",
        "stop_at_newline",
        "length_cap.tokens_per_second",
        "length_cap.extra",
        "stuck_guard.max_ngram",
        "stuck_guard.min_repeats",
        "stuck_guard.min_span",
        "stuck_guard.trim",
        "max_duration",
        "overwrite",
        "max_items",
        "instructions",
        "task",
        "runs",  # a list of overrides, one run each; the recipe checks each run's merged settings
    },
    "speechmapper_eval": {
        "output_dir",
        "generations.*",
        "judge.name",
        "judge.llm.name",
        "judge.llm.checkpoint",
        "judge.llm.chat_format",
        "judge.llm.dtype",
        "judge.batch_size",
        "judges",  # a list; the recipe checks each judge's keys (speechmapper_eval.JUDGE_KEYS)
        "comet.model_dir",
        "comet.batch_size",
        "comet.gpus",
        "comet.sources",
    },
    "speechmapper_annotate": {
        "output_dir",
        "manifest",
        "task",
        "seed",
        "llm.name",
        "llm.checkpoint",
        "llm.chat_format",
        "llm.dtype",
        "prompt.system",
        "prompt.user",
        "prompt.assistant_prefix",
        "instruction",
        "max_new_tokens",
        "batch_size",
        "max_items",
        "overwrite",
        "labels",
    },
    "speechmapper_eet": {
        "output_dir",
        "seed",
        "llm.name",
        "llm.checkpoint",
        "llm.chat_format",
        "llm.dtype",
        "sentences.source",
        "sentences.num_sentences",
        "sentences.seed",
        "noise_degrees",
        "prompt.user",
        "prompt.assistant_prefix",
        "stop_at_newline",
        "max_new_tokens",
        "batch_size",
    },
    "speechmapper_extract": {
        "output_dir",
        "manifest",
        "device",
        "dtype",
        "average_frames",
        "batch_size",
        "max_duration",
        "max_utterances",
        "shard_size",
        "feature_type",
        *_under("perturb", ("speeds", "noise_snr_db", "noise", "channels", "seed")),  # data.extract.PERTURB_KEYS
        # name, path, layer, and the keyword arguments of the SFM classes (build_sfm passes the rest on)
        *_under("sfm", ("name", "path", "layer", "batch_size", "pack", "pack_gap_s", "window", "max_seconds")),
    },
    "speechmapper_corpus": {  # CorpusSettings.from_dict checks the values
        "output_dir",
        "seed",
        "num_workers",
        "chunk_size",
        "progress",
        "wordnet_dir",
        "text.min_words",
        "text.max_words",
        "text.spell_out_numbers",
        "engines.*",
        "splits.*",
    },
    "speechmapper_instructions": {
        "manifest",
        "output_dir",
        "task",
        "target_langs",
        "with_transcript",
        "st_instructions.*",
        "sqa_instruction",
        "translations",
        # task=self: pooled instructions answered by the LLM from the transcripts (speechmapper_generate's settings)
        "pool",
        "per_item",
        "seed",
        "shuffled_reference",
        "max_items",
        *_under("answer", _LLM),
        *_under("answer.prompt", _PROMPT),
        "answer.device",
        "answer.batch_size",
        "answer.max_new_tokens",
        "answer.overwrite",
        "answer.stuck_guard.max_ngram",
        "answer.stuck_guard.min_repeats",
        "answer.stuck_guard.min_span",
        "answer.stuck_guard.trim",
    },
}

# integer settings and their minimum, checked when set (None included: the recipes call int() on them)
RECIPE_MINIMUMS: Dict[str, Dict[str, int]] = {
    "speechmapper_pretrain": {
        "max_steps": 0,
        "gradient_accumulation_steps": 1,
        "data.max_tokens_per_batch": 1,
        "data.num_workers": 0,
    },
    "speechmapper_adapt": {
        "max_steps": 0,
        "gradient_accumulation_steps": 1,
        "batch_size": 1,
        "data.train.num_workers": 0,
        "data.val.num_workers": 0,
    },
    "speechmapper_generate": {"batch_size": 1, "max_new_tokens": 1},
    "speechmapper_eet": {"batch_size": 1, "max_new_tokens": 1, "sentences.num_sentences": 1},
    "speechmapper_annotate": {"batch_size": 1, "max_new_tokens": 1},
    "speechmapper_extract": {"average_frames": 1, "batch_size": 1, "shard_size": 1},
}


# number settings outside any _component_ (whose numbers are checked against the component's defaults)
_NUMBERS = {"clip_grad_norm": float}
RECIPE_NUMBERS: Dict[str, Dict[str, type]] = {
    "speechmapper_pretrain": {**_NUMBERS},
    "speechmapper_adapt": {
        **_NUMBERS,
        "lora.rank": int,
        "lora.alpha": float,
        "lora.dropout": float,
        "max_seq_len": int,
        "data.train.asr_mix_ratio": float,
        "data.val.asr_mix_ratio": float,
        "data.val.max_items": int,
    },
    "speechmapper_generate": {
        "length_cap.tokens_per_second": float,
        "length_cap.extra": float,
        "max_duration": float,
        "max_seq_len": int,
        "max_items": int,
    },
    "speechmapper_extract": {"max_duration": float, "max_utterances": int},
}


def check_recipe_config(cfg: Any, recipe: str) -> None:
    """Check ``cfg`` against the settings ``recipe`` reads (see :data:`RECIPE_KEYS`)."""
    check_config_keys(cfg, RECIPE_KEYS[recipe], recipe, RECIPE_MINIMUMS.get(recipe), RECIPE_NUMBERS.get(recipe))


def check_config_keys(
    cfg: Any,
    known: Iterable[str],
    recipe: str,
    minimums: Optional[Mapping[str, int]] = None,
    numbers: Optional[Mapping[str, type]] = None,
) -> None:
    """Raise ``ValueError`` naming every unknown key of ``cfg`` (a mapping or DictConfig), every integer
    setting below its minimum and every wrongly typed number (``numbers``: key -> int or float, and each
    ``_component_``'s number and bool keywords); ``known``: dotted keys as described in the module docstring."""
    tree = _plain(cfg)
    problems = _Walker(set(known)).section(tree, "")
    for key, kind in (numbers or {}).items():
        present, value = _lookup(cfg, tree, key)
        if present:
            problems += _type_problem(key, value, kind(0), "the recipe")
    for key, minimum in (minimums or {}).items():
        present, value = _lookup(cfg, tree, key)
        if present and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            problems.append(f"{key}={value!r} must be an integer >= {minimum}")
    if problems:
        raise ValueError(f"{recipe}: " + "; ".join(problems))


class _Walker:
    def __init__(self, known: Set[str]):
        self.known = known

    def children(self, prefix: str) -> Set[str]:
        return {k[len(prefix) :].split(".")[0] for k in self.known if k.startswith(prefix)}

    def section(self, node: Mapping, path: str) -> List[str]:
        prefix = f"{path}." if path else ""
        names, problems = self.children(prefix), []
        for key, value in node.items():
            if str(key) in names or "*" in names:
                problems += self.value(value, prefix + str(key))
            else:
                problems.append(_unknown(prefix, str(key), names - {"*"}))
        return problems

    def value(self, value: Any, path: str) -> List[str]:
        if isinstance(value, Mapping) and COMPONENT in value:
            return self.component(value, path)
        if isinstance(value, Mapping) and self.children(f"{path}."):
            return self.section(value, path)
        if isinstance(value, list):
            return [
                p
                for i, v in enumerate(value)
                if isinstance(v, Mapping) and COMPONENT in v
                for p in self.component(v, f"{path}[{i}]")
            ]
        return []  # a plain value, or a section whose keys the recipe does not constrain

    def component(self, node: Mapping, path: str) -> List[str]:
        target = node[COMPONENT]
        try:
            params = _keyword_parameters(_import(str(target)))
        except (ImportError, AttributeError) as e:
            return [f"{path}.{COMPONENT}={target!r} cannot be imported ({type(e).__name__}: {e})"]
        problems, defaults = [], _defaults(_import(str(target)))
        for key, value in node.items():
            if key == COMPONENT:
                continue
            if params is not None and key not in params:
                problems.append(
                    _unknown(f"{path}.", str(key), params, f" ({target} takes {', '.join(sorted(params))})")
                )
            elif isinstance(value, list) or (isinstance(value, Mapping) and COMPONENT in value):
                problems += self.value(value, f"{path}.{key}")  # nested components; other values are the component's
            elif key in defaults:
                problems += _type_problem(f"{path}.{key}", value, defaults[key], str(target))
        return problems


def _unknown(prefix: str, key: str, names: Iterable[str], hint: str = "") -> str:
    close = difflib.get_close_matches(key, sorted(names), n=1)
    return f"unknown setting '{prefix}{key}'" + (f" (did you mean '{prefix}{close[0]}'?)" if close else hint)


def _import(dotted: str) -> Any:
    """The object a ``_component_`` path names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module in {dotted!r}")


def _keyword_parameters(obj: Any) -> Optional[Set[str]]:
    """Names a config may pass as keywords; None when it takes ``**kwargs`` or has no signature."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _defaults(obj: Any) -> Dict[str, Any]:
    """A component's keyword parameters whose default is a number or a bool: the type a config value must have."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if isinstance(p.default, (bool, int, float))}


def _type_problem(key: str, value: Any, default: Any, target: str) -> List[str]:
    """``lr: fast`` named here, before anything loads, instead of torch's TypeError after the model is built."""
    if value is None or (isinstance(value, str) and "${" in value):
        return []  # unset, or an interpolation (resolved and checked where it is used)
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        want = (
            "an integer"
            if isinstance(default, int) and not isinstance(value, float) and not isinstance(default, bool)
            else "a number"
        )
        if isinstance(default, int) and isinstance(value, float) and not value.is_integer():
            ok, want = False, "an integer"
    if ok:
        return []
    return [
        f"{key}={value!r} must be {want}" + (f" ({target}'s default is {default!r})" if target != "the recipe" else "")
    ]


def _plain(cfg: Any) -> Mapping:
    """The config as nested dicts and lists, interpolations left unresolved."""
    if isinstance(cfg, Mapping) and not hasattr(cfg, "_get_node"):
        return cfg
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=False)


def _lookup(cfg: Any, tree: Mapping, key: str):
    """``(present, value)`` of a dotted key, interpolations resolved when ``cfg`` is a DictConfig."""
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    if hasattr(cfg, "_get_node"):
        from omegaconf import OmegaConf

        try:
            node = OmegaConf.select(cfg, key, throw_on_missing=False)
        except Exception:  # noqa: BLE001  (an interpolation that does not resolve is reported where it is used)
            pass
    return True, node
