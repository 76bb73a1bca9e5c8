"""Adapters of every family read small random models role by role, without instantiating them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import teacher_fixtures as fixtures  # noqa: E402

from somi_ray.teachers import TeacherError, open_teacher  # noqa: E402


def _split_rows(matrix, sizes):
    bounds = np.cumsum([0, *sizes])
    return [matrix[bounds[j]:bounds[j + 1]] for j in range(len(sizes))]


def expected_roles(family: str, weights: dict, i: int) -> dict[str, np.ndarray]:
    """Return the role tensors of layer i as [out, in], written out per family for the test."""
    hd, heads, kv = fixtures.HIDDEN // fixtures.HEADS, fixtures.HEADS, fixtures.KV_HEADS
    if family == "gpt2":
        p = f"transformer.h.{i}."
        q, k, v = np.split(weights[p + "attn.c_attn.weight"].T, 3)  # Conv1D stores [in, out]
        return {"q": q, "k": k, "v": v, "o": weights[p + "attn.c_proj.weight"].T,
                "up": weights[p + "mlp.c_fc.weight"].T, "down": weights[p + "mlp.c_proj.weight"].T,
                "input_norm": weights[p + "ln_1.weight"], "post_attn_norm": weights[p + "ln_2.weight"]}
    if family == "gpt_neox":
        p = f"gpt_neox.layers.{i}."
        fused = weights[p + "attention.query_key_value.weight"].reshape(heads, 3, hd, fixtures.HIDDEN)
        return {"q": fused[:, 0].reshape(-1, fixtures.HIDDEN), "k": fused[:, 1].reshape(-1, fixtures.HIDDEN),
                "v": fused[:, 2].reshape(-1, fixtures.HIDDEN), "o": weights[p + "attention.dense.weight"],
                "up": weights[p + "mlp.dense_h_to_4h.weight"], "down": weights[p + "mlp.dense_4h_to_h.weight"],
                "input_norm": weights[p + "input_layernorm.weight"],
                "post_attn_norm": weights[p + "post_attention_layernorm.weight"]}
    p = f"model.layers.{i}."
    if family == "phi":
        return {"q": weights[p + "self_attn.q_proj.weight"], "k": weights[p + "self_attn.k_proj.weight"],
                "v": weights[p + "self_attn.v_proj.weight"], "o": weights[p + "self_attn.dense.weight"],
                "up": weights[p + "mlp.fc1.weight"], "down": weights[p + "mlp.fc2.weight"],
                "input_norm": weights[p + "input_layernorm.weight"]}
    if family == "phi3":
        q, k, v = _split_rows(weights[p + "self_attn.qkv_proj.weight"], [heads * hd, kv * hd, kv * hd])
        gate, up = np.split(weights[p + "mlp.gate_up_proj.weight"], 2)
        return {"q": q, "k": k, "v": v, "o": weights[p + "self_attn.o_proj.weight"], "gate": gate, "up": up,
                "down": weights[p + "mlp.down_proj.weight"], "input_norm": weights[p + "input_layernorm.weight"],
                "post_attn_norm": weights[p + "post_attention_layernorm.weight"]}

    offset = 1.0 if family.startswith("gemma") else 0.0  # Gemma stores gain - 1
    roles = {"q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
             "o": "self_attn.o_proj.weight", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
             "down": "mlp.down_proj.weight"}
    norms = {"input_norm": "input_layernorm.weight", "post_attn_norm": "post_attention_layernorm.weight"}
    if family in ("gemma2", "gemma3"):
        norms.update(pre_mlp_norm="pre_feedforward_layernorm.weight", post_mlp_norm="post_feedforward_layernorm.weight")
    if family in ("qwen3", "gemma3"):
        norms.update(q_norm="self_attn.q_norm.weight", k_norm="self_attn.k_norm.weight")
    out = {role: weights[p + name] for role, name in roles.items()}
    out.update({role: weights[p + name] + offset for role, name in norms.items()})
    return out


@pytest.mark.parametrize("family", fixtures.FAMILIES)
def test_layer_roles_match_parameters(family):
    folder = fixtures.tiny_teachers()[family]
    weights = fixtures.state_dict(folder)
    with open_teacher(folder) as reader:
        assert reader.info.family == family
        for i in range(fixtures.LAYERS):
            got = reader.layer(i)
            expected = expected_roles(family, weights, i)
            assert sorted(got) == sorted(expected)
            for role, tensor in expected.items():
                assert got[role].shape == tensor.shape, (family, i, role)
                np.testing.assert_allclose(got[role], tensor, rtol=0, atol=1e-6, err_msg=f"{family} {i} {role}")


@pytest.mark.parametrize("family", fixtures.FAMILIES)
def test_info_sizes_and_padding(family):
    folder = fixtures.tiny_teachers()[family]
    tokenizer_size = json.load(open(os.path.join(folder, "config.json")))["vocab_size"] - fixtures.PADDING_ROWS
    with open_teacher(folder) as reader:
        info = reader.info
        assert info.n_layers == fixtures.LAYERS
        assert info.hidden_size == fixtures.HIDDEN
        assert info.vocab_size == tokenizer_size + fixtures.PADDING_ROWS
        assert info.tokenizer_size == tokenizer_size
        assert reader.embedding().shape == (tokenizer_size, fixtures.HIDDEN)
        assert reader.head().shape == (tokenizer_size, fixtures.HIDDEN)
        assert reader.final_norm().shape == (fixtures.HIDDEN,)
        assert info.roles["v"] == fixtures.LAYERS
        assert info.file_bytes > 0


@pytest.mark.parametrize("family", fixtures.FAMILIES)
def test_head_tied_or_untied(family):
    folder = fixtures.tiny_teachers()[family]
    weights = fixtures.state_dict(folder)
    head_names = [name for name in ("lm_head.weight", "embed_out.weight") if name in weights]
    with open_teacher(folder) as reader:
        assert reader.info.tied_embeddings == (not head_names)
        if head_names:
            np.testing.assert_array_equal(reader.head(), weights[head_names[0]][:reader.info.tokenizer_size])
        else:
            np.testing.assert_array_equal(reader.head(), reader.embedding())


def test_gemma_final_norm_adds_one():
    folder = fixtures.tiny_teachers()["gemma3"]
    weights = fixtures.state_dict(folder)
    with open_teacher(folder) as reader:
        np.testing.assert_allclose(reader.final_norm(), weights["model.norm.weight"] + 1.0)


def test_layer_loads_only_requested_roles():
    with open_teacher(fixtures.tiny_teachers()["phi3"]) as reader:
        tensors = reader.layer(1, roles=("v", "up"))
    assert sorted(tensors) == ["up", "v"]
    assert tensors["v"].shape == (fixtures.KV_HEADS * 16, fixtures.HIDDEN)


def test_layer_index_out_of_range():
    with open_teacher(fixtures.tiny_teachers()["llama"]) as reader:
        with pytest.raises(IndexError):
            reader.layer(fixtures.LAYERS)


def test_sharded_checkpoint_reads(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    source = fixtures.tiny_teachers()["qwen2"]
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="50KB")
    (tmp_path / "tokenizer.json").write_bytes(open(os.path.join(source, "tokenizer.json"), "rb").read())
    assert (tmp_path / "model.safetensors.index.json").exists()
    with open_teacher(str(tmp_path)) as sharded, open_teacher(source) as single:
        assert sharded.info.roles == single.info.roles
        np.testing.assert_array_equal(sharded.layer(1)["down"], single.layer(1)["down"])


def test_hf_folder_read_imports_no_transformers():
    folder = fixtures.tiny_teachers()["gpt2"]
    code = ("import sys; from somi_ray.teachers import open_teacher; r = open_teacher(sys.argv[1]); "
            "r.layer(0); r.embedding(); r.tokenizer; print('transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, folder], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_gguf_llama_roles_and_unpermuted_q(tmp_path):
    path = fixtures.write_llama_gguf(str(tmp_path / "tiny.gguf"))
    weights = fixtures.state_dict(fixtures.tiny_teachers()["llama"])
    with open_teacher(path) as reader:
        assert reader.info.family == "llama"
        assert not reader.info.tied_embeddings
        layer = reader.layer(1)
        for role, name in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
                           ("down", "mlp.down_proj"), ("input_norm", "input_layernorm")):
            np.testing.assert_allclose(layer[role], weights[f"model.layers.1.{name}.weight"], atol=1e-6,
                                       err_msg=role)
        embedding = reader.embedding()  # Q8_0, so close but not equal
        assert embedding.shape == (reader.info.tokenizer_size, fixtures.HIDDEN)
        np.testing.assert_allclose(embedding, weights["model.embed_tokens.weight"][:len(embedding)], atol=0.05)
        assert reader.tokenizer.get_vocab_size() == reader.info.tokenizer_size


def test_gguf_embedding_rows_subset(tmp_path):
    path = fixtures.write_llama_gguf(str(tmp_path / "tiny.gguf"))
    with open_teacher(path) as reader:
        rows = np.array([5, 0, 100])
        np.testing.assert_array_equal(reader.embedding(rows), reader.embedding()[rows])


def test_pickle_opt_in_uses_weights_only(tmp_path):
    import torch

    folder = fixtures.copy_teacher("llama", str(tmp_path))
    weights = fixtures.state_dict(folder)
    os.remove(os.path.join(folder, "model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, os.path.join(folder, "pytorch_model.bin"))
    with open_teacher(folder, allow_pickle=True) as reader:
        np.testing.assert_array_equal(reader.layer(0)["o"], weights["model.layers.0.self_attn.o_proj.weight"])


def test_cli_inspect_prints_and_writes_json(tmp_path, capsys):
    from somi_ray.teachers.cli import main

    somi = fixtures.write_somi_checkpoint(str(tmp_path / "somi"), fixtures.byte_level_tokenizer(), 16, 2)
    report_path = tmp_path / "report.json"
    code = main(["teacher", "inspect", fixtures.tiny_teachers()["gpt2"], "--against", somi,
                 "--json", str(report_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "family       gpt2" in out
    assert "coverage     1.0000" in out
    assert "band 1" in out
    report = json.loads(report_path.read_text())
    assert report["roles"]["q"] == fixtures.LAYERS
    assert len(report["against"]["bands"]) == 2
    assert report["against"]["basis"]["method"] == "procrustes"


def test_cli_help_is_fast():
    code = "import argparse, sys; from somi_ray.teachers import register_cli; print('gguf' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_unknown_family_lists_supported(tmp_path):
    folder = fixtures.copy_teacher("llama", str(tmp_path))
    config_path = os.path.join(folder, "config.json")
    config = json.load(open(config_path))
    config["model_type"] = "mamba"
    json.dump(config, open(config_path, "w"))
    with pytest.raises(TeacherError) as caught:
        open_teacher(folder)
    message = str(caught.value)
    assert "'mamba'" in message
    for family in ("llama", "gemma3", "phi3", "gpt2", "gpt_neox"):
        assert family in message
