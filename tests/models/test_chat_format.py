"""Chat rendering must equal each model's own chat template, token for token.

SmolLM2 is checked against transformers' ``apply_chat_template`` on the real tokenizer.
Llama-3.1 has no offline tokenizer: its published chat template (fixture below) is run by
transformers and raw jinja2 over a tiny byte-level BPE with Llama-3's special tokens.
"""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from speechmapper_tune.assets import smollm2_dir
from speechmapper_tune.models.chat_format import ChatTokenizer

# Llama-3.1-8B-Instruct tokenizer_config.json "chat_template", verbatim (public copies, e.g.
# github.com code embedding meta-llama/Llama-3.1-8B-Instruct's template; Llama 3.2 differs:
# strftime_now date and no builtin_tools).
LLAMA31_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# The canonical ChatML template (no default system message, no BOS).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<|eom_id|>", "<|finetune_right_pad_id|>", "<|python_tag|>",
]  # fmt: skip

ASR = "Repeat the previous text between the quotes in its entirety just once and nothing else."
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2024 + 17?"}],
    [
        {"role": "user", "content": "Translate: bonjour"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "  And 'au revoir'?\n\n"},
    ],
    [
        {"role": "system", "content": "  Be exact.  \n"},
        {"role": "user", "content": f'"the cat sat on the mat"\n{ASR}'},
        {"role": "assistant", "content": "the cat sat on the mat"},
        {"role": "user", "content": "Ünïcödé ok? 東京 — yes…"},
    ],
]
SPEECH_CONVERSATIONS = [
    [{"role": "user", "content": f'"<speech>"\n{ASR}'}],
    [{"role": "system", "content": "Listen."}, {"role": "user", "content": "<speech>"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yes?"},
        {"role": "user", "content": f"{ASR} <speech>"},
    ],
]


def _with_text(conversation, old, new):
    return [{**m, "content": m["content"].replace(old, new)} for m in conversation]


# ----------------------------------------------------------------------------- SmolLM2 (real)
@pytest.fixture(scope="module")
def smol():
    path = smollm2_dir()
    return path, ChatTokenizer.from_dir(path, "smollm2"), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_smollm2_matches_apply_chat_template(smol, conversation, generation_prompt):
    _, ours, hf = smol
    expected = hf.apply_chat_template(
        conversation, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
    )
    assert ours.render(conversation, generation_prompt) == expected
    assert ours.render_text(conversation, generation_prompt) == hf.apply_chat_template(
        conversation, add_generation_prompt=generation_prompt, tokenize=False
    )


def test_smollm2_special_ids(smol):
    path, ours, _ = smol
    assert (ours.bos_id, ours.eos_id, ours.stop_ids, ours.pad_id) == (1, 2, (2,), 16)
    assert ours.special_ids["<|endoftext|>"] == 0 and ours.special_ids["<empty_output>"] == 16
    assert ours.vocab_size == 49152
    with pytest.raises(ValueError, match="ends a turn"):
        ChatTokenizer.from_dir(path, "smollm2", pad_token="<|im_end|>")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ChatTokenizer.from_dir(path, "smollm2", pad_token="<no_such_token>")
    assert ChatTokenizer.from_dir(path, "chatml").pad_id is None  # no default pad for plain ChatML


def test_encode_text_has_no_specials_and_round_trips(smol):
    _, ours, hf = smol
    text = "the quick brown fox, 1984 times"
    ids = ours.encode_text(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert not set(ids) & set(ours.special_ids.values())
    assert ours.decode(ids) == text


def test_plain_chatml_matches_canonical_template(smol):
    path, _, hf = smol
    ours = ChatTokenizer.from_dir(path, "chatml")
    for conversation in CONVERSATIONS:
        expected = hf.apply_chat_template(
            conversation, chat_template=CHATML_TEMPLATE, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert ours.render(conversation) == expected


def test_template_format_uses_the_directory_template(smol):
    path, ours, _ = smol
    generic = ChatTokenizer.from_dir(path, "template")
    for conversation in CONVERSATIONS:
        assert generic.render(conversation, False) == ours.render(conversation, False)


@pytest.mark.parametrize("conversation", SPEECH_CONVERSATIONS)
@pytest.mark.parametrize("speech_len", [0, 1, 7])
def test_smollm2_speech_span(smol, conversation, speech_len):
    _, ours, _ = smol
    ids, start = ours.render_with_speech(conversation, speech_len)
    if speech_len:  # the same prompt with the pad token written out in text tokenizes identically
        assert ids == ours.render(_with_text(conversation, "<speech>", "<empty_output>" * speech_len))
    assert ids[start : start + speech_len] == [16] * speech_len
    empty, empty_start = ours.render_with_speech(conversation, 0)
    assert empty_start == start and ids == empty[:start] + [16] * speech_len + empty[start:]


def test_speech_placeholder_errors(smol):
    _, ours, _ = smol
    with pytest.raises(ValueError, match="exactly once.*found 0"):
        ours.render_with_speech([{"role": "user", "content": "no speech"}], 3)
    with pytest.raises(ValueError, match="found 2"):
        ours.render_with_speech([{"role": "user", "content": "<speech> <speech>"}], 3)
    with pytest.raises(ValueError, match="speech_len"):
        ours.render_with_speech([{"role": "user", "content": "<speech>"}], -1)
    with pytest.raises(ValueError, match="string 'role' and 'content'"):
        ours.render([{"role": "user"}])
    ids, start = ours.render_with_speech([{"role": "user", "content": "<audio>"}], 2, placeholder="<audio>", fill_id=5)
    assert ids[start : start + 2] == [5, 5]


# ----------------------------------------------------------------------------- Llama-3.1 (template)
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny byte-level BPE with Llama-3's specials, saved with the Llama-3.1 template."""
    path = tmp_path_factory.mktemp("llama31_tok")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=LLAMA3_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    corpus = ["Cutting Knowledge Date: December 2023", "Today Date: 26 Jul 2024", "system user assistant", ASR]
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in LLAMA3_SPECIALS}
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>",
                "chat_template": LLAMA31_TEMPLATE,
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )
    eos = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]  # as Llama-3.1's generation_config
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return path, ChatTokenizer.from_dir(path, "llama3"), AutoTokenizer.from_pretrained(path), ids


def _jinja_render(conversation, add_generation_prompt):
    """The template run the way transformers runs it (sandbox, trim_blocks, lstrip_blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(LLAMA31_TEMPLATE).render(
        messages=conversation, add_generation_prompt=add_generation_prompt, bos_token="<|begin_of_text|>"
    )


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_llama3_matches_llama31_template(llama, conversation, generation_prompt):
    _, ours, hf, _ = llama
    text = _jinja_render(conversation, generation_prompt)
    assert ours.render_text(conversation, generation_prompt) == text
    expected = hf.apply_chat_template(
        conversation, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
    )
    ids = ours.render(conversation, generation_prompt)
    assert ids == expected
    assert ours.decode(ids) == text  # byte-level BPE is lossless: whitespace included


def test_llama3_preamble_and_trim(llama):
    _, ours, _, _ = llama
    text = ours.render_text([{"role": "user", "content": "  hi \n"}], True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_llama3_special_ids(llama):
    path, ours, _, ids = llama
    assert ours.bos_id == ids["<|begin_of_text|>"] and ours.eos_id == ids["<|eot_id|>"]
    assert set(ours.stop_ids) == {ids["<|eot_id|>"], ids["<|eom_id|>"], ids["<|end_of_text|>"]}
    assert ours.pad_id == ids["<|finetune_right_pad_id|>"]
    with pytest.raises(ValueError, match="BOS"):
        ChatTokenizer.from_dir(path, "llama3", pad_token="<|begin_of_text|>")


@pytest.mark.parametrize("conversation", SPEECH_CONVERSATIONS)
def test_llama3_speech_span(llama, conversation):
    _, ours, _, ids = llama
    pad = ids["<|finetune_right_pad_id|>"]
    rendered, start = ours.render_with_speech(conversation, 5)
    assert rendered == ours.render(_with_text(conversation, "<speech>", "<|finetune_right_pad_id|>" * 5))
    assert rendered[start : start + 5] == [pad] * 5
    assert rendered[start - 1] != pad and (start + 5 == len(rendered) or rendered[start + 5] != pad)


def test_llama3_template_format_agrees(llama):
    path, ours, _, _ = llama
    generic = ChatTokenizer.from_dir(path, "template")
    for conversation in CONVERSATIONS:
        assert generic.render(conversation) == ours.render(conversation)


def test_unknown_format_is_refused(smol):
    path, _, _ = smol
    with pytest.raises(ValueError, match="unknown chat_format"):
        ChatTokenizer.from_dir(path, "alpaca")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        ChatTokenizer.from_dir(path / "nowhere", "chatml")
