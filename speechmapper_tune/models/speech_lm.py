"""SpeechLM: a SpeechMapper projector feeding a frozen LLM, and the one place its input is built.

    lm = SpeechLM.from_pretrained("smollm2_135m_whisper_base_stage2_asr_lora")
    lm.transcribe(["talk.flac"])                      # -> ["..."]
    lm.ask("What is the speaker talking about?", ["talk.flac"])

The LLM reads ``prompt prefix | speech vectors | prompt suffix (| response)``. ``build_inputs``
makes that sequence for training (``speechmapper_adapt``, with the response and its labels), for
generation (``speechmapper_generate``, the demo, ``speechmapper transcribe``) and for serving
(``prompt_embeds``, what vLLM's ``enable_prompt_embeds`` takes), so what is trained is what is
served. ``from_checkpoint`` makes every compatibility check of a projector against an LLM once
(output width, embedding-table fingerprint, LoRA adapters present) and uses the prompt the
checkpoint was trained with. Plain PyTorch; torchtune only behind ``models/llms.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from speechmapper_tune.checkpoint.embedding_table import load_embedding_table
from speechmapper_tune.checkpoint.projector_io import (
    embedding_fingerprint,
    load_checked_projector,
    lora_weights_file,
    read_projector_meta,
)
from speechmapper_tune.data.stage2 import PromptParts, PromptTemplate, assemble_batch, split_prompt
from speechmapper_tune.dtypes import resolve_dtype
from speechmapper_tune.generation import GenerationResult, greedy_generate, newline_token_ids
from speechmapper_tune.losses import IGNORE_INDEX
from speechmapper_tune.models.chat_format import ChatTokenizer
from speechmapper_tune.models.injector import inject_speech, trailing_pad_lengths
from speechmapper_tune.models.llms import (
    adapters_off,
    default_chat_format,
    default_checkpoint,
    embed_tokens,
    forward_embeds,
    load_llm,
    load_lora_adapters,
)

FROM_CHECKPOINT = "checkpoint"  # lora=...: the adapters the checkpoint was trained with, if any
# An instruction prompt for `ask` when the checkpoint's own prompt has no {instruction} (stage 1):
# the paper's IT template (B.3), as the stage-2 configs use it.
INSTRUCTION_USER = "Speech: {speech}\n{instruction}"
# Stage-1 checkpoints record no prompt: they are read with the paper's zero-shot ASR prompt (table 11) and a
# forced answer prefix after the assistant header (B.3 adds one to stop verbose answers); the answer is one line.
# `speechmapper_generate ... prompt=null` uses it for a stage-1 checkpoint.
ZERO_SHOT_PROMPT = {
    "system": None,
    "user": '"{speech}"\nRepeat the previous text between the quotes in its entirety just once and nothing else. '
    "Do not repeat the text multiple times or correct the text or add punctuation. End the text if you notice a "
    "phrase or a text is getting repeated. Ignore the words that do not make any sense.",
    "instruction": "",
    "assistant_prefix": "Here is the sentence: ",
}

Audio = Union[str, Path, np.ndarray, Tuple[np.ndarray, int]]


def resolve_projector(checkpoint: Union[str, Path]) -> Path:
    """A checkpoint folder, or the name of a projector shipped in the package."""
    path = Path(checkpoint)
    if path.is_dir():
        return path
    from speechmapper_tune import pretrained

    if str(checkpoint) in pretrained.available():
        return Path(pretrained.shipped_projector(str(checkpoint)))
    raise FileNotFoundError(
        f"{checkpoint}: neither a projector checkpoint folder nor a shipped projector "
        f"(shipped: {', '.join(pretrained.available()) or 'none'})"
    )


def zero_shot_prompt() -> Tuple[Dict[str, Any], bool]:
    """The paper's zero-shot ASR prompt and its one-line answer setting (stop_at_newline)."""
    return dict(ZERO_SHOT_PROMPT), True


@dataclass
class LLMInputs:
    """Right-padded LLM input embeddings; ``labels`` (IGNORE_INDEX but on the response) for training."""

    embeds: Tensor  # [B, L, D]
    labels: Tensor  # [B, L]
    lengths: List[int]  # real length of each row
    span_starts: Tensor  # [B] where each speech span begins
    span_lengths: Tensor  # [B]

    def prompts(self) -> List[Tensor]:
        """One [L_i, D] tensor per item, without the right padding (greedy_generate left-pads)."""
        return [self.embeds[b, :n] for b, n in enumerate(self.lengths)]


class SpeechLM(nn.Module):
    """Projector (optional: text spans for toplines) + frozen LLM (+ LoRA) + chat tokenizer + prompt."""

    def __init__(
        self,
        llm: nn.Module,
        chat: ChatTokenizer,
        template: PromptTemplate,
        pad_id: int,
        embedding: Tensor,
        projector: Optional[nn.Module] = None,
        trim_pad_vectors: bool = False,
        stop_at_newline: bool = False,
        llm_meta: Optional[Dict[str, Any]] = None,
        checkpoint: Optional[Path] = None,
        meta: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        self.llm, self.chat, self.template, self.pad_id = llm, chat, template, int(pad_id)
        self.projector = projector
        self.register_buffer("embedding", embedding, persistent=False)  # fp32 table: MSE targets, pad trimming
        self.trim_pad_vectors, self.stop_at_newline = bool(trim_pad_vectors), bool(stop_at_newline)
        self.right_pad_id = chat.eos_id  # never the placeholder, so the span check is exact
        self.llm_meta = llm_meta or {}
        self.checkpoint, self.meta = checkpoint, meta or {}  # the checkpoint folder and its projector_config.json
        self.features = self.meta.get("features")  # how the projector's input features are made (SFM, layer, averaging)
        self._sfm = None
        self._newlines = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Union[str, Path, None],
        llm: Optional[Mapping[str, Any]] = None,
        *,
        prompt: Optional[Mapping[str, Any]] = None,
        lora: Any = FROM_CHECKPOINT,
        projector: Optional[nn.Module] = None,
        device: Union[str, torch.device] = "cpu",
        trim_pad_vectors: Optional[bool] = None,
        stop_at_newline: Optional[bool] = None,
        on_warning: Callable[[str], None] = print,
        llm_cache: Optional[Dict[Any, Any]] = None,
    ) -> "SpeechLM":
        """Load a projector checkpoint (folder or shipped name) with the LLM it was trained for.

        ``llm``: ``{name, checkpoint, tokenizer, chat_format, dtype, pad_id}``, each defaulting to what
        the checkpoint records, then to the named LLM's own (``models.llms``: its chat format; SmolLM2's
        folder, found offline). ``prompt``: a ``PromptTemplate`` mapping;
        default the checkpoint's training prompt (stage 1: the paper's zero-shot prompt). ``lora``: the
        adapters' settings (None: none); default the checkpoint's. ``checkpoint=None`` with ``projector``
        (training from scratch) or without (text spans only: the topline and the cascade).
        ``stop_at_newline``: answers end at their first line; by default only with the zero-shot prompt.
        ``llm_cache``: a dict kept by the caller; models without LoRA share one frozen LLM (and embedding
        table) per checkpoint, dtype and device through it, so one process can serve many projectors.
        """
        folder = resolve_projector(checkpoint) if checkpoint is not None else None
        meta = read_projector_meta(folder) if folder is not None else {}
        recorded = meta.get("llm", {})
        spec = {
            "dtype": "auto",
            **{k: recorded[k] for k in ("name", "chat_format", "pad_id") if k in recorded},
            **{k: v for k, v in (llm or {}).items() if v is not None},
        }
        if "chat_format" not in spec and default_chat_format(spec.get("name", "")):
            spec["chat_format"] = default_chat_format(spec["name"])
        for key in ("name", "chat_format", "pad_id"):
            if key not in spec:
                raise ValueError(f"llm.{key} is not set and {folder or 'the settings'} does not record it")
        ckpt_dir = spec.get("checkpoint") or default_checkpoint(spec["name"]) or recorded.get("checkpoint")
        if not ckpt_dir or not Path(ckpt_dir).exists():
            raise FileNotFoundError(
                f"llm.checkpoint: the {spec['name']} checkpoint folder {ckpt_dir!r} does not exist; "
                "pass the LLM's local folder"
            )
        dtype = resolve_dtype(spec["dtype"], device, setting="llm.dtype")  # auto: bf16 only where computed natively
        cache = llm_cache if llm_cache is not None else {}
        emb_key = ("embedding", str(ckpt_dir))
        embedding = cache[emb_key] if emb_key in cache else cache.setdefault(emb_key, load_embedding_table(ckpt_dir))
        pad_id = int(spec["pad_id"])
        if not 0 <= pad_id < embedding.shape[0]:
            raise ValueError(f"llm.pad_id={pad_id} is outside the vocabulary of {ckpt_dir} (size {embedding.shape[0]})")
        trained_lora = meta.get("lora")
        if folder is not None:  # every check before the LLM is loaded
            projector, meta = load_checked_projector(folder, embedding, device)
        elif projector is not None and projector.output_dim != embedding.shape[1]:
            raise ValueError(
                f"model.output_dim={projector.output_dim} but the LLM's embeddings are {embedding.shape[1]}-dim"
            )
        lora = trained_lora if lora == FROM_CHECKPOINT else lora
        if trained_lora and lora:
            lora_weights_file(folder)
        elif trained_lora:
            on_warning(
                f"{folder} was trained with LoRA adapters on the LLM ({trained_lora}); lora is not set, "
                "so they are left out and the LLM stays as pretrained"
            )
        llm_key = ("llm", spec["name"], str(ckpt_dir), dtype, str(torch.device(device)))
        if lora or llm_key not in cache:  # LoRA adapters change the LLM: never shared
            model, _, _ = load_llm(spec["name"], ckpt_dir, dtype=dtype, device=device, lora=lora or None)
            if not lora:
                cache[llm_key] = model
        else:
            model = cache[llm_key]
        if trained_lora and lora:
            load_lora_adapters(model, folder)
        chat = ChatTokenizer.from_dir(
            spec.get("tokenizer") or ckpt_dir, chat_format=spec["chat_format"], pad_token=pad_id
        )
        one_line = False
        if prompt is None:
            prompt = meta.get("prompt")
            if prompt is None and meta.get("stage") == 1:
                prompt, one_line = zero_shot_prompt()
        if prompt is None:
            raise ValueError(f"no prompt given and {folder or 'no checkpoint'} records none")
        trim = bool(meta.get("trim_pad_vectors", False)) if trim_pad_vectors is None else bool(trim_pad_vectors)
        llm_meta = {
            "name": spec["name"],
            "chat_format": spec["chat_format"],
            "checkpoint": str(ckpt_dir),
            "vocab_size": int(embedding.shape[0]),
            "dim": int(embedding.shape[1]),
            "pad_id": pad_id,
            "fingerprint": embedding_fingerprint(embedding),
        }
        if projector is not None:
            projector.to(device).eval()  # a training recipe calls .train()
        return cls(
            model,
            chat,
            PromptTemplate(**dict(prompt)),
            pad_id,
            embedding.to(device),
            projector,
            trim,
            one_line if stop_at_newline is None else stop_at_newline,
            llm_meta,
            folder,
            meta,
        )

    @classmethod
    def from_pretrained(cls, name: str, **kwargs) -> "SpeechLM":
        """A projector shipped in the package (``speechmapper list``), with its LLM."""
        return cls.from_checkpoint(name, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.embedding.device

    def quantize_(self, method: str = "nf4", world_size: int = 1) -> int:
        """The frozen LLM's layer weights quantized in place (``nf4``: torchao's 4-bit NormalFloat, as QLoRA),
        in scale groups that shard evenly over ``world_size`` ranks; returns how many weights were quantized."""
        from speechmapper_tune.models.sharding import quantize_

        return quantize_(self.llm, method, world_size)

    def shard(self, device: Optional[torch.device] = None) -> "SpeechLM":
        """FSDP2 over this model in place, under an initialised process group: each LLM layer, the projector
        (and an untied head and its table) units of their own, then the root. ``device``: where the collectives
        run (nccl: the GPU). Whole tensors come back with ``models.sharding.full_state_dict`` and friends."""
        from speechmapper_tune.models.sharding import shard_speech_lm

        shard_speech_lm(self, device)
        return self

    # ------------------------------------------------------------------ the one input builder
    def build_inputs(
        self,
        spans: Sequence[Tensor],
        prefixes: Sequence[List[int]],
        suffixes: Sequence[List[int]],
        responses: Optional[Sequence[List[int]]] = None,
    ) -> LLMInputs:
        """``prefix | span | suffix | response`` per item as right-padded LLM input embeddings.

        ``spans``: one [n_i, D] tensor per item (projector vectors, gradients kept; or token
        embeddings for the text topline). Without ``responses``: the generation prompt.
        """
        responses = responses if responses is not None else [[] for _ in spans]
        asm = assemble_batch(
            prefixes, suffixes, responses, [int(s.shape[0]) for s in spans], self.pad_id, self.right_pad_id
        )
        ids = asm.input_ids.to(self.device)
        speech = pad_sequence(list(spans), batch_first=True)
        embeds = inject_speech(
            embed_tokens(self.llm, ids), speech, asm.speech_starts, asm.speech_lengths, ids == self.pad_id
        )
        return LLMInputs(embeds, asm.labels.to(self.device), asm.seq_lengths, asm.speech_starts, asm.speech_lengths)

    def project(
        self, features: Tensor, lengths: Tensor, projector: Optional[nn.Module] = None
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Projector output [B, T, D], its lengths, and the span lengths the LLM reads (pad vectors cut
        when the checkpoint was trained so)."""
        proj = projector if projector is not None else self.projector
        pred, out_lengths = proj(features.to(self.device), lengths.to(self.device))
        span = (
            trailing_pad_lengths(pred.detach(), out_lengths, self.embedding, self.pad_id)
            if self.trim_pad_vectors
            else out_lengths
        )
        return pred, out_lengths, span

    def forward(
        self, batch: Mapping[str, Any], projector: Optional[nn.Module] = None, teacher: bool = False
    ) -> Dict[str, Any]:
        """Training forward on a ``Stage2Collator`` batch: logits where a response label is, and those labels.

        ``teacher``: also the frozen LLM's logits with the transcript's token embeddings in the speech span
        (:meth:`teacher_logits`, no gradient) at the same response positions, for the items that have a
        transcript: ``teacher_logits`` [M, V] row for row with the student's rows ``logits[teacher_rows]``.
        Inside ``forward`` so that one FSDP root forward covers both."""
        pred, out_lengths, span = self.project(batch["features"], batch["lengths"], projector)
        inputs = self.build_inputs(
            [pred[b, : int(n)] for b, n in enumerate(span)], batch["prefix"], batch["suffix"], batch["response"]
        )
        labels = inputs.labels
        predicts = response_positions(labels)
        out = {
            "logits": forward_embeds(self.llm, inputs.embeds, positions=predicts),
            "labels": labels[:, 1:][predicts[:, :-1]],
            "pred": pred,
            "out_lengths": out_lengths,
            "tokens": int((labels != IGNORE_INDEX).sum()),
            "speech_vectors": int(span.sum()),
        }
        if teacher:
            has = batch["has_mse"].to(self.device)
            out["teacher_rows"] = has[predicts.nonzero(as_tuple=True)[0]]  # each logit row's item has a transcript
            out["teacher_logits"] = self.teacher_logits(batch)
        return out

    @torch.no_grad()
    def teacher_logits(self, batch: Mapping[str, Any]) -> Tensor:
        """The behaviour-alignment teacher: the frozen LLM (LoRA adapters off) reading ``prefix | transcript
        token embeddings | suffix | response`` for the items that have a transcript (``has_mse``; the
        transcript is their stage-1 target ids, ``num_words`` of them); fp32 logits [M, V] at the positions
        that predict a response token, in the order of the student's. The response and so the number of
        such positions per item is the same as the student's; only the span (and so the offset) differs."""
        keep = [b for b, h in enumerate(batch["has_mse"].tolist()) if h]
        if not keep:
            return torch.zeros(0, int(self.embedding.shape[0]), device=self.device)
        ids, words = batch["target_ids"], batch["num_words"]
        spans = [embed_tokens(self.llm, ids[b, : int(words[b])].to(self.device)) for b in keep]
        inputs = self.build_inputs(
            spans,
            [batch["prefix"][b] for b in keep],
            [batch["suffix"][b] for b in keep],
            [batch["response"][b] for b in keep],
        )
        with adapters_off(self.llm):
            return forward_embeds(self.llm, inputs.embeds, positions=response_positions(inputs.labels))

    # ------------------------------------------------------------------ generation
    def prompt_parts(self, instruction: Optional[str] = None) -> PromptParts:
        """The prompt's token ids before and after the speech; ``instruction`` replaces the template's
        (an instruction prompt, no forced answer prefix)."""
        return split_prompt(self.chat, self.template if instruction is None else self.instruction_template(instruction))

    def instruction_template(self, instruction: str) -> PromptTemplate:
        user = self.template.user if "{instruction}" in self.template.user else INSTRUCTION_USER
        return PromptTemplate(user=user, instruction=instruction, system=self.template.system)

    @torch.no_grad()
    def generate(
        self,
        spans: Sequence[Tensor],
        parts: Sequence[PromptParts],
        max_new_tokens: int = 150,
        stop_at_newline: Optional[bool] = None,
        **decoding,
    ) -> List[GenerationResult]:
        """Greedy decoding (KV cache, batched) from each prompt with its span filled in."""
        inputs = self.build_inputs(spans, [p.prefix for p in parts], [p.suffix for p in parts])
        newline = self.stop_at_newline if stop_at_newline is None else stop_at_newline
        return greedy_generate(
            self.llm,
            inputs.prompts(),
            max_new_tokens=max_new_tokens,
            stop_ids=self.chat.stop_ids,
            stop_at_newline=newline,
            newline_ids=self.newline_ids() if newline else None,
            **decoding,
        )

    def newline_ids(self):
        if self._newlines is None:
            self._newlines = newline_token_ids(self.chat)
        return self._newlines

    def answer_text(self, ids: Sequence[int], stop_at_newline: Optional[bool] = None) -> str:
        """Decoded answer; with stop_at_newline, its first non-empty line."""
        text = self.chat.decode(ids, skip_special_tokens=True)
        if self.stop_at_newline if stop_at_newline is None else stop_at_newline:
            return next((line.strip() for line in text.splitlines() if line.strip()), "")
        return text.strip()

    def text_span(self, text: str) -> Tensor:
        """Token embeddings of ``text`` as a span (the text topline, the ASR cascade)."""
        return embed_tokens(self.llm, torch.tensor(self.chat.encode_text(text) or [self.pad_id], device=self.device))

    # ------------------------------------------------------------------ audio in
    def sfm(self):
        """The frozen SFM the projector's features came from (as the checkpoint records), loaded once."""
        if self._sfm is None:
            if not self.features or "sfm" not in self.features:
                raise ValueError(
                    f"{self.checkpoint} does not record which speech encoder made its features; "
                    "extract features with speechmapper_extract and use speechmapper_generate"
                )
            from speechmapper_tune.sfm import build_sfm

            s = dict(self.features["sfm"])
            self._sfm = build_sfm(
                s.pop("name"), path=s.pop("path", None), layer=s.pop("layer", None), device=self.device, **s
            )
        return self._sfm

    @torch.no_grad()
    def audio_features(self, waves: Sequence[np.ndarray]) -> List[Tensor]:
        """16-kHz mono waves -> the features the projector reads: SFM frames averaged by k, stored
        precision (fp16) as in training."""
        from speechmapper_tune.data.extract import average_frames

        k = int(self.features.get("average_frames", 1))
        dtype = getattr(torch, self.features.get("storage_dtype", "float16"))
        return [
            torch.from_numpy(average_frames(f.float().cpu().numpy(), k)).to(dtype).float()
            for f in self.sfm().encode(list(waves))
        ]

    @torch.no_grad()
    def speech_spans(self, features: Sequence[Tensor]) -> List[Tensor]:
        """Projector vectors for each feature sequence [n_i, F]."""
        from speechmapper_tune.data.features import pad_features

        feats, lengths = pad_features(list(features))
        pred, _, span = self.project(feats, lengths)
        return [pred[b, : int(n)] for b, n in enumerate(span)]

    def prompt_embeds(self, audio: Audio, instruction: Optional[str] = None) -> Tensor:
        """The ``[seq_len, dim]`` prompt one recording gives the LLM: vLLM's
        ``LLM(..., enable_prompt_embeds=True).generate({"prompt_embeds": t})`` takes it as is."""
        span = self.speech_spans(self.audio_features([load_wave(audio)]))[0]
        parts = self.prompt_parts(instruction)
        return self.build_inputs([span], [parts.prefix], [parts.suffix]).prompts()[0]

    @torch.no_grad()
    def answer_waves(
        self,
        waves: Sequence[np.ndarray],
        instruction: Optional[str] = None,
        batch_size: int = 8,
        max_new_tokens: int = 150,
        on_batch: Optional[Callable[[int], None]] = None,
    ) -> List[str]:
        """One answer per 16-kHz wave (each short enough for the SFM), batched by length."""
        parts = self.prompt_parts(instruction)
        newline = self.stop_at_newline and instruction is None
        order = sorted(range(len(waves)), key=lambda i: len(waves[i]))
        out: List[str] = [""] * len(waves)
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            spans = self.speech_spans(self.audio_features([waves[i] for i in idx]))
            for i, res in zip(idx, self.generate(spans, [parts] * len(idx), max_new_tokens, stop_at_newline=newline)):
                out[i] = self.answer_text(res.ids, newline)
            if on_batch is not None:
                on_batch(len(idx))
        return out

    def transcribe(self, audio: Union[Audio, Sequence[Audio]], **kwargs) -> List[str]:
        """Text of each recording (any length: long ones are cut at pauses and the pieces' texts joined)."""
        return self.answer_recordings(_waves(audio), None, **kwargs)

    def ask(self, instruction: str, audio: Union[Audio, Sequence[Audio]], **kwargs) -> List[str]:
        """The LLM's answer to ``instruction`` about each recording."""
        return self.answer_recordings(_waves(audio), instruction, **kwargs)

    def answer_recordings(
        self,
        waves: Sequence[np.ndarray],
        instruction: Optional[str] = None,
        max_segment_seconds: float = 10.0,
        progress=None,
        vad: bool = True,
        **kwargs,
    ) -> List[str]:
        """Recordings of any length: their speech (Silero VAD; ``vad=False``: the whole recording) cut at
        pauses into pieces the SFM takes, answered in length-sorted batches, the pieces' texts joined in
        order; no speech gives "". ``progress``: a tqdm bar (its total is set here)."""
        from speechmapper_tune.audio import segment_recording

        pieces = [[w[a:b] for a, b in segment_recording(w, max_segment_seconds, vad)] for w in waves]
        flat = [p for ps in pieces for p in ps]
        if progress is not None:
            progress.total = len(flat)
            progress.refresh()
        texts = self.answer_waves(
            flat, instruction, on_batch=progress.update if progress is not None else None, **kwargs
        )
        out, k = [], 0
        for ps in pieces:
            out.append(" ".join(t for t in texts[k : k + len(ps)] if t))
            k += len(ps)
        return out


def response_positions(labels: Tensor) -> Tensor:
    """bool [B, L]: the positions that predict a response label (position t predicts label t+1), where the
    training forward computes logits (the LM head is skipped elsewhere)."""
    return F.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)


def _waves(audio: Union[Audio, Sequence[Audio]]) -> List[np.ndarray]:
    return [load_wave(a) for a in ([audio] if isinstance(audio, (str, Path, np.ndarray, tuple)) else audio)]


def load_wave(audio: Audio) -> np.ndarray:
    """A path (any format soundfile reads), an (array, sample_rate) pair, or a 16-kHz mono array."""
    from speechmapper_tune.audio import read_audio, to_mono_16k

    if isinstance(audio, (str, Path)):
        return read_audio(audio)
    if isinstance(audio, tuple):
        return to_mono_16k(audio[0], int(audio[1]))
    return to_mono_16k(audio, 16000)
