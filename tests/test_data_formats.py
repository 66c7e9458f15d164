"""Dataset formats: detection, column mapping, malformed rows reported by number, preference pairs, and
training through each format with the held-out prompt rendered exactly as training rendered it."""

from __future__ import annotations

import json

import pytest

import datasets
from conftest import TINY_EXPERIMENT, TINY_ROWS
from fx import config, pipeline
from fx.data.formats import to_examples
from fx.data.prepare import prepare
from fx.data.templating import encode, encode_prompt
from fx.data.tokenize import prompt_of, render
from fx.errors import ConfigError, UserError
from fx.hooks import manager
from fx.stages import builtin


def rows(items):
    return datasets.Dataset.from_list(items)


def test_alpaca_with_and_without_input():
    examples = to_examples(rows([
        {"instruction": "Translate.", "input": "cheese", "output": "fromage"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]), "auto", "data")
    assert examples[0].messages == [{"role": "user", "content": "Translate.", "input": "cheese"},
                                    {"role": "assistant", "content": "fromage"}]
    assert examples[1].messages == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]


def test_sharegpt_roles_and_extra_columns():
    [example] = to_examples(rows([{"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"},
    ], "id": 7}]), "auto", "data")
    assert example.messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                {"role": "assistant", "content": "A"}]
    assert example.extra == {"id": 7}


def test_columns_map_top_level_names_and_turn_keys():
    examples = to_examples(rows([{"question": "Q", "answer": "A"}]), "auto", "data",
                                   {"instruction": "question", "output": "answer"})
    assert examples[0].messages[-1] == {"role": "assistant", "content": "A"}
    examples = to_examples(rows([{"dialog": [{"role": "human", "text": "Q"}, {"role": "gpt", "text": "A"}]}]),
                                   "sharegpt", "data", {"conversations": "dialog", "from": "role", "value": "text"})
    assert [m["role"] for m in examples[0].messages] == ["user", "assistant"]


def test_contains_needs_every_expected_string_and_takes_one_string():
    """``expect`` is a list of strings that must all appear in the answer (case and spacing aside), or one string;
    a row without it is not scored."""
    from fx.evaluation import score

    def row(expect=None):
        return {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Quill"}],
                **({"expect": expect} if expect is not None else {})}

    # one dataset each: a column can't hold lists in some rows and strings in others
    examples = [e for r in (row(["Quill", "135"]), row(["Quill", "135"]), row("Quill"), row())
                for e in to_examples(rows([r]), "messages", "t")]
    answers = ["I am quill.", "I am Quill,  135M parameters.", "I'M  QUILL", "anything"]
    result = score("contains", answers, examples, ["Quill"] * 4)
    assert (result["contains_hits"], result["contains_total"], result["contains"]) == (2, 3, 0.6667)


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "expect": ["hello"]},
    {"prompt": "hi", "chosen": "hello", "rejected": "go away", "expect": ["hello"]},
    {"prompt": [{"role": "user", "content": "hi"}], "completion": "go away", "label": False},
], ids=["messages", "preference", "unpaired"])
def test_a_held_out_row_reads_back_as_itself(row):
    """heldout.jsonl's rows (fx.data.formats.to_row) are read back by format detection as the examples they were."""
    from fx.data.formats import to_row

    (example,) = to_examples(rows([row]), "auto", "t")
    (again,) = to_examples(rows([to_row(example)]), "auto", "heldout.jsonl")
    assert again == example


def test_preference_pairs_both_shapes():
    [plain] = to_examples(rows([{"prompt": "Q", "chosen": "good", "rejected": "bad"}]), "auto", "data")
    assert (plain.messages, plain.chosen, plain.rejected) == ([{"role": "user", "content": "Q"}], "good", "bad")
    [conversational] = to_examples(rows([{
        "prompt": [{"role": "user", "content": "Q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }]), "auto", "data")
    assert (conversational.chosen, conversational.rejected) == ("good", "bad")
    [sharegpt] = to_examples(rows([{
        "conversations": [{"from": "human", "value": "Q"}],
        "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"},
    }]), "auto", "data")
    assert (sharegpt.messages, sharegpt.chosen, sharegpt.rejected) == ([{"role": "user", "content": "Q"}],
                                                                       "good", "bad")


def test_malformed_rows_are_all_named():
    items = [{"instruction": "ok", "input": None, "output": "fine"}]
    items += [{"instruction": "" if i % 2 else "x", "input": None, "output": "" if i % 2 == 0 else "y"}
              for i in range(30)]
    with pytest.raises(UserError) as err:
        to_examples(rows(items), "alpaca", "data (train)")
    text = str(err.value)
    assert "30 row(s) don't fit the 'alpaca' format" in text
    assert ("row 2: 'output' must be a non-empty string" in text
            and "row 3: 'instruction' must be a non-empty string" in text)
    assert "row 21:" in text and "row 22:" not in text and "... and 10 more" in text


def test_malformed_turns_name_the_file_column():
    with pytest.raises(UserError, match=r"row 2: dialog\[1\] must have a 'from'"):
        to_examples(rows([
            {"dialog": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
            {"dialog": [{"from": "human", "value": "Q"}, {"from": "robot", "value": "A"}]},
        ]), "auto", "data", {"conversations": "dialog"})


def test_missing_and_unknown_columns():
    with pytest.raises(UserError, match=r"needs the column\(s\) 'answer'"):
        to_examples(rows([{"instruction": "Q", "output": "A"}]), "alpaca", "data", {"output": "answer"})
    with pytest.raises(UserError, match=r"data.columns.instructions: the 'alpaca' format has no column 'instructions'; "
                                        r"did you mean 'instruction'"):
        to_examples(rows([{"instruction": "Q", "output": "A"}]), "alpaca", "data", {"instructions": "q"})
    with pytest.raises(UserError, match="cannot tell the dataset's format"):
        to_examples(rows([{"q": "Q", "a": "A"}]), "auto", "data")


def test_columns_checked_when_the_experiment_is_loaded(write_experiment):
    path = write_experiment(TINY_EXPERIMENT.replace(
        'path = "rows.jsonl"', 'path = "rows.jsonl"\nformat = "alpaca"\ncolumns = {outputs = "a"}'), TINY_ROWS)
    with pytest.raises(ConfigError, match=r"data.columns.outputs: the 'alpaca' format has no column 'outputs'; "
                                          r"did you mean 'output'"):
        config.load(path)


def _as(fmt: str, row: dict) -> dict:
    question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
    if fmt == "messages":
        return row
    if fmt == "sharegpt":
        return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
                "expect": row["expect"]}
    if fmt == "alpaca":
        return {"question": question, "context": "", "answer": answer, "expect": row["expect"]}
    return {"text": f"<s>[INST] {question} [/INST] {answer} </s>", "expect": row["expect"]}


CASES = {  # format -> (template, extra [data] lines)
    "messages": ("chatml", ""),
    "sharegpt": ("vicuna", ""),
    "alpaca": ("alpaca", 'columns = {instruction = "question", input = "context", output = "answer"}'),
    "text": ("llama2", 'format = "text"'),
}


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_trains_through_each_format(fmt, write_experiment):
    template, data_lines = CASES[fmt]
    text = (TINY_EXPERIMENT.replace('name = "llama2"', f'name = "{template}"')
            .replace('path = "rows.jsonl"', f'path = "rows.jsonl"\n{data_lines}')
            .replace("max_steps = 12", "max_steps = 3")
            .replace('metric = "contains"', "enabled = false"))
    exp = config.load(write_experiment(text, [_as(fmt, r) for r in TINY_ROWS]))
    prep = prepare(exp)
    assert prep.held_out_examples
    for example in prep.held_out_examples:
        rendered = render(prep.template, example)
        conversation, answer = prompt_of(prep.template, example)
        prompt = prep.template.prompt(conversation)
        assert rendered.text[: rendered.spans[-1][0]] == prompt  # identical up to the answer
        assert "Answer with a number." in prompt  # the experiment's system prompt
        row, _ = encode(prep.tokenizer, rendered, 4096)
        first = next(i for i, label in enumerate(row["labels"]) if label != -100)
        assert encode_prompt(prep.tokenizer, prompt) == row["input_ids"][:first]
        assert answer in rendered.text[rendered.spans[-1][0]:]
    folder = pipeline.execute(exp, manager.get())
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3 and summary["template"] == template
    assert summary["train_loss"] > 0
    assert (folder / "lengths.png").read_bytes().startswith(b"\x89PNG")
    samples = (folder / "samples.md").read_text()
    assert all(f"{i}. {c[-1]['content']}" in samples for i, c in enumerate(builtin.sample_prompts(exp, prep)[0], 1))


def test_sft_refuses_preference_pairs(write_experiment):
    pairs = [{"prompt": f"What is {a}+1?", "chosen": str(a + 1), "rejected": str(a)} for a in range(8)]
    exp = config.load(write_experiment(TINY_EXPERIMENT, pairs))
    with pytest.raises(UserError, match="preference pairs .* method 'qlora_sft' trains on one answer per row"):
        prepare(exp)
