"""Template ``chatml``: OpenAI's ChatML, as Qwen, SmolLM and many fine-tunes use it.

``<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n``
No system block without a system prompt. Each answer and its ``<|im_end|>`` carry the loss; the generation
prompt ends with ``<|im_start|>assistant\\n``.
"""

from __future__ import annotations

import fx
from fx.data.ollama import Wrapping
from fx.data.templating import Message, Rendered, Template, content, ends_with_user

# The same rendering as ChatML.render and .prompt, for tokenizers saved with a merged or exported model.
CHAT_TEMPLATE = """\
{%- for message in messages %}
{%- if message['role'] == 'system' and not loop.first %}
{{- raise_exception('chatml has no place for a system message after the first') }}
{%- endif %}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


class ChatML(Template):
    description = "ChatML: <|im_start|>role\\n...<|im_end|>"
    stop = "<|im_end|>"

    def _build(self, messages: list[Message], generation: bool) -> Rendered:
        system, turns = self.split_system(messages)
        text = "" if system is None else f"<|im_start|>system\n{system}<|im_end|>\n"
        spans = []
        for message in turns:
            if message["role"] == "user":
                text += f"<|im_start|>user\n{content(message)}<|im_end|>\n"
            else:
                text += "<|im_start|>assistant\n"
                start = len(text)
                text += f"{message['content']}<|im_end|>"
                spans.append((start, len(text)))
                text += "\n"
        if generation:
            text += "<|im_start|>assistant\n"
        return Rendered(text, tuple(spans))

    def render(self, messages: list[Message]) -> Rendered:
        return self._build(messages, generation=False)

    def prompt(self, messages: list[Message]) -> str:
        ends_with_user(messages)
        return self._build(messages, generation=True).text

    def chat_template(self) -> str:
        return self.system_prelude() + CHAT_TEMPLATE

    def ollama_template(self) -> str:
        return Wrapping(system=("<|im_start|>system\n", "<|im_end|>\n"), no_system="",
                        user=("<|im_start|>user\n", "<|im_end|>\n"),
                        assistant=("<|im_start|>assistant\n", "<|im_end|>\n"),
                        generation="<|im_start|>assistant\n").go()


@fx.hookimpl
def fx_register_templates(register):
    register("chatml", ChatML)
