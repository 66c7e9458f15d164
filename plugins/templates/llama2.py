"""Template ``llama2``: Llama 2 chat's format, exactly as Meta's reference code builds it.

``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST] ...``
There is no ``<<SYS>>`` block without a system prompt. Each answer and its ``</s>`` carry the loss.
"""

from __future__ import annotations

import re

import fx
from fx.templating import Message, Rendered, Template

TURN = re.compile(r"<s>\s*\[INST\]\s*(.*?)\s*\[/INST\](.*?)(?:</s>|$)", re.S)
SYS = re.compile(r"^<<SYS>>\n(.*?)\n<</SYS>>\n\n", re.S)

# The same rendering as Llama2._build, for tokenizers saved with a merged model.
CHAT_TEMPLATE = """\
{%- set system = none %}
{%- if messages and messages[0]['role'] == 'system' %}
{%- set system = messages[0]['content'] %}
{%- set messages = messages[1:] %}
{%- endif %}
{%- for message in messages %}
{%- if message['role'] == 'user' %}
{%- set user = message['content'] | trim %}
{%- if loop.first and system is not none %}
{%- set user = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + user %}
{%- endif %}
{{- '<s>[INST] ' + user + ' [/INST]' }}
{%- elif message['role'] == 'assistant' %}
{{- ' ' + (message['content'] | trim) + ' </s>' }}
{%- else %}
{{- raise_exception('llama2 has no place for a ' + message['role'] + ' message after the first') }}
{%- endif %}
{%- endfor %}
"""


class Llama2(Template):
    description = "Llama 2 chat: <s>[INST] <<SYS>>...<</SYS>> user [/INST] answer </s>"

    def _build(self, messages: list[Message], open_end: bool) -> Rendered:
        messages = self.with_system(messages)
        system = None
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        text, spans = "", []
        for i, message in enumerate(messages):
            if message["role"] == "user":
                user = message["content"].strip()
                if system is not None and i == 0:
                    user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
                text += f"<s>[INST] {user} [/INST]"
            elif message["role"] == "assistant":
                start = len(text)
                text += f" {message['content'].strip()} </s>"
                spans.append((start, len(text)))
            else:
                raise ValueError(f"llama2 has no place for a {message['role']!r} message after the first")
        if open_end and (not messages or messages[-1]["role"] != "user"):
            raise ValueError("a generation prompt must end with a user message")
        return Rendered(text, tuple(spans))

    def render(self, messages: list[Message]) -> Rendered:
        return self._build(messages, open_end=False)

    def prompt(self, messages: list[Message]) -> str:
        return self._build(messages, open_end=True).text

    def chat_template(self) -> str:
        return self.system_prelude() + CHAT_TEMPLATE

    def parse_text(self, text: str) -> list[Message] | None:
        """Split pre-formatted Llama 2 text (as in guanaco-llama2-1k) back into turns."""
        turns = TURN.findall(text)
        if not turns:
            return None
        messages: list[Message] = []
        for i, (user, answer) in enumerate(turns):
            if i == 0 and (m := SYS.match(user)):
                messages.append({"role": "system", "content": m.group(1)})
                user = user[m.end():]
            messages.append({"role": "user", "content": user.strip()})
            if answer.strip():
                messages.append({"role": "assistant", "content": answer.strip()})
        return messages if messages[-1]["role"] == "assistant" else None


@fx.hookimpl
def fx_register_templates(register):
    register("llama2", Llama2)
