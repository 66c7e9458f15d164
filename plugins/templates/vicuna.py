"""Template ``vicuna``: Vicuna v1.1, as FastChat's ``vicuna_v1.1`` conversation builds it.

``{system} USER: {user} ASSISTANT: {answer}</s>USER: {user} ASSISTANT:``
The system prompt defaults to Vicuna's own; each answer (from the space after ``ASSISTANT:``) and its ``</s>``
carry the loss. ``</s>`` is the tokenizer's end-of-sequence token (Llama's is exactly this).
"""

from __future__ import annotations

import json

import fx
from fx.data.ollama import Wrapping
from fx.data.templating import Message, Rendered, Template, content

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


# The same rendering as Vicuna.render, for tokenizers saved with a merged or exported model.
CHAT_TEMPLATE = """\
{%- if messages and messages[0]['role'] == 'system' %}
{%- set system = messages[0]['content'] %}
{%- set messages = messages[1:] %}
{%- else %}
{%- set system = """ + json.dumps(SYSTEM) + """ %}
{%- endif %}
{{- system + ' ' }}
{%- for message in messages %}
{%- if message['role'] == 'user' %}
{{- 'USER: ' + message['content'] + ' ASSISTANT:' }}
{%- elif message['role'] == 'assistant' %}
{{- ' ' + message['content'] + eos_token }}
{%- else %}
{{- raise_exception('vicuna has no place for a ' + message['role'] + ' message after the first') }}
{%- endif %}
{%- endfor %}
"""


class Vicuna(Template):
    description = "Vicuna v1.1: {system} USER: ... ASSISTANT: ...</s>"

    def render(self, messages: list[Message]) -> Rendered:
        system, turns = self.split_system(messages)
        text, spans = (SYSTEM if system is None else system) + " ", []
        for message in turns:
            if message["role"] == "user":
                text += f"USER: {content(message)} ASSISTANT:"
            else:
                start = len(text)
                text += f" {message['content']}{self.eos}"
                spans.append((start, len(text)))
        return Rendered(text, tuple(spans))

    def chat_template(self) -> str:
        return self.system_prelude() + CHAT_TEMPLATE

    def ollama_template(self) -> str:
        return Wrapping(system=("", " "), no_system=SYSTEM + " ", user=("USER: ", " ASSISTANT:"),
                        assistant=(" ", self.eos), generation="").go()


@fx.hookimpl
def fx_register_templates(register):
    register("vicuna", Vicuna)
