"""Architecture families as data: tensor names, roles and layouts per family.

Each family is one `Family` record. Per-layer roles map to a tensor name template (Hugging Face
safetensors) and to llama.cpp's GGUF name. Fused tensors are listed separately with the roles
they split into. The reader code in `sources.py` interprets these tables and contains no per-family name tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Fused:
    """One stored tensor that contains several roles stacked along its output rows."""

    tensor: str  # name template relative to the layer prefix, e.g. "self_attn.qkv_proj.weight"
    roles: tuple[str, ...]  # roles in storage order, e.g. ("q", "k", "v")
    interleaved_per_head: bool = False  # GPT-NeoX: rows are (head, role, head_dim)


@dataclass(frozen=True)
class Family:
    """Tensor names and conventions of one architecture family."""

    name: str
    model_types: tuple[str, ...]  # config.json `model_type` values
    gguf_architectures: tuple[str, ...]  # GGUF `general.architecture` values
    prefixes: tuple[str, ...]  # candidate prefixes of the HF tensor names; the first that matches wins
    embedding: str  # relative to the prefix
    final_norm: str  # relative to the prefix
    head: tuple[str, ...]  # absolute candidates of the untied output head
    layer: str  # per-layer prefix, relative to the prefix; "{i}" is the layer index
    roles: dict[str, str]  # role -> name relative to the layer prefix
    fused: tuple[Fused, ...] = ()
    stored_in_out: frozenset[str] = frozenset()  # roles (or fused tensors) stored [in, out]
    norm_offset: float = 0.0  # added to norm gains read from safetensors (Gemma stores gain - 1)
    gguf_roles: dict[str, str] = field(default_factory=dict)  # role -> GGUF name after "blk.{i}."
    gguf_fused: tuple[Fused, ...] = ()
    gguf_qk_permuted: bool = False  # llama.cpp reorders q/k rows of llama-family GGUF files


# Roles whose tensors are 1-D gains (norms); they are checked against width, not matrix shapes.
NORM_ROLES = frozenset(
    {"input_norm", "post_attn_norm", "pre_mlp_norm", "post_mlp_norm", "q_norm", "k_norm"}
)

# Roles the coupling operator needs: the attention OV circuit and the MLP's linear part.
OPERATOR_ROLES = ("v", "o", "up", "down")

_LLAMA_ROLES = {
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
    "input_norm": "input_layernorm.weight",
    "post_attn_norm": "post_attention_layernorm.weight",
}

_LLAMA_GGUF = {
    "q": "attn_q.weight",
    "k": "attn_k.weight",
    "v": "attn_v.weight",
    "o": "attn_output.weight",
    "gate": "ffn_gate.weight",
    "up": "ffn_up.weight",
    "down": "ffn_down.weight",
    "input_norm": "attn_norm.weight",
    "post_attn_norm": "ffn_norm.weight",
}

# Gemma 2 and 3 put a norm after attention and a second pair around the MLP. llama.cpp calls
# the pre-MLP norm `ffn_norm`, so the GGUF table differs from the Llama one there.
_GEMMA2_ROLES = {
    **_LLAMA_ROLES,
    "pre_mlp_norm": "pre_feedforward_layernorm.weight",
    "post_mlp_norm": "post_feedforward_layernorm.weight",
}
_GEMMA2_GGUF = {
    **_LLAMA_GGUF,
    "post_attn_norm": "post_attention_norm.weight",
    "pre_mlp_norm": "ffn_norm.weight",
    "post_mlp_norm": "post_ffw_norm.weight",
}
_QK_NORM_ROLES = {"q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"}
_QK_NORM_GGUF = {"q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight"}


def _llama_like(name, model_types, gguf_architectures, *, roles=_LLAMA_ROLES, gguf_roles=_LLAMA_GGUF,
                norm_offset=0.0, gguf_qk_permuted=False) -> Family:
    return Family(
        name=name,
        model_types=model_types,
        gguf_architectures=gguf_architectures,
        prefixes=("model.", "model.language_model.", "language_model.model."),
        embedding="embed_tokens.weight",
        final_norm="norm.weight",
        head=("lm_head.weight", "language_model.lm_head.weight"),
        layer="layers.{i}.",
        roles=roles,
        norm_offset=norm_offset,
        gguf_roles=gguf_roles,
        gguf_qk_permuted=gguf_qk_permuted,
    )


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        _llama_like("llama", ("llama",), ("llama",), gguf_qk_permuted=True),
        _llama_like("mistral", ("mistral",), (), gguf_qk_permuted=True),
        _llama_like("qwen2", ("qwen2",), ("qwen2",)),
        _llama_like("qwen3", ("qwen3",), ("qwen3",),
                    roles={**_LLAMA_ROLES, **_QK_NORM_ROLES}, gguf_roles={**_LLAMA_GGUF, **_QK_NORM_GGUF}),
        _llama_like("gemma", ("gemma",), ("gemma",), norm_offset=1.0),
        _llama_like("gemma2", ("gemma2",), ("gemma2",), roles=_GEMMA2_ROLES, gguf_roles=_GEMMA2_GGUF,
                    norm_offset=1.0),
        _llama_like("gemma3", ("gemma3_text", "gemma3"), ("gemma3",),
                    roles={**_GEMMA2_ROLES, **_QK_NORM_ROLES}, gguf_roles={**_GEMMA2_GGUF, **_QK_NORM_GGUF},
                    norm_offset=1.0),
        Family(
            name="phi",
            model_types=("phi",),
            gguf_architectures=("phi2",),
            prefixes=("model.",),
            embedding="embed_tokens.weight",
            final_norm="final_layernorm.weight",
            head=("lm_head.weight",),
            layer="layers.{i}.",
            roles={
                "q": "self_attn.q_proj.weight",
                "k": "self_attn.k_proj.weight",
                "v": "self_attn.v_proj.weight",
                "o": "self_attn.dense.weight",
                "up": "mlp.fc1.weight",
                "down": "mlp.fc2.weight",
                "input_norm": "input_layernorm.weight",
            },
            gguf_roles={
                "q": "attn_q.weight",
                "k": "attn_k.weight",
                "v": "attn_v.weight",
                "o": "attn_output.weight",
                "up": "ffn_up.weight",
                "down": "ffn_down.weight",
                "input_norm": "attn_norm.weight",
            },
            gguf_fused=(Fused("attn_qkv.weight", ("q", "k", "v")),),
        ),
        Family(
            name="phi3",
            model_types=("phi3",),
            gguf_architectures=("phi3",),
            prefixes=("model.",),
            embedding="embed_tokens.weight",
            final_norm="norm.weight",
            head=("lm_head.weight",),
            layer="layers.{i}.",
            roles={
                "o": "self_attn.o_proj.weight",
                "down": "mlp.down_proj.weight",
                "input_norm": "input_layernorm.weight",
                "post_attn_norm": "post_attention_layernorm.weight",
            },
            fused=(
                Fused("self_attn.qkv_proj.weight", ("q", "k", "v")),
                Fused("mlp.gate_up_proj.weight", ("gate", "up")),
            ),
            gguf_roles={
                "o": "attn_output.weight",
                "down": "ffn_down.weight",
                "input_norm": "attn_norm.weight",
                "post_attn_norm": "ffn_norm.weight",
            },
            # llama.cpp keeps Phi-3's fused gate_up under the name ffn_up.
            gguf_fused=(Fused("attn_qkv.weight", ("q", "k", "v")), Fused("ffn_up.weight", ("gate", "up"))),
        ),
        Family(
            name="gpt2",
            model_types=("gpt2",),
            gguf_architectures=("gpt2",),
            prefixes=("transformer.", ""),
            embedding="wte.weight",
            final_norm="ln_f.weight",
            head=("lm_head.weight",),
            layer="h.{i}.",
            roles={
                "o": "attn.c_proj.weight",
                "up": "mlp.c_fc.weight",
                "down": "mlp.c_proj.weight",
                "input_norm": "ln_1.weight",
                "post_attn_norm": "ln_2.weight",
            },
            fused=(Fused("attn.c_attn.weight", ("q", "k", "v")),),
            # GPT-2 uses Conv1D modules, which store weights as [in, out].
            stored_in_out=frozenset({"o", "up", "down", "attn.c_attn.weight"}),
            gguf_roles={
                "o": "attn_output.weight",
                "up": "ffn_up.weight",
                "down": "ffn_down.weight",
                "input_norm": "attn_norm.weight",
                "post_attn_norm": "ffn_norm.weight",
            },
            gguf_fused=(Fused("attn_qkv.weight", ("q", "k", "v")),),
        ),
        Family(
            name="gpt_neox",
            model_types=("gpt_neox",),
            gguf_architectures=("gptneox",),
            prefixes=("gpt_neox.",),
            embedding="embed_in.weight",
            final_norm="final_layer_norm.weight",
            head=("embed_out.weight",),
            layer="layers.{i}.",
            roles={
                "o": "attention.dense.weight",
                "up": "mlp.dense_h_to_4h.weight",
                "down": "mlp.dense_4h_to_h.weight",
                "input_norm": "input_layernorm.weight",
                "post_attn_norm": "post_attention_layernorm.weight",
            },
            fused=(Fused("attention.query_key_value.weight", ("q", "k", "v"), interleaved_per_head=True),),
            gguf_roles={
                "o": "attn_output.weight",
                "up": "ffn_up.weight",
                "down": "ffn_down.weight",
                "input_norm": "attn_norm.weight",
                "post_attn_norm": "ffn_norm.weight",
            },
            gguf_fused=(Fused("attn_qkv.weight", ("q", "k", "v"), interleaved_per_head=True),),
        ),
    )
}

SUPPORTED = tuple(FAMILIES)

# GGUF tensor names outside the blocks.
GGUF_EMBEDDING = "token_embd.weight"
GGUF_HEAD = "output.weight"
GGUF_FINAL_NORM = "output_norm.weight"


def family_for_model_type(model_type: str) -> Family | None:
    """Return the family whose config.json `model_type` this is, or None."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    return None


def family_for_gguf(architecture: str) -> Family | None:
    """Return the family whose GGUF `general.architecture` this is, or None."""
    for family in FAMILIES.values():
        if architecture in family.gguf_architectures:
            return family
    return None
