"""Stage-2 data: instruction prompts with a speech span, responses, and stage-1 MSE targets.

A prompt is rendered once per example with the model's own chat format and split at the
speech placeholder: ``prefix`` (everything before the speech), ``suffix`` (everything after
it, up to and including the assistant header and any forced answer prefix). The response
tokens end with the end-of-turn token. The speech span's length is only known once the
projector has run (trailing pad vectors may be cut), so the recipe assembles
``prefix | speech | suffix | response`` per batch (``assemble_batch``); labels are
IGNORE_INDEX on the prompt and speech positions, and the response tokens after it.

Templates live in config (paper appendix B.3): the user turn is ``prefix + task + suffix``
with ``{speech}`` marking where the speech goes and ``{instruction}`` the task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from speechmapper_tune.data.augment import FeatureMasking
from speechmapper_tune.data.features import load_item_features, pad_features
from speechmapper_tune.data.manifest import FeatureItem, SkipCounter
from speechmapper_tune.data.stage1 import TARGET_TEXTS
from speechmapper_tune.losses import IGNORE_INDEX, build_stage1_target_ids
from speechmapper_tune.textio import read_lines

SPEECH = "{speech}"
# row fields kept with an example for evaluation: SQA's context, ST's target language, and the answer the
# LLM gave to another sentence's transcript (self-generated held-out rows: the chance-agreement reference)
META_KEYS = ("context", "target_lang", "shuffled_answer")


@dataclass
class PromptTemplate:
    """A chat prompt around the speech: ``user`` holds ``{speech}`` and may hold ``{instruction}``."""

    user: str
    instruction: str = ""
    system: Optional[str] = None
    assistant_prefix: str = ""  # forced answer prefix (paper B.3), part of the prompt
    instructions: Dict[str, str] = field(default_factory=dict)  # per target language (ST, paper B.3)

    def __post_init__(self):
        # a YAML override like prompt.assistant_prefix=Answer: parses to a mapping, not a string
        for name in ("user", "instruction", "system", "assistant_prefix"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(
                    f"prompt.{name} must be a string, got {type(value).__name__} {value!r} "
                    f"(quote it on the command line, e.g. 'prompt.{name}=\"Answer: \"')"
                )

    def messages(self, instruction: Optional[str] = None) -> List[Dict[str, str]]:
        if self.user.count(SPEECH) != 1:
            raise ValueError(f"prompt user template must contain {SPEECH} exactly once: {self.user!r}")
        text = self.user.replace("{instruction}", instruction if instruction is not None else self.instruction)
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": text.replace(SPEECH, "<speech>")}]


@dataclass
class PromptParts:
    prefix: List[int]
    suffix: List[int]


def split_prompt(chat, template: PromptTemplate, instruction: Optional[str] = None) -> PromptParts:
    """Token ids before and after the speech span, rendered by the model's chat format."""
    ids, start = chat.render_with_speech(template.messages(instruction), 0, placeholder="<speech>")
    suffix = ids[start:]
    if template.assistant_prefix:
        suffix = suffix + chat.encode_text(template.assistant_prefix)
    return PromptParts(ids[:start], suffix)


@dataclass
class Stage2Example:
    item: FeatureItem
    prompt: PromptParts
    response: List[int]  # response tokens + end of turn
    target_ids: List[int]  # stage-1 targets (transcript tokens) for the MSE term; [] = no MSE
    out_length: int
    task: str = "asr"
    meta: Dict[str, str] = field(default_factory=dict)  # instruction, context, target_lang: kept for evaluation
    row_id: str = ""  # the instruction row's id: one cut carries several SQA questions ("" = the cut's id)

    @property
    def id(self) -> str:
        return self.row_id or self.item.id


def response_ids(chat, text: str) -> List[int]:
    return chat.encode_text(text) + [chat.eos_id]


def prepare_asr_examples(
    items: Sequence[FeatureItem],
    chat,
    template: PromptTemplate,
    output_length: Callable[[int], int],
    max_seq_len: int,
    skipped: SkipCounter,
    generation: bool = False,
    target_text: str = "normalized",
) -> List[Stage2Example]:
    """ASR instruction examples: the response is the normalized transcript (paper: LibriSpeech IT), or
    with ``target_text="written"`` the transcript as written (response and MSE targets; not in the paper).
    ``generation``: only the prompt and speech must fit (the response is what gets generated)."""
    if target_text not in TARGET_TEXTS:
        raise ValueError(f"target_text={target_text!r}: expected one of {TARGET_TEXTS}")
    parts = split_prompt(chat, template)
    out = []
    for it in items:
        n_out = int(output_length(it.num_frames))
        text = (it.written or it.text) if target_text == "written" else it.text
        targets = [] if generation else chat.encode_text(text)  # the MSE term's targets: training only
        resp = response_ids(chat, text)
        ex = Stage2Example(it, parts, resp, targets, n_out)
        if _check(ex, max_seq_len, skipped, generation):
            out.append(ex)
    return out


def prepare_instruction_examples(
    path: str | Path,
    items_by_id: Dict[str, FeatureItem],
    chat,
    template: PromptTemplate,
    output_length: Callable[[int], int],
    max_seq_len: int,
    skipped: SkipCounter,
    task: str,
    generation: bool = False,
) -> List[Stage2Example]:
    """ST / SQA examples from JSON lines ``{"id", "features": <feature id>, "instruction", "answer"}``.

    Instead of ``instruction``, a row may give ``target_lang``: the template's instruction for
    that language is used (ST instructions are written in the target language, paper B.3).
    An optional ``"transcript"`` enables the MSE term for that example.
    """
    path = Path(path)
    out = []
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            # generation reads rows still without an answer (self-generated data before the LLM answers)
            fid, answer = row["features"], (row.get("answer") or "" if generation else row["answer"])
            instruction = row["instruction"] if "instruction" in row else template.instructions[row["target_lang"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path}, line {lineno}: expected JSON with features, answer and instruction "
                f"(or a target_lang among the prompt's instructions {sorted(template.instructions)}) ({e!r})"
            ) from e
        item = items_by_id.get(fid)
        if item is None:
            skipped.add("features id not in the feature manifest", str(row.get("id", fid)))
            continue
        targets = chat.encode_text(row["transcript"]) if row.get("transcript") and not generation else []
        meta = {"instruction": instruction, **{k: str(row[k]) for k in META_KEYS if k in row}}
        ex = Stage2Example(
            item,
            split_prompt(chat, template, instruction),
            response_ids(chat, answer),
            targets,
            int(output_length(item.num_frames)),
            task,
            meta,
            str(row.get("id", fid)),
        )
        if _check(ex, max_seq_len, skipped, generation):
            out.append(ex)
    return out


def _check(ex: Stage2Example, max_seq_len: int, skipped: SkipCounter, generation: bool = False) -> bool:
    total = len(ex.prompt.prefix) + ex.out_length + len(ex.prompt.suffix) + (0 if generation else len(ex.response))
    if ex.out_length < 1:
        skipped.add("too few frames for the projector", ex.id)
    elif total > max_seq_len:
        skipped.add(
            "prompt + speech longer than max_seq_len - max_new_tokens"
            if generation
            else "prompt + speech + response longer than max_seq_len",
            ex.id,
        )
    elif ex.target_ids and len(ex.target_ids) + 1 > ex.out_length:
        skipped.add("target longer than projector output", ex.id)
    else:
        return True
    return False


class Stage2Dataset(Dataset):
    """``augment`` (train only): None or ``{time_masks, time_width, feature_masks, feature_width}``,
    masking features per (seed, epoch, index), see :mod:`speechmapper_tune.data.augment`;
    call :meth:`set_epoch` before each epoch's iteration."""

    def __init__(self, examples: Sequence[Stage2Example], augment: Optional[Mapping] = None, seed: int = 0):
        self.examples = list(examples)
        self.masking = FeatureMasking.from_config(augment, seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Dict:
        ex = self.examples[i]
        feats, error = load_item_features(ex.item)
        if error:
            return {"id": ex.id, "error": error}
        if self.masking is not None:
            feats = self.masking(feats, self.epoch, i)
        return {"id": ex.id, "features": feats, "example": ex}


@dataclass
class Stage2Collator:
    output_length: Callable[[int], int]
    pad_id: int

    def __call__(self, samples: List[Dict]) -> Dict:
        good = [s for s in samples if "error" not in s]
        skipped = [(s["id"], s["error"]) for s in samples if "error" in s]
        if not good:
            return {"ids": [], "skipped": skipped}
        feats, lengths = pad_features([s["features"] for s in good])
        exs = [s["example"] for s in good]
        out_lengths = [ex.out_length for ex in exs]
        has_mse = torch.tensor([bool(ex.target_ids) for ex in exs])
        return {
            "ids": [s["id"] for s in good],
            "tasks": [ex.task for ex in exs],
            "features": feats,
            "lengths": lengths,
            "out_lengths": torch.tensor(out_lengths, dtype=torch.long),
            "target_ids": build_stage1_target_ids(
                [ex.target_ids or [self.pad_id] * 0 for ex in exs], out_lengths, self.pad_id
            ),
            "num_words": torch.tensor([len(ex.target_ids) for ex in exs], dtype=torch.long),
            "has_mse": has_mse,
            "prefix": [ex.prompt.prefix for ex in exs],
            "suffix": [ex.prompt.suffix for ex in exs],
            "response": [ex.response for ex in exs],
            "meta": [ex.meta for ex in exs],
            "skipped": skipped,
        }


@dataclass
class AssembledBatch:
    input_ids: Tensor  # [B, L] with placeholder ids on the speech span and pad_id after the end
    labels: Tensor  # [B, L] IGNORE_INDEX except the response tokens
    speech_starts: Tensor
    speech_lengths: Tensor
    placeholder_mask: Tensor
    seq_lengths: List[int] = field(default_factory=list)


def assemble_batch(
    prefix: Sequence[List[int]],
    suffix: Sequence[List[int]],
    response: Sequence[List[int]],
    speech_lengths: Sequence[int],
    placeholder_id: int,
    pad_id: int,
) -> AssembledBatch:
    """Right-padded ``prefix | speech placeholders | suffix | response`` with response-only labels."""
    seqs, labels, starts = [], [], []
    for p, s, r, n in zip(prefix, suffix, response, speech_lengths):
        seqs.append(list(p) + [placeholder_id] * int(n) + list(s) + list(r))
        labels.append([IGNORE_INDEX] * (len(p) + int(n) + len(s)) + list(r))
        starts.append(len(p))
    L = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), L), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(zip(seqs, labels)):
        ids[i, : len(x)] = torch.tensor(x)
        lab[i, : len(y)] = torch.tensor(y)
    starts_t = torch.tensor(starts, dtype=torch.long)
    lens_t = torch.tensor([int(n) for n in speech_lengths], dtype=torch.long)
    pos = torch.arange(L)[None, :]
    span = (pos >= starts_t[:, None]) & (pos < (starts_t + lens_t)[:, None])
    return AssembledBatch(ids, lab, starts_t, lens_t, span, [len(x) for x in seqs])
