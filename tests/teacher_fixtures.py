"""Small random teachers of every supported family, built once per test process.

Models come from transformers config classes with random weights and are saved with
`save_pretrained(safe_serialization=True)` beside a tiny tokenizer. Two tokenizer styles spell
the same words: byte-level BPE (GPT-2's alphabet) and SentencePiece (`▁` and `<0xNN>`).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

import numpy as np

WORDS = ["the", "hello", "world", "café", "model", "teacher", "naïve", "data"]
PADDING_ROWS = 8  # embedding rows beyond the tokenizer, as real checkpoints round vocab sizes up
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 64, 2, 4, 2, 96


def byte_level_tokenizer():
    """Return a byte-level BPE tokenizer: 256 byte symbols, the WORDS with and without a space."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()  # byte -> printable character, GPT-2's table
    spell = lambda text: "".join(alphabet[b] for b in text.encode("utf-8"))  # noqa: E731
    vocab: dict[str, int] = {}
    for char in alphabet.values():
        vocab.setdefault(char, len(vocab))
    for word in WORDS:
        vocab.setdefault(spell(word), len(vocab))
        vocab.setdefault(spell(" " + word), len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return tokenizer


def sentencepiece_tokenizer():
    """Return a SentencePiece-style BPE tokenizer over the same WORDS, in a different id order."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in reversed(WORDS):
        vocab.setdefault("▁" + word, len(vocab))
        vocab.setdefault(word, len(vocab))
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return tokenizer


def _configs(vocab_size: int) -> dict:
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                  num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)
    return {
        "llama": tf.LlamaConfig(**common, tie_word_embeddings=False),
        "mistral": tf.MistralConfig(**common, tie_word_embeddings=False),
        "qwen2": tf.Qwen2Config(**common, tie_word_embeddings=True),
        "qwen3": tf.Qwen3Config(**common, head_dim=24, tie_word_embeddings=True),
        "gemma": tf.GemmaConfig(**common, head_dim=16),
        "gemma2": tf.Gemma2Config(**common, head_dim=16),
        "gemma3": tf.Gemma3TextConfig(**common, head_dim=32),
        "phi": tf.PhiConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                            num_hidden_layers=LAYERS, num_attention_heads=HEADS),
        "phi3": tf.Phi3Config(**common, pad_token_id=0, tie_word_embeddings=False),
        "gpt2": tf.GPT2Config(vocab_size=vocab_size, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64),
        "gpt_neox": tf.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                     num_hidden_layers=LAYERS, num_attention_heads=HEADS, tie_word_embeddings=False),
    }


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi", "phi3", "gpt2", "gpt_neox")
SENTENCEPIECE_FAMILIES = {"llama", "mistral", "gemma", "gemma2", "gemma3", "phi3"}


@functools.lru_cache(maxsize=1)
def tiny_teachers() -> dict[str, str]:
    """Build one saved random model per family; return family -> folder (kept for the process)."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tempfile.mkdtemp(prefix="somi_teachers_")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    torch.manual_seed(0)
    for family in FAMILIES:
        tokenizer = sentencepiece_tokenizer() if family in SENTENCEPIECE_FAMILIES else byte_level_tokenizer()
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        model = AutoModelForCausalLM.from_config(_configs(size + PADDING_ROWS)[family])
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if parameter.ndim == 1:  # norms start at 0 or 1; random gains make offsets visible
                    parameter.normal_(0.0, 0.5)
        folder = os.path.join(root, family)
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save(os.path.join(folder, "tokenizer.json"))
    return {family: os.path.join(root, family) for family in FAMILIES}


def state_dict(folder: str) -> dict[str, np.ndarray]:
    """Return every tensor of a saved fixture as float32 numpy, read independently of the reader."""
    from safetensors.numpy import load_file

    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            tensors.update({k: v.astype(np.float32) for k, v in load_file(os.path.join(folder, name)).items()})
    return tensors


def copy_teacher(family: str, destination: str) -> str:
    """Copy a fixture folder so a test can damage it."""
    target = os.path.join(destination, family)
    shutil.copytree(tiny_teachers()[family], target)
    return target


def llama_cpp_permute(matrix: np.ndarray, heads: int) -> np.ndarray:
    """Reorder q/k rows the way llama.cpp's converter does for llama-family GGUF files."""
    rows, cols = matrix.shape
    return matrix.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_llama_gguf(path: str, *, tensor_type=None, architecture: str = "llama", with_tokens: bool = True,
                     drop: tuple[str, ...] = ()) -> str:
    """Write the llama fixture as a GGUF file with llama.cpp tensor names and metadata.

    `tensor_type` sets the type of token_embd (default Q8_0); tensors named in `drop` are left out.
    """
    import gguf

    folder = tiny_teachers()["llama"]
    weights = state_dict(folder)
    tokenizer = byte_level_tokenizer()
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_context_length(64)
    if with_tokens:
        tokens = [token for token, _ in sorted(tokenizer.get_vocab(True).items(), key=lambda item: item[1])]
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types([1] * len(tokens))
        writer.add_token_scores([0.0] * len(tokens))  # with no merges, transformers rebuilds them from scores

    names = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
             "model.norm.weight": "output_norm.weight"}
    roles = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(LAYERS):
        for hf, cpp in roles.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{cpp}.weight"

    for hf, cpp in names.items():
        if cpp in drop:
            continue
        tensor = weights[hf]
        if cpp.endswith("attn_q.weight"):
            tensor = llama_cpp_permute(tensor, HEADS)
        elif cpp.endswith("attn_k.weight"):
            tensor = llama_cpp_permute(tensor, KV_HEADS)
        if cpp == "token_embd.weight":
            qtype = tensor_type or gguf.GGMLQuantizationType.Q8_0
            if qtype in gguf.quants._type_traits:
                writer.add_tensor(cpp, gguf.quants.quantize(tensor, qtype), raw_dtype=qtype)
            else:  # a type gguf-py cannot (de)quantise: write zero bytes of the right size
                block, size = gguf.GGML_QUANT_SIZES[qtype]
                raw = np.zeros((tensor.shape[0], tensor.shape[1] // block * size), dtype=np.uint8)
                writer.add_tensor(cpp, raw, raw_dtype=qtype)
        else:
            writer.add_tensor(cpp, np.ascontiguousarray(tensor, dtype=np.float32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_somi_checkpoint(folder: str, tokenizer, hidden_size: int, n_parts: int, seed: int = 0) -> str:
    """Write a minimal SOMI checkpoint: tokenizer.json, config.json, model.safetensors."""
    import json

    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump({"hidden_size": hidden_size, "n_parts": n_parts}, handle)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    embedding = np.random.default_rng(seed).standard_normal((size, hidden_size)).astype(np.float32)
    save_file({"embedding.weight": embedding}, os.path.join(folder, "model.safetensors"))
    return folder
