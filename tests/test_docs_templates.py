"""The template example in the plugin guide works as printed: it registers, renders Zephyr's published format,
and its generation prompt is the training prefix."""

from __future__ import annotations

import re
import types

from conftest import ROOT, TINY_EXPERIMENT, TINY_ROWS
from fx import config
from fx.data.templating import encode, encode_prompt


def guide_example() -> types.ModuleType:
    guide = (ROOT / "docs" / "plugins.md").read_text()
    section = guide.split("## Writing a template", 1)[1].split("\n## ", 1)[0]
    source = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("fx_zephyr")
    exec(compile(source, "docs/plugins.md", "exec"), module.__dict__)
    return module


def test_guide_template_registers_and_renders(register_plugin, write_experiment):
    from fx.plugins.models.random import RandomModel

    plugins = register_plugin(guide_example(), "zephyr")
    entry = plugins["templates"]["zephyr"]
    assert entry.plugin == "zephyr"
    template = entry.cls(entry.cls.Settings(system_prompt="Be brief."))
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    rendered = template.render(conversation)
    assert rendered.text == ("<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n"
                             "<|user|>\n2+2?</s>\n<|assistant|>\n4</s>\n")
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["Hello!</s>", "4</s>"]

    tokenizer = RandomModel(RandomModel.Settings(dtype="float32")).tokenizer()
    template = entry.cls(entry.cls.Settings(), tokenizer)
    row, _ = encode(tokenizer, template.render(conversation), 4096)
    first = next(i for i, label in enumerate(row["labels"]) if label != -100)
    assert encode_prompt(tokenizer, template.prompt(conversation[:1])) == row["input_ids"][:first]

    exp = config.load(write_experiment(TINY_EXPERIMENT.replace('name = "llama2"', 'name = "zephyr"'), TINY_ROWS))
    assert exp.template.name == "zephyr" and exp.template.settings.system_prompt == "Answer with a number."
