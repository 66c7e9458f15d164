"""A transformers Llama folder written as one GGUF file, the format llama.cpp and Ollama run, with the ``gguf``
package: llama.cpp's tensor names (gguf's own name map) and its rotary layout of the query and key weights, the
hyperparameters llama.cpp reads, the tokenizer with its special tokens, and a chat template. Tensors are streamed
one at a time, so a 7B model needs no more memory than its largest tensor.

The tokenizer is written as the run used it: fx's templates put the beginning and end tokens into the text
themselves, so the file says to add none (``add_bos_token = false``) and llama.cpp tokenizes a prompt as fx did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fx.errors import UserError
from fx.files import atomic_file

# --quant -> (ggml tensor type of the matrices, llama.cpp's file type); the types the gguf package can write
QUANTS = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
          "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"), "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
          "q4_1": ("Q4_1", "MOSTLY_Q4_1"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}
ARCHITECTURES = {"llama": "LLAMA"}  # transformers' model type -> gguf's MODEL_ARCH
# a byte-level BPE tokenizer's pre-tokenizer (tokenizer.json) -> llama.cpp's name for the same splitting
PRE_TOKENIZERS = {
    json.dumps({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}): "gpt-2",
    json.dumps({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}): "smollm",
}
SKIPPED = ("rotary_emb.inv_freq",)  # buffers some checkpoints carry; llama.cpp computes them


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise UserError(f"--quant {quant!r}: the gguf package cannot write it; one of: {', '.join(QUANTS)} "
                        "(for k-quants such as q4_k_m, run llama.cpp's llama-quantize on the f16 file)")


def check_architecture(config: dict[str, Any]) -> None:
    """Refuses a model the exporter doesn't know, before anything is merged or written."""
    kind = config.get("model_type")
    if kind not in ARCHITECTURES:
        raise UserError(f"architecture {kind!r}: the GGUF exporter knows {', '.join(ARCHITECTURES)} only")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"rope scaling {rope.get('rope_type', rope.get('type'))!r}: the GGUF exporter writes "
                        "unscaled rotary embeddings only")


@dataclass
class Vocabulary:
    model: str  # llama.cpp's tokenizer model: gpt2 (byte-level BPE) or llama (SentencePiece-style)
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str]
    add_space_prefix: bool


def _pre_tokenizer(data: dict[str, Any]) -> str:
    def shape(node):
        if node is None:
            return None
        if node["type"] == "Sequence":
            return {"type": "Sequence", "pretokenizers": [shape(n) for n in node["pretokenizers"]]}
        keep = {"ByteLevel": ("add_prefix_space", "use_regex"), "Digits": ("individual_digits",)}.get(node["type"])
        return {"type": node["type"], **{k: node.get(k) for k in keep}} if keep else node

    key = json.dumps(shape(data.get("pre_tokenizer")))
    if key not in PRE_TOKENIZERS:
        raise UserError(f"the tokenizer's pre-tokenizer {key[:200]} is not one the GGUF exporter knows how to name "
                        f"for llama.cpp (it knows: {', '.join(PRE_TOKENIZERS.values())})")
    return PRE_TOKENIZERS[key]


def _space_prefix(data: dict[str, Any]) -> None:
    """A SentencePiece-style tokenizer must add its ``▁`` before every text piece, special tokens included, as
    Llama 2's does and llama.cpp's does (``add_space_prefix``); a tokenizer that adds it only at the very start
    (transformers' non-legacy Llama tokenizer) would be tokenized differently after ``<s>``."""
    normalizer, pre = data.get("normalizer") or {}, data.get("pre_tokenizer") or {}
    legacy_normalizer = normalizer.get("type") == "Sequence" and [n.get("type") for n in normalizer["normalizers"]] \
        == ["Prepend", "Replace"] and not pre
    always = pre.get("type") == "Metaspace" and pre.get("prepend_scheme") == "always"
    if not (legacy_normalizer or always):
        raise UserError("the SentencePiece-style tokenizer adds its space prefix in a way llama.cpp does not "
                        "(only Llama 2's legacy behaviour, a prefix before every piece, is exported)")


def vocabulary(folder: Path, vocab_size: int) -> Vocabulary:
    """The tokenizer of a model folder (its ``tokenizer.json``) as llama.cpp reads one."""
    import gguf

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{folder}: no tokenizer.json (a fast tokenizer); the GGUF exporter reads its vocabulary")
    data = json.loads(path.read_text())
    model = data["model"]
    if model.get("type") != "BPE":
        raise UserError(f"tokenizer model {model.get('type')!r}: the GGUF exporter writes BPE tokenizers only")
    spm = bool(model.get("byte_fallback"))  # Llama 2's tokenizer: BPE over SentencePiece pieces, bytes as <0xNN>
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for added in data.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not spm:
        return Vocabulary("gpt2", _pre_tokenizer(data), tokens, [int(t) for t in types], None, merges, False)
    _space_prefix(data)
    # SentencePiece merges the pair whose result scores highest; BPE applies merges in rank order: the same
    # choice when a token's score is minus the rank of the merge that makes it.
    scores = [0.0] * vocab_size
    index = {t: i for i, t in enumerate(tokens)}
    for rank, merge in enumerate(merges):
        made = index.get(merge.replace(" ", ""))
        if made is not None and scores[made] == 0.0:
            scores[made] = -float(rank + 1)
    for i, token in enumerate(tokens):
        if types[i] == gguf.TokenType.NORMAL and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types[i] = gguf.TokenType.BYTE
    if model.get("unk_token") in index:
        types[index[model["unk_token"]]] = gguf.TokenType.UNKNOWN
    return Vocabulary("llama", None, tokens, [int(t) for t in types], scores, [], True)


def _tensor_plan(folder: Path, config: dict[str, Any], qtype):
    """(gguf name, hf name, file, target type) of every tensor, read from the safetensors headers."""
    import gguf
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no safetensors weights to export")
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHITECTURES[config["model_type"]]),
                                     config["num_hidden_layers"])
    plan = []
    for file in files:
        with safe_open(file, "pt") as f:
            for key in f.keys():
                if key.endswith(SKIPPED) or (key == "lm_head.weight" and config.get("tie_word_embeddings")):
                    continue
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise UserError(f"tensor {key!r}: the GGUF exporter has no llama.cpp name for it")
                shape = f.get_slice(key).get_shape()
                chosen = qtype
                if len(shape) < 2:
                    chosen = gguf.GGMLQuantizationType.F32  # norms and biases stay float32, as llama.cpp keeps them
                elif shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                    chosen = gguf.GGMLQuantizationType.F16  # rows that don't fill whole blocks, as llama.cpp does
                plan.append((name, key, file, list(shape), chosen))
    return plan


def _permute(weights, heads: int):
    """HF's rotary layout of a query/key projection -> llama.cpp's (pairs interleaved within each head)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def _data(f, key: str, chosen, config: dict[str, Any]):
    import gguf
    import numpy as np

    array = f.get_tensor(key).float().numpy()
    if key.endswith(("q_proj.weight", "q_proj.bias")):
        array = _permute(array, config["num_attention_heads"])
    elif key.endswith(("k_proj.weight", "k_proj.bias")):
        array = _permute(array, config.get("num_key_value_heads") or config["num_attention_heads"])
    if chosen == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if chosen == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(array), chosen)


def write(folder: Path, out: Path, quant: str, name: str, chat_template: str | None) -> dict[str, Any]:
    """Write the model in ``folder`` as ``out`` (beside, then renamed into place)."""
    import gguf
    import numpy as np
    from safetensors import safe_open
    from transformers import AutoTokenizer

    check_quant(quant)
    config = json.loads((folder / "config.json").read_text())
    check_architecture(config)
    qtype = getattr(gguf.GGMLQuantizationType, QUANTS[quant][0])
    vocab = vocabulary(folder, config["vocab_size"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    plan = _tensor_plan(folder, config, qtype)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_block_count(config["num_hidden_layers"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(heads)
        writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
        writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
        writer.add_rope_dimension_count(head_dim)
        if head_dim != config["hidden_size"] // heads:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_vocab_size(config["vocab_size"])
        writer.add_file_type(getattr(gguf.LlamaFileType, QUANTS[quant][1]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model(vocab.model)
        if vocab.pre:
            writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.types)
        if vocab.scores is not None:
            writer.add_token_scores(vocab.scores)
        if vocab.merges:
            writer.add_token_merges(vocab.merges)
        for kind in ("bos", "eos", "unk", "pad"):
            token_id = getattr(tokenizer, f"{kind}_token_id", None)
            if token_id is not None and token_id < config["vocab_size"]:
                getattr(writer, f"add_{'unk' if kind == 'unk' else kind}_token_id")(token_id)
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(vocab.add_space_prefix)
        if chat_template:
            writer.add_chat_template(chat_template)
        for gguf_name, _, _, shape, chosen in plan:
            if chosen in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dtype = np.dtype(np.float32 if chosen == gguf.GGMLQuantizationType.F32 else np.float16)
                writer.add_tensor_info(gguf_name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
            else:
                byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, chosen)
                writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                       raw_dtype=chosen)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, key, file, _, chosen in plan:
            with safe_open(file, "pt") as f:
                writer.write_tensor_data(_data(f, key, chosen, config))
        writer.close()
    return {"path": str(out), "quant": quant, "size_gib": round(out.stat().st_size / 2**30, 3),
            "tensors": len(plan), "tokenizer": vocab.model, "pre_tokenizer": vocab.pre,
            "chat_template": chat_template is not None}
