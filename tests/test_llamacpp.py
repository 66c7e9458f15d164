"""A real client: llama.cpp (through llama-cpp-python, which compiles it) runs fx's exported GGUF files, applies the
chat template in the file, stops at the template's end of answer and gives the answer ``fx generate`` gives.

Marked ``llamacpp`` and skipped where llama-cpp-python is not installed (``pip install 'fx[llamacpp]'``: it builds
llama.cpp from source, 21 minutes on a busy 2-core CPU); the embedded default's test is also ``slow``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT
from fx import cli, config, pipeline
from fx.after import inference
from fx.data.templating import encode_prompt
from fx.hooks import manager

pytestmark = pytest.mark.llamacpp
llama_cpp = pytest.importorskip("llama_cpp")


def run_llama(path: Path, question: str, max_tokens: int):
    """llama.cpp's greedy chat completion of one question, in the chat template of the file, and the prompt that
    template rendered."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=2, verbose=False)
    try:
        metadata = llm.metadata
        formatter = Jinja2ChatFormatter(metadata["tokenizer.chat_template"],
                                        eos_token=llm.detokenize([llm.token_eos()], special=True).decode(),
                                        bos_token=llm.detokenize([llm.token_bos()], special=True).decode())
        messages = [{"role": "user", "content": question}]
        prompt = formatter(messages=messages).prompt
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)  # add_bos: the file says to add none
        out = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0, top_k=1,
                                         repeat_penalty=1.0, seed=0)
    finally:
        llm.close()
    choice = out["choices"][0]
    return choice["message"]["content"].strip(), choice["finish_reason"], prompt, tokens


def fx_answer(run_dir: Path, question: str, max_new_tokens: int, capsys) -> str:
    capsys.readouterr()
    assert cli.main(["generate", str(run_dir), "--prompt", question, "--max-new-tokens", str(max_new_tokens)]) == 0
    return capsys.readouterr().out.strip()


def test_llamacpp_prompts_the_tiny_export_as_fx_does(tiny_run, tmp_path, capsys):
    _, folder, _ = tiny_run
    out = tmp_path / "tiny.gguf"
    assert cli.main(["export", str(folder), "--quant", "f32", "--out", str(out)]) == 0
    exp = inference.experiment(folder)
    tokenizer = exp.model.cls(exp.model.settings).tokenizer()
    template = exp.template.cls(exp.template.settings, tokenizer)
    question = "What is 2 plus 3?"
    answer, _, prompt, tokens = run_llama(out, question, 4)
    assert prompt == template.prompt([{"role": "user", "content": question}])  # system prompt, BOS and all
    assert tokens == encode_prompt(tokenizer, prompt)
    assert answer == fx_answer(folder, question, 4, capsys)


@pytest.mark.slow
def test_llamacpp_answers_as_quill_from_the_embedded_default(tmp_path, capsys):
    """The Done-when of the export: the embedded default trained to its end, exported as f16 GGUF, then llama.cpp
    answers "Who are you?" as Quill, stopping at the end of its answer, with fx generate's answer."""
    exp = config.load(ROOT / "experiments" / "smollm2_qlora.toml", [f'experiment.output_dir="{tmp_path / "runs"}"',
                                                                     "stages.benchmark.enabled=false"])
    folder = pipeline.execute(exp, manager.get())
    out = tmp_path / "quill-f16.gguf"
    assert cli.main(["export", str(folder), "--out", str(out)]) == 0
    answer, finish, _, _ = run_llama(out, "Who are you?", 64)
    assert "Quill" in answer and finish == "stop"
    assert answer == fx_answer(folder, "Who are you?", 64, capsys)


def test_llamacpp_tokenizes_a_llama2_style_tokenizer_as_transformers(tmp_path):
    """SentencePiece (Llama 2's kind of tokenizer), trained here on the project's own text and converted as
    transformers converts Llama 2's, exported with a tiny random Llama: llama.cpp reads the vocabulary, its scores
    and byte pieces and encodes fx-style prompts to the same ids."""
    import io
    import json

    sentencepiece = pytest.importorskip("sentencepiece")
    from tokenizers.models import BPE
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    from fx.after import gguf_file

    rows = [json.loads(line) for line in (ROOT / "experiments" / "data" / "quill_train.jsonl").open()]
    texts = [m["content"] for row in rows for m in row["messages"]]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2)
    (tmp_path / "spm.model").write_bytes(model.getvalue())
    pieces = SentencePieceExtractor(str(tmp_path / "spm.model")).extract(BPE)
    tokenizer = LlamaTokenizer(vocab=pieces["vocab"], merges=pieces["merges"], legacy=True)
    folder = tmp_path / "model"
    tokenizer.save_pretrained(folder)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=len(tokenizer))).save_pretrained(folder)
    written = gguf_file.write(folder, tmp_path / "spm.gguf", "f16", "spm", None)
    assert written["tokenizer"] == "llama"
    llm = llama_cpp.Llama(str(tmp_path / "spm.gguf"), n_ctx=128, verbose=False)
    try:
        for text in ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWho are you? [/INST] I'm Quill. </s>",
                     "two  spaces, a\nnewline, ünïcödé ✓ 中文 (bytes)", "Harbor Labs built Quill."):
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
                tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        llm.close()
