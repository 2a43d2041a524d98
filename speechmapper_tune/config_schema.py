"""Recipe settings declared once, as dataclasses, and checked before any work.

Each recipe file declares its own schema (``PretrainSettings`` in ``speechmapper_pretrain.py``, ...):
a dataclass (declared with :func:`settings`) whose fields are the settings it reads, typed, with
their defaults; the recipe names it ``SCHEMA``. Copying one recipe file copies its schema. This module holds what the recipes share: the sections several of them
read (:class:`LLMSettings`, :class:`PromptSettings`, :class:`LoraSettings`, :class:`AugmentSettings`,
:class:`TrainingSettings`) and the checking machinery.

:func:`load_settings` checks a DictConfig against a schema and returns it merged over the schema's
defaults (an OmegaConf structured config), so a recipe reads ``cfg.max_steps`` instead of
``cfg.get("max_steps", default)``. OmegaConf accepts any key on the command line, so the check
comes first and names every problem in one line:
``speechmapper_pretrain: unknown setting 'max_step' (did you mean 'max_steps'?)``,
``gradient_accumulation_steps=0 must be an integer >= 1``, ``clip_grad_norm='big' must be a number``.

Field types: ``int``, ``float``, ``bool``, ``str``, ``Optional[...]``, ``List[...]``, ``Dict[str, ...]``
(any sub-key), a nested dataclass (a section with declared sub-keys) and ``Any`` (any value).
:func:`at_least` gives an integer its minimum. A ``_component_`` section (``Component``) is checked
against the component's signature (``inspect.signature``), so a misspelt keyword (``loss.sigmma``)
and a wrongly typed number or bool (``optimizer.lr=fast``) are named before anything loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Set

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "MISSING",
    "Component",
    "at_least",
    "settings",
    "check_settings",
    "load_settings",
    "LLMSettings",
    "TextLLMSettings",
    "PromptSettings",
    "LoraSettings",
    "AugmentSettings",
    "StuckGuardSettings",
    "TrainingSettings",
]

COMPONENT = "_component_"
Component = Any  # a ``_component_`` section: checked against the component's signature, built by config.instantiate


def settings(cls: type) -> type:
    """``@dataclass`` for a settings schema, its annotations resolved where it is declared.

    ``tune run`` runs a recipe as ``__main__`` through runpy, where the recipe's module is not in
    ``sys.modules``; with ``from __future__ import annotations`` the string annotations could not be
    resolved later (by the check or by OmegaConf), so they are resolved here, in the caller's namespace.
    """
    namespace = sys._getframe(1).f_globals
    own = cls.__dict__.get("__annotations__", {})
    hints = typing.get_type_hints(cls, globalns=namespace)
    cls.__annotations__ = {name: hints[name] for name in own}
    return dataclass(cls)


def at_least(minimum: int, default: Any = MISSING) -> Any:
    """An integer setting with its minimum (checked when set; None is refused unless the type is Optional)."""
    return field(default=default, metadata={"minimum": minimum})


# ---------------------------------------------------------------------------- shared sections
@settings
class LLMSettings:
    """The LLM a SpeechLM runs (``SpeechLM.from_checkpoint``'s ``llm``): None = what the projector records."""

    name: Optional[str] = None
    checkpoint: Any = None  # a folder, or a _component_ returning one
    tokenizer: Any = None  # default: the checkpoint folder
    chat_format: Optional[str] = None
    dtype: Optional[str] = "auto"  # auto: bf16 only where the device computes it natively
    pad_id: Optional[int] = None


@settings
class TextLLMSettings:
    """An LLM that reads text only, loaded by name from its folder (speechmapper_eet, speechmapper_annotate)."""

    name: str = MISSING  # a load_llm name
    checkpoint: Any = None  # a folder, or a _component_ returning one; None: the named LLM's offline copy (SmolLM2)
    chat_format: Optional[str] = None  # None: the named LLM's own (models.llms.LLMS)
    dtype: str = "fp32"

    @staticmethod
    def resolve(llm: Any, resolve_path: Any) -> tuple:
        """(checkpoint folder, chat format) of a TextLLMSettings section, the unset ones from the named LLM.

        ``resolve_path``: the recipes' ``configs.resolve_path_setting`` (it instantiates a ``_component_`` with
        torchtune, which stays out of the library)."""
        from speechmapper_tune.models.llms import default_chat_format, default_checkpoint

        ckpt = resolve_path(llm.checkpoint) or default_checkpoint(llm.name)
        if not ckpt:
            raise ValueError(f"llm.checkpoint is not set and {llm.name!r} has no offline copy: pass the LLM's folder")
        chat_format = llm.chat_format or default_chat_format(llm.name)
        if not chat_format:
            raise ValueError(f"llm.chat_format is not set and {llm.name!r} has no default one")
        return ckpt, chat_format


@settings
class PromptSettings:
    """A ``PromptTemplate`` (data.stage2): ``user`` holds ``{speech}`` and may hold ``{instruction}``."""

    user: str = MISSING  # holds {speech} once
    instruction: str = ""
    system: Optional[str] = None
    assistant_prefix: str = ""
    instructions: Dict[str, str] = field(default_factory=dict)  # per target language (ST)


@settings
class LoraSettings:
    """``models.llms.LoraConfig``: adapters on the frozen LLM."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    attn_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    apply_to_mlp: bool = False


@settings
class AugmentSettings:
    """``data.augment.FeatureMasking``: time and feature masks on training features (never validation ones)."""

    time_masks: int = 0
    time_width: int = 0
    feature_masks: int = 0
    feature_width: int = 0


@settings
class StuckGuardSettings:
    """``generation.StuckGuard``'s settings (speechmapper_generate's ``stuck_guard``); unset: its defaults."""

    max_ngram: Optional[int] = None
    min_repeats: Optional[int] = None
    min_span: Optional[int] = None
    trim: Optional[bool] = None


@settings
class BestCheckpointSettings:
    metric: Optional[str] = None  # a validation figure, e.g. val_token_acc: its best step's checkpoint is kept
    mode: str = "max"  # max or min: which direction is better
    patience: Optional[int] = None  # validations in a row without a new best before the run stops (null: never)


# unset ``metric_loggers``: the console and ``<output_dir>/logs`` (metrics.jsonl is written besides, always)
DEFAULT_METRIC_LOGGERS = (
    {"_component_": "torchtune.training.metric_logging.StdoutLogger"},
    {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": "${output_dir}/logs"},
)


@settings
class TrainingSettings:
    """The training loop's settings, shared by speechmapper_pretrain and speechmapper_adapt."""

    output_dir: str = MISSING
    seed: int = 0
    device: str = "cpu"
    resume: bool = False
    prepare: Optional[Component] = None  # e.g. write the tiny synthetic set before reading it
    model: Component = MISSING
    loss: Component = MISSING
    optimizer: Component = MISSING
    lr_scheduler: Component = MISSING
    max_steps: int = at_least(0)
    gradient_accumulation_steps: int = at_least(1, 1)
    clip_grad_norm: Optional[float] = None
    log_every_n_steps: Optional[int] = 10  # the console line and metrics.jsonl every 10 steps
    val_every_n_steps: Optional[int] = 0
    save_every_n_steps: Optional[int] = 0
    keep_last_n_checkpoints: Optional[int] = 2
    metric_loggers: List[Component] = field(default_factory=lambda: list(DEFAULT_METRIC_LOGGERS))
    validate_at_start: bool = False  # the starting point's validation figures (e.g. of init_projector)
    best_checkpoint: BestCheckpointSettings = field(default_factory=BestCheckpointSettings)


# ---------------------------------------------------------------------------- checking
def load_settings(cfg: Any, schema: type, recipe: str) -> DictConfig:
    """``cfg`` checked against ``schema`` (:func:`check_settings`) and merged over its defaults: a typed DictConfig."""
    check_settings(cfg, schema, recipe)
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), cfg)
    except OmegaConfBaseException as e:  # what the check does not see, e.g. a value behind an interpolation
        raise ValueError(f"{recipe}: {' '.join(str(e).split())}") from e


def check_settings(cfg: Any, schema: type, recipe: str) -> None:
    """Raise ``ValueError`` naming, in one line, every unknown key of ``cfg`` (a mapping or DictConfig), every
    wrongly typed value, every integer below its minimum and every ``_component_`` keyword its target lacks."""
    problems = _check_section(_plain(cfg), schema, "")
    if problems:
        raise ValueError(f"{recipe}: " + "; ".join(problems))


def schema_keys(schema: type, prefix: str = "") -> Set[str]:
    """Every dotted key a schema declares (a section's own name included)."""
    keys: Set[str] = set()
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        keys.add(prefix + f.name)
        inner = _dataclass_in(hints[f.name])
        if inner is not None:
            keys |= schema_keys(inner, f"{prefix}{f.name}.")
    return keys


def _dataclass_in(tp: Any) -> Optional[type]:
    args = [a for a in typing.get_args(tp) if a is not type(None)] if _is_optional(tp) else [tp]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)


def _check_section(node: Any, schema: type, path: str) -> List[str]:
    if not isinstance(node, Mapping):
        return [f"{path}={node!r} must be a section (key: value, ...)"]
    prefix = f"{path}." if path else ""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    problems: List[str] = []
    for key, value in node.items():
        key = str(key)
        if key not in fields:
            problems.append(_unknown(prefix, key, fields))
        else:
            problems += _check_value(value, hints[key], prefix + key, fields[key].metadata.get("minimum"))
    return problems


def _check_value(value: Any, tp: Any, path: str, minimum: Optional[int] = None) -> List[str]:
    if isinstance(value, str) and "${" in value:
        return []  # an interpolation: resolved (and checked by the typed config) where it is used
    if isinstance(value, Mapping) and COMPONENT in value:
        return _component(value, path)
    if _is_optional(tp):
        if value is None:
            return []
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else typing.Union[tuple(args)]
    if tp is Any:
        return _components_in(value, path)
    if value == MISSING:
        return []  # "???": the typed config names it where it is read
    if dataclasses.is_dataclass(tp):
        return _check_section(value, tp, path)
    origin = typing.get_origin(tp)
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            return [f"{path}={value!r} must be a section (key: value, ...)"]
        inner = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        return [p for k, v in value.items() for p in _check_value(v, inner, f"{path}.{k}")]
    if origin in (list, List):
        if not isinstance(value, list):
            return [f"{path}={value!r} must be a list"]
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        return [p for i, v in enumerate(value) for p in _check_value(v, inner, f"{path}[{i}]")]
    if origin is typing.Union:
        results = [_check_value(value, a, path) for a in typing.get_args(tp)]
        return [] if any(not r for r in results) else results[0]
    if tp is bool:
        return [] if isinstance(value, bool) else [f"{path}={value!r} must be true or false"]
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)
        return (
            [] if ok else [f"{path}={value!r} must be an integer" + (f" >= {minimum}" if minimum is not None else "")]
        )
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return [] if ok else [f"{path}={value!r} must be a number"]
    if tp is str:
        if isinstance(value, Mapping):  # "Answer: x" unquoted on the command line parses to a mapping
            return [f"{path}={value!r} must be a string (quote it on the command line: '{path}=\"...\"')"]
        return [f"{path}={value!r} must be a string"] if isinstance(value, list) or value is None else []
    return []


def _components_in(value: Any, path: str) -> List[str]:
    """The ``_component_`` sections inside a value the schema does not constrain (a list of loggers, say)."""
    if isinstance(value, Mapping):
        if COMPONENT in value:
            return _component(value, path)
        return [p for k, v in value.items() for p in _components_in(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _components_in(v, f"{path}[{i}]")]
    return []


def _component(node: Mapping, path: str) -> List[str]:
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
            problems.append(_unknown(f"{path}.", str(key), params, f" ({target} takes {', '.join(sorted(params))})"))
        elif isinstance(value, (list, Mapping)):
            problems += _components_in(value, f"{path}.{key}")  # nested components; other values are the component's
        elif key in defaults:
            problems += _type_problem(f"{path}.{key}", value, defaults[key], str(target))
    return problems


def _unknown(prefix: str, key: str, names: Any, hint: str = "") -> str:
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
        want = "an integer" if isinstance(default, int) and not isinstance(value, float) else "a number"
        if isinstance(default, int) and isinstance(value, float) and not value.is_integer():
            ok, want = False, "an integer"
    return [] if ok else [f"{key}={value!r} must be {want} ({target}'s default is {default!r})"]


def _plain(cfg: Any) -> Any:
    """The config as nested dicts and lists, interpolations left unresolved."""
    if hasattr(cfg, "_get_node"):
        return OmegaConf.to_container(cfg, resolve=False)
    return cfg
