"""Damaged or unsupported teachers raise a TeacherError that names the file, the field and the fix.

Every case also checks that nothing was written next to the teacher and that the process goes on
(the next case runs in the same interpreter).
"""

from __future__ import annotations

import json
import os
import pickle
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import teacher_fixtures as fixtures  # noqa: E402

from somi_ray.teachers import TeacherError, open_teacher  # noqa: E402


def snapshot(folder: str) -> dict[str, tuple[int, int]]:
    """Return path -> (size, mtime_ns) of every file under folder."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            stat = os.stat(path)
            out[path] = (stat.st_size, stat.st_mtime_ns)
    return out


def read_everything(path: str, **options) -> None:
    with open_teacher(path, **options) as reader:
        reader.embedding()
        reader.head()
        reader.final_norm()
        for i in range(reader.info.n_layers):
            reader.layer(i)


def assert_rejected(path: str, file_part: str, field_part: str, watch: str, **options) -> TeacherError:
    before = snapshot(watch)
    with pytest.raises(TeacherError) as caught:
        read_everything(path, **options)
    error = caught.value
    assert file_part in error.file, str(error)
    assert field_part in error.field, str(error)
    assert error.file in str(error)
    assert error.field in str(error)
    assert "Fix:" in str(error)
    assert error.fix
    assert isinstance(error, ValueError)
    assert snapshot(watch) == before
    return error


def rewrite_config(folder: str, **changes) -> None:
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    json.dump(config, open(path, "w"))


def rewrite_tensors(folder: str, change) -> None:
    from safetensors.numpy import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


@pytest.fixture
def llama(tmp_path):
    return fixtures.copy_teacher("llama", str(tmp_path))


def test_missing_config(llama):
    os.remove(os.path.join(llama, "config.json"))
    assert_rejected(llama, "config.json", "config.json", llama)


def test_config_not_json(llama):
    open(os.path.join(llama, "config.json"), "w").write("{not json")
    assert_rejected(llama, "config.json", "config.json", llama)


def test_config_without_model_type(llama):
    rewrite_config(llama, model_type=None)
    assert_rejected(llama, "config.json", "model_type", llama)


def test_config_layer_count_invalid(llama):
    rewrite_config(llama, num_hidden_layers="two")
    assert_rejected(llama, "config.json", "num_hidden_layers", llama)


def test_config_more_layers_than_weights(llama):
    rewrite_config(llama, num_hidden_layers=5)
    assert_rejected(llama, llama, "model.layers.2.", llama)


def test_unknown_family(llama):
    rewrite_config(llama, model_type="rwkv")
    error = assert_rejected(llama, "config.json", "model_type", llama)
    assert "rwkv" in str(error)
    assert "qwen3" in str(error)


def test_empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    assert_rejected(str(folder), str(folder), "folder", str(tmp_path))


def test_missing_path(tmp_path):
    assert_rejected(str(tmp_path / "nothing"), "nothing", "path", str(tmp_path))


def test_no_weight_files(llama):
    os.remove(os.path.join(llama, "model.safetensors"))
    assert_rejected(llama, llama, "safetensors", llama)


def test_truncated_safetensors(llama):
    path = os.path.join(llama, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 4096])
    assert_rejected(llama, "model.safetensors", "model.", llama)


def test_safetensors_header_not_json(llama):
    path = os.path.join(llama, "model.safetensors")
    data = bytearray(open(path, "rb").read())
    data[8:12] = b"\xff\xfe!!"
    open(path, "wb").write(bytes(data))
    assert_rejected(llama, "model.safetensors", "header", llama)


def test_index_names_missing_shard(llama):
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    json.dump(index, open(os.path.join(llama, "model.safetensors.index.json"), "w"))
    os.rename(os.path.join(llama, "model.safetensors"), os.path.join(llama, "model-00001-of-00002.safetensors"))
    assert_rejected(llama, "model.safetensors.index.json", "lm_head.weight", llama)


def test_wrong_value_shape(llama):
    def shrink(tensors):
        tensors["model.layers.1.self_attn.v_proj.weight"] = tensors["model.layers.1.self_attn.v_proj.weight"][:8]
    rewrite_tensors(llama, shrink)
    error = assert_rejected(llama, "model.safetensors", "model.layers.1.self_attn.v_proj.weight", llama)
    assert "(8, 64)" in str(error)
    assert "(32, 64)" in str(error)


def test_config_heads_disagree_with_weights(llama):
    rewrite_config(llama, num_key_value_heads=1)
    assert_rejected(llama, "model.safetensors", "self_attn.k_proj.weight", llama)


def test_missing_layer_tensor(llama):
    rewrite_tensors(llama, lambda tensors: tensors.pop("model.layers.0.mlp.down_proj.weight"))
    assert_rejected(llama, llama, "model.layers.0.mlp.down_proj.weight", llama)


def test_nan_in_layer(llama):
    def poison(tensors):
        tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    rewrite_tensors(llama, poison)
    error = assert_rejected(llama, "model.safetensors", "model.layers.1.mlp.up_proj.weight", llama)
    assert "NaN or Inf" in str(error)


def test_inf_in_embedding(llama):
    def poison(tensors):
        tensors["model.embed_tokens.weight"][0, 0] = np.inf
    rewrite_tensors(llama, poison)
    assert_rejected(llama, "model.safetensors", "model.embed_tokens.weight", llama)


def test_missing_tokenizer(llama):
    os.remove(os.path.join(llama, "tokenizer.json"))
    assert_rejected(llama, "tokenizer.json", "tokenizer.json", llama)


def test_tokenizer_not_json(llama):
    open(os.path.join(llama, "tokenizer.json"), "w").write("[]")
    assert_rejected(llama, "tokenizer.json", "tokenizer.json", llama)


def test_vocabulary_larger_than_embedding(llama):
    def shrink(tensors):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = tensors[name][:100]
    rewrite_tensors(llama, shrink)
    rewrite_config(llama, vocab_size=100)
    error = assert_rejected(llama, llama, "tokenizer", llama)
    assert "100 rows" in str(error)


def test_pickle_without_opt_in(llama):
    import torch

    weights = fixtures.state_dict(llama)
    os.remove(os.path.join(llama, "model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, os.path.join(llama, "pytorch_model.bin"))
    error = assert_rejected(llama, "pytorch_model.bin", "weights", llama)
    assert "allow_pickle=True" in str(error)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def test_pickle_with_code_rejected_even_with_opt_in(llama):
    os.remove(os.path.join(llama, "model.safetensors"))
    with open(os.path.join(llama, "pytorch_model.bin"), "wb") as handle:
        pickle.dump({"model.embed_tokens.weight": _Exploit()}, handle)
    assert_rejected(llama, "pytorch_model.bin", "weights", llama, allow_pickle=True)


def test_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    error = assert_rejected("someorg/some-model", "someorg/some-model", "hub id", str(tmp_path))
    assert "HF_HUB_OFFLINE" in str(error)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    assert_rejected(str(path), "model.gguf", "magic", str(tmp_path))


def test_truncated_gguf(tmp_path):
    path = fixtures.write_llama_gguf(str(tmp_path / "tiny.gguf"))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])
    assert_rejected(path, "tiny.gguf", "header", str(tmp_path))


def test_gguf_unsupported_tensor_type(tmp_path):
    import gguf

    path = fixtures.write_llama_gguf(str(tmp_path / "tiny.gguf"), tensor_type=gguf.GGMLQuantizationType.Q8_1)
    error = assert_rejected(path, "tiny.gguf", "token_embd.weight", str(tmp_path))
    assert "Q8_1" in str(error)


def test_gguf_unknown_architecture(tmp_path):
    path = fixtures.write_llama_gguf(str(tmp_path / "tiny.gguf"), architecture="mamba")
    error = assert_rejected(path, "tiny.gguf", "general.architecture", str(tmp_path))
    assert "gemma3" in str(error)


def test_gguf_without_tokenizer(tmp_path):
    path = fixtures.write_llama_gguf(str(tmp_path / "tiny.gguf"), with_tokens=False)
    assert_rejected(path, "tiny.gguf", "tokenizer.ggml.tokens", str(tmp_path))


def test_gguf_missing_block_tensor(tmp_path):
    path = fixtures.write_llama_gguf(str(tmp_path / "tiny.gguf"), drop=("blk.1.attn_v.weight",))
    assert_rejected(path, "tiny.gguf", "blk.1.attn_v.weight", str(tmp_path))


def test_cli_exits_nonzero_and_writes_nothing(llama, tmp_path, capsys):
    from somi_ray.teachers.cli import main

    os.remove(os.path.join(llama, "tokenizer.json"))
    report = tmp_path / "report.json"
    before = snapshot(str(tmp_path))
    with pytest.raises(SystemExit) as caught:
        main(["teacher", "inspect", llama, "--json", str(report)])
    assert caught.value.code == 2
    assert "tokenizer.json" in capsys.readouterr().err
    assert not report.exists()
    assert snapshot(str(tmp_path)) == before


def test_cli_against_checkpoint_without_embedding(tmp_path, capsys):
    from safetensors.numpy import save_file

    from somi_ray.teachers.cli import main

    somi = fixtures.write_somi_checkpoint(str(tmp_path / "somi"), fixtures.byte_level_tokenizer(), 16, 2)
    save_file({"other.weight": np.zeros((2, 2), dtype=np.float32)}, os.path.join(somi, "model.safetensors"))
    with pytest.raises(SystemExit) as caught:
        main(["teacher", "inspect", fixtures.tiny_teachers()["gpt2"], "--against", somi])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err
    assert "embedding.weight" in err
