"""Every template: golden renderings from each format's published definition, loss on exactly the answers,
and generation prompts that tokenize to exactly the training prefix."""

from __future__ import annotations

import pytest

from fx.data.templating import encode, encode_prompt
from fx.hooks import manager

CONVERSATION = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]
SYSTEM = "Be brief."
TEMPLATES = ["llama2", "alpaca", "vicuna", "chatml", "native", "raw"]


def make(name: str, tokenizer=None, system: str | None = SYSTEM):
    cls = manager.get()["templates"][name].cls
    return cls(cls.Settings(system_prompt=system), tokenizer)


@pytest.fixture(scope="module")
def bundled_tokenizer():
    from fx.plugins.models.bundled import BundledModel

    return BundledModel(BundledModel.Settings()).tokenizer()


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from fx.plugins.models.random import RandomModel

    return RandomModel(RandomModel.Settings(dtype="float32")).tokenizer()


@pytest.fixture(params=["bundled", "tiny"])
def tokenizer(request, bundled_tokenizer, tiny_tokenizer):
    return bundled_tokenizer if request.param == "bundled" else tiny_tokenizer


# Reference strings, written from each format's published definition (Llama 2: Meta's chat_completion code;
# Alpaca: tatsu-lab/stanford_alpaca's PROMPT_DICT with the tatsu-lab/alpaca text's newline after the response
# header; Vicuna v1.1: FastChat's vicuna_v1.1 with sep " " and sep2 "</s>"; ChatML: OpenAI's chatml.md).
GOLDEN = {
    "llama2": (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! How can I help? </s>"
        "<s>[INST] What is 2+2? [/INST] 4 </s>"
    ),
    "alpaca": (
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello! How can I help?</s>"
        "\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n4</s>"
    ),
    "vicuna": "Be brief. USER: Hi ASSISTANT: Hello! How can I help?</s>USER: What is 2+2? ASSISTANT: 4</s>",
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    ),
    "raw": "Be brief.\nHi\nHello! How can I help?</s>\nWhat is 2+2?\n4</s>",
}
GOLDEN_SPANS = {
    "llama2": [" Hello! How can I help? </s>", " 4 </s>"],
    "alpaca": ["Hello! How can I help?</s>", "4</s>"],
    "vicuna": [" Hello! How can I help?</s>", " 4</s>"],
    "chatml": ["Hello! How can I help?<|im_end|>", "4<|im_end|>"],
    "raw": ["Hello! How can I help?</s>", "4</s>"],
}
GOLDEN_PROMPTS = {
    "llama2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! How can I help? </s>"
              "<s>[INST] What is 2+2? [/INST]",
    "alpaca": "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello! How can I help?</s>"
              "\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n",
    "vicuna": "Be brief. USER: Hi ASSISTANT: Hello! How can I help?</s>USER: What is 2+2? ASSISTANT:",
    "chatml": GOLDEN["chatml"][: -len("4<|im_end|>\n")],
    "raw": "Be brief.\nHi\nHello! How can I help?</s>\nWhat is 2+2?\n",
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_rendering(name):
    template = make(name)
    rendered = template.render(CONVERSATION)
    assert rendered.text == GOLDEN[name]
    assert [rendered.text[a:b] for a, b in rendered.spans] == GOLDEN_SPANS[name]
    assert template.prompt(CONVERSATION[:-1]) == GOLDEN_PROMPTS[name]


def test_golden_defaults_without_system_prompt():
    """Each format's own default: Vicuna's system sentence, Alpaca's preamble, no <<SYS>> or system block."""
    single = CONVERSATION[:2]
    assert make("vicuna", system=None).render(single).text == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Hi ASSISTANT: Hello! How can I help?</s>"
    )
    assert make("llama2", system=None).render(single).text == "<s>[INST] Hi [/INST] Hello! How can I help? </s>"
    assert make("chatml", system=None).render(single).text == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
    )
    assert make("alpaca", system=None).render(single).text == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nHi\n\n### Response:\nHello! How can I help?</s>"
    )


def test_golden_alpaca_with_input():
    row = [{"role": "user", "content": "Translate to French.", "input": "cheese"},
           {"role": "assistant", "content": "fromage"}]
    assert make("alpaca", system=None).render(row).text == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate to French."
        "\n\n### Input:\ncheese\n\n### Response:\nfromage</s>"
    )
    # formats without an input field put it after the instruction, a blank line apart
    assert "Translate to French.\n\ncheese<|im_end|>" in make("chatml").render(row).text


def test_native_equals_the_tokenizers_own(tokenizer):
    template = make("native", tokenizer)
    with_system = [{"role": "system", "content": SYSTEM}, *CONVERSATION]
    assert template.render(CONVERSATION).text == tokenizer.apply_chat_template(with_system, tokenize=False)
    assert template.prompt(CONVERSATION[:-1]) == tokenizer.apply_chat_template(
        with_system[:-1], tokenize=False, add_generation_prompt=True)


def test_end_marker_is_the_tokenizers_end_token(bundled_tokenizer):
    """With a tokenizer, the answer closes with its end-of-sequence token (Llama's is </s>)."""
    eos = bundled_tokenizer.eos_token
    for name in ("llama2", "alpaca", "vicuna", "raw"):
        rendered = make(name, bundled_tokenizer).render(CONVERSATION)
        assert all(rendered.text[a:b].endswith(eos) for a, b in rendered.spans), name


def _runs(ids, labels):
    """Contiguous runs of loss-bearing token ids."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("name", TEMPLATES)
def test_loss_on_exactly_the_answers(name, tokenizer):
    template = make(name, tokenizer)
    conversation = [*CONVERSATION, {"role": "user", "content": "And 3+3?"},
                    {"role": "assistant", "content": "6, of course."}]
    rendered = template.render(conversation)
    row, length = encode(tokenizer, rendered, 4096)
    assert length == len(row["input_ids"])
    runs = _runs(row["input_ids"], row["labels"])
    answers = [m["content"] for m in conversation if m["role"] == "assistant"]
    assert len(runs) == len(answers) == len(rendered.spans)
    for run, (a, b), answer in zip(runs, rendered.spans, answers):
        text = tokenizer.decode(run)
        assert text == rendered.text[a:b]
        assert answer in text and text.rstrip().endswith(tokenizer.eos_token if name != "chatml" else "<|im_end|>")
    # everything else is masked: the masked tokens decode to the text outside the spans
    masked = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label == -100])
    outside = "".join(rendered.text[b:a] for b, a in zip([0] + [e for _, e in rendered.spans],
                                                          [s for s, _ in rendered.spans] + [len(rendered.text)]))
    assert masked == outside


@pytest.mark.parametrize("name", TEMPLATES)
def test_truncation_keeps_labels_a_prefix(name, tokenizer):
    template = make(name, tokenizer)
    rendered = template.render(CONVERSATION)
    full, length = encode(tokenizer, rendered, 4096)
    first_answer = next(i for i, label in enumerate(full["labels"]) if label != -100)
    for cut in (first_answer, first_answer + 2, length - 2):
        row, untruncated = encode(tokenizer, rendered, cut)
        assert untruncated == length
        assert row["input_ids"] == full["input_ids"][:cut] and row["labels"] == full["labels"][:cut]
    row, _ = encode(tokenizer, rendered, first_answer)
    assert all(label == -100 for label in row["labels"])  # cut before the first answer: nothing to learn


@pytest.mark.parametrize("name", TEMPLATES)
def test_prompt_tokens_are_the_training_prefix(name, tokenizer):
    """Generation sees exactly the tokens training saw before each answer."""
    template = make(name, tokenizer)
    row, _ = encode(tokenizer, template.render(CONVERSATION), 4096)
    starts = [i for i, label in enumerate(row["labels"]) if label != -100 and (i == 0 or row["labels"][i - 1] == -100)]
    turns = [i for i, m in enumerate(CONVERSATION) if m["role"] == "assistant"]
    assert len(starts) == len(turns)
    for start, turn in zip(starts, turns):
        assert encode_prompt(tokenizer, template.prompt(CONVERSATION[:turn])) == row["input_ids"][:start]


@pytest.mark.parametrize("name", [n for n in TEMPLATES if n != "native"])
def test_prompt_must_end_with_user(name):
    with pytest.raises(ValueError, match="end with a user message"):
        make(name).prompt(CONVERSATION)


def test_llama2_parses_preformatted_text():
    text = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! How can I help? </s>"
    assert make("llama2").parse_text(text) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ]


def test_text_rows_the_template_cannot_parse_train_on_all_their_text():
    from fx.data.formats import Example
    from fx.data.tokenize import render

    text = "Once upon a time there was a tokenizer."
    assert render(make("raw"), Example(text=text)).spans == ((0, len(text)),)
    llama_text = "<s>[INST] Hi [/INST] Hello! </s>"
    rendered = render(make("llama2", system=None), Example(text=llama_text))
    assert [rendered.text[a:b] for a, b in rendered.spans] == [" Hello! </s>"]


class ScriptedModel:
    """A stand-in for a causal LM whose greedy continuation is fixed, to see where answers are cut."""

    def __init__(self, continuation: list[int]):
        import torch
        from transformers import GenerationConfig

        self.continuation = continuation
        self.generation_config = GenerationConfig()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.stop = None

    def eval(self):
        return self

    def parameters(self):
        return iter([self.weight])

    def generate(self, input_ids, eos_token_id, **kwargs):
        import torch

        self.stop = eos_token_id
        tail = torch.tensor([self.continuation] * input_ids.shape[0])
        return torch.cat([input_ids, tail], dim=1)


@pytest.mark.parametrize("name", ["chatml", "llama2", "vicuna"])
def test_generation_stops_at_the_templates_end_of_answer(name, bundled_tokenizer):
    """Generation stops on the token that closed answers in training, and the answer is cut there even when
    the model runs on (a tokenizer for which the marker is plain text)."""
    from fx.evaluation import generate

    template = make(name, bundled_tokenizer)
    answer_end = template.render(CONVERSATION[:2]).text
    marker = answer_end[answer_end.rindex("Hello! How can I help?") + len("Hello! How can I help?"):].strip()
    continuation = bundled_tokenizer(f" 4{marker}<|im_start|>user\nmore", add_special_tokens=False)["input_ids"]
    model = ScriptedModel(continuation)
    [answer] = generate(model, bundled_tokenizer, template, [CONVERSATION[:3]], max_new_tokens=8)
    assert answer == "4"
    assert bundled_tokenizer.convert_tokens_to_ids(template.stop) in model.stop


def test_chatml_cuts_answers_where_its_marker_is_plain_text(tiny_tokenizer):
    from fx.evaluation import generate

    template = make("chatml", tiny_tokenizer)
    as_text = tiny_tokenizer("4<|im_end|>\nmore", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert len(as_text) > 4  # the marker arrives as several plain-text tokens, as with a Llama tokenizer
    [answer] = generate(ScriptedModel(as_text), tiny_tokenizer, template, [CONVERSATION[:3]], max_new_tokens=8)
    assert answer == "4"


def test_chatml_matches_smollm2s_own_chatml_template(bundled_tokenizer):
    """SmolLM2's chat template is ChatML: with a system prompt both render, and prompt, the same text."""
    chatml, native = make("chatml", bundled_tokenizer), make("native", bundled_tokenizer)
    assert chatml.render(CONVERSATION) == native.render(CONVERSATION)
    assert chatml.prompt(CONVERSATION[:3]) == native.prompt(CONVERSATION[:3])
