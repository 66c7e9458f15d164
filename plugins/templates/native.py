"""Template ``native``: the tokenizer's own chat template (``tokenizer.apply_chat_template``).

The loss spans are found by rendering the conversation up to each answer with the generation prompt and
through that answer; the answer is what the second adds to the first.
"""

from __future__ import annotations

import fx
from fx.data.ollama import probe
from fx.data.templating import Message, Rendered, Template, content
from fx.errors import UserError


class Native(Template):
    description = "the tokenizer's own chat template"

    def _chat(self, messages: list[Message], generation: bool) -> str:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise UserError("template 'native' needs a tokenizer with a chat template; "
                            "this model has none (choose another template)")
        plain = [{"role": m["role"], "content": content(m)} for m in messages]
        return self.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation)

    def render(self, messages: list[Message]) -> Rendered:
        messages = self.with_system(messages)
        text = self._chat(messages, generation=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._chat(messages[:i], generation=True)
            through = self._chat(messages[: i + 1], generation=False)
            if not text.startswith(through) or not through.startswith(before):
                raise UserError("template 'native': the tokenizer's chat template does not render conversations "
                                "turn by turn, so the answer spans cannot be found; choose another template")
            end = len(through.rstrip())
            spans.append((len(before), end))
        return Rendered(text, tuple(spans))

    def prompt(self, messages: list[Message]) -> str:
        return self._chat(self.with_system(messages), generation=True)

    def ollama_template(self) -> str:
        """The tokenizer's chat template as a Go template, where it wraps each message in fixed text (ChatML-like
        formats such as SmolLM2's do); refused otherwise."""
        return probe(self._chat, "native").go()

    def chat_template(self) -> str | None:
        own = getattr(self.tokenizer, "chat_template", None)
        return self.system_prelude() + own if isinstance(own, str) else None


@fx.hookimpl
def fx_register_templates(register):
    register("native", Native)
