"""Template ``llama2``: Llama 2 chat's format, exactly as Meta's reference code builds it.

``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST] ...``
There is no ``<<SYS>>`` block without a system prompt. Each answer and its ``</s>`` carry the loss.
``<s>`` and ``</s>`` are the tokenizer's own beginning and end tokens (Llama's are exactly these).
"""

from __future__ import annotations

import re

import fx
from fx.data.ollama import literal
from fx.data.templating import Message, Rendered, Template, content

TURN = re.compile(r"<s>\s*\[INST\]\s*(.*?)\s*\[/INST\](.*?)(?:</s>|$)", re.S)
SYS = re.compile(r"^<<SYS>>\n(.*?)\n<</SYS>>\n\n", re.S)

# The same rendering as Llama2.render, for tokenizers saved with a merged model.
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
{{- bos_token + '[INST] ' + user + ' [/INST]' }}
{%- elif message['role'] == 'assistant' %}
{{- ' ' + (message['content'] | trim) + ' ' + eos_token }}
{%- else %}
{{- raise_exception('llama2 has no place for a ' + message['role'] + ' message after the first') }}
{%- endif %}
{%- endfor %}
"""


# Ollama's Go template of the same prompts. Go's templates cannot trim, so messages are taken as they are: the
# same prompts for messages without leading or trailing whitespace (which fx's rendering strips).
GO_TEMPLATE = (
    "{{ $first := true }}{{ range .Messages }}{{ if eq .Role \"user\" }}BOS[INST] "
    "{{ if and $first $.System }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n{{ end }}{{ .Content }} [/INST]"
    "{{ else if eq .Role \"assistant\" }} {{ .Content }} EOS{{ end }}"
    "{{ if ne .Role \"system\" }}{{ $first = false }}{{ end }}{{ end }}"
)


class Llama2(Template):
    description = "Llama 2 chat: <s>[INST] <<SYS>>...<</SYS>> user [/INST] answer </s>"

    def render(self, messages: list[Message]) -> Rendered:
        system, turns = self.split_system(messages)
        text, spans = "", []
        for i, message in enumerate(turns):
            if message["role"] == "user":
                user = content(message).strip()
                if system is not None and i == 0:
                    user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
                text += f"{self.bos}[INST] {user} [/INST]"
            else:
                start = len(text)
                text += f" {message['content'].strip()} {self.eos}"
                spans.append((start, len(text)))
        return Rendered(text, tuple(spans))

    def chat_template(self) -> str:
        return self.system_prelude() + CHAT_TEMPLATE

    def ollama_template(self) -> str:
        return GO_TEMPLATE.replace("BOS", literal(self.bos)).replace("EOS", literal(self.eos))

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
