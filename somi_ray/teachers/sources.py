"""Open a teacher from a Hugging Face folder, a hub id or a GGUF file, and read it lazily by role.

Nothing here instantiates a model or imports code from the teacher's folder: tensors are read
by name from safetensors or GGUF, and pickle files only on request and with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass

import numpy as np

from . import adapters
from .adapters import NORM_ROLES, Family, Fused
from .errors import TeacherError
from .gguf_reader import GGUFStore
from .package import TeacherInfo
from .safetensors_reader import SafetensorsStore, StateDictStore

log = logging.getLogger(__name__)

PICKLE_FILES = ("pytorch_model.bin", "model.pt", "model.pth")
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "merges.txt", "vocab.json", "*.tiktoken"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Dims:
    """Sizes the adapter's shape checks need, from config.json or GGUF metadata."""

    hidden: int  # N
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class TensorRef:
    """Location of one role of one layer: a plain tensor, or a slice of a fused one."""

    name: str  # stored tensor name
    fused: Fused | None = None
    transpose: bool = False  # stored [in, out]


class TeacherReader:
    """A teacher read by role, one tensor group at a time.

    Matrices come back as float32 [out, in]; fused tensors are split and [in, out] layouts are
    transposed. Norm gains are the effective multipliers (Gemma's stored `gain - 1` gets +1).
    """

    def __init__(self, path: str, store, family: Family, dims: Dims, tokenizer_size: int, tokenizer_loader,
                 *, gguf: bool):
        self.path = path
        self._store = store
        self._family = family
        self._dims = dims
        self._gguf = gguf
        self._tokenizer_loader = tokenizer_loader
        self._tokenizer = None
        self._norm_offset = 0.0 if gguf else family.norm_offset

        self._embedding_name, self._head_name, self._final_norm_name, self._layers = _resolve_names(
            store, family, dims, gguf=gguf, path=path)
        vocab_rows, hidden = store.shape(self._embedding_name)
        if hidden != dims.hidden:
            raise TeacherError(store.file_of(self._embedding_name), self._embedding_name,
                               f"embedding width {hidden} differs from the hidden size {dims.hidden} in the metadata",
                               "check that config.json belongs to these weights")
        if tokenizer_size > vocab_rows:
            raise TeacherError(path, "tokenizer", f"tokenizer defines {tokenizer_size} tokens but the embedding "
                               f"{self._embedding_name} has only {vocab_rows} rows",
                               "use the tokenizer that was saved with these weights")
        self._check_shapes()

        roles: dict[str, int] = {"embedding": 1, "head": 0 if self._head_name is None else 1,
                                 "final_norm": 0 if self._final_norm_name is None else 1}
        for layer in self._layers:
            for role in layer:
                roles[role] = roles.get(role, 0) + 1
        self.info = TeacherInfo(
            path=path, family=family.name, n_layers=dims.n_layers, hidden_size=dims.hidden,
            vocab_size=vocab_rows, tokenizer_size=tokenizer_size, tied_embeddings=self._head_name is None,
            roles=roles, file_bytes=store.file_bytes,
        )
        log.info("opened %s teacher %s: %d layers, hidden %d, %d tokens", family.name, path, dims.n_layers,
                 dims.hidden, tokenizer_size)

    @property
    def dims(self) -> Dims:
        """Head counts and sizes used by the shape checks and the OV operator."""
        return self._dims

    # -- tokenizer ------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The teacher's `tokenizers.Tokenizer`, built on first use."""
        if self._tokenizer is None:
            self._tokenizer = self._tokenizer_loader()
        return self._tokenizer

    # -- tensors --------------------------------------------------------------------------------

    def embedding(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Return the token embedding (tokenizer_size, N) float32, or only the given rows."""
        return self._load_rows(self._embedding_name, rows)

    def head(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Return the output head (tokenizer_size, N) float32; the embedding when tied."""
        return self._load_rows(self._head_name or self._embedding_name, rows)

    def final_norm(self) -> np.ndarray | None:
        """Return the final norm's gain (N,), or None when the family has none."""
        if self._final_norm_name is None:
            return None
        return self._load(self._final_norm_name) + self._norm_offset

    def layer(self, index: int, roles: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Load one layer's tensors by role (all roles, or only `roles`), as float32 [out, in]."""
        if not 0 <= index < self._dims.n_layers:
            raise IndexError(f"layer {index} is outside 0..{self._dims.n_layers - 1} of {self.path}")
        refs = self._layers[index]
        wanted = tuple(refs) if roles is None else tuple(role for role in roles if role in refs)

        out: dict[str, np.ndarray] = {}
        fused_cache: dict[str, dict[str, np.ndarray]] = {}
        for role in wanted:
            ref = refs[role]
            if ref.fused is None:
                matrix = self._load(ref.name)
                out[role] = matrix.T.copy() if ref.transpose else matrix
            else:
                if ref.name not in fused_cache:
                    fused_cache[ref.name] = self._split_fused(ref)
                out[role] = fused_cache[ref.name][role]
            if role in NORM_ROLES:
                out[role] = out[role] + self._norm_offset
            elif self._gguf and self._family.gguf_qk_permuted and role in ("q", "k"):
                heads = self._dims.n_heads if role == "q" else self._dims.n_kv_heads
                out[role] = _undo_llama_cpp_permute(out[role], heads)
        return out

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> "TeacherReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------

    def _load(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        if rows is not None and isinstance(self._store, GGUFStore):
            values = self._store.load(name, rows)
        else:
            values = self._store.load(name)
            if rows is not None:
                values = values[rows]
        bad = values.size - int(np.isfinite(values).sum())
        if bad:
            raise TeacherError(self._store.file_of(name), name, f"{bad} of {values.size} values are NaN or Inf",
                               "download or export the checkpoint again; the weights are damaged")
        return values

    def _load_rows(self, name: str, rows: np.ndarray | None) -> np.ndarray:
        if rows is None:
            rows = np.arange(self.info.tokenizer_size)  # rows beyond the tokenizer are padding
        return self._load(name, np.asarray(rows, dtype=np.int64))

    def _split_fused(self, ref: TensorRef) -> dict[str, np.ndarray]:
        matrix = self._load(ref.name)
        if ref.transpose:
            matrix = matrix.T
        sizes = _fused_sizes(ref.fused, self._dims, matrix.shape[0])
        if ref.fused.interleaved_per_head:
            # GPT-NeoX stores rows as (head, q|k|v, head_dim).
            heads, head_dim = self._dims.n_heads, self._dims.head_dim
            blocks = matrix.reshape(heads, len(ref.fused.roles), head_dim, matrix.shape[1])
            return {role: np.ascontiguousarray(blocks[:, j].reshape(heads * head_dim, -1))
                    for j, role in enumerate(ref.fused.roles)}
        bounds = np.cumsum([0, *sizes])
        return {role: np.ascontiguousarray(matrix[bounds[j]:bounds[j + 1]]) for j, role in enumerate(ref.fused.roles)}

    def _check_shapes(self) -> None:
        dims = self._dims
        down_ref = self._layers[0].get("down")
        intermediate = None
        if down_ref is not None:
            shape = self._store.shape(down_ref.name)
            intermediate = shape[0] if down_ref.transpose else shape[-1]
        for index, refs in enumerate(self._layers):
            checked: set[str] = set()
            for role, ref in refs.items():
                if ref.name in checked:
                    continue
                checked.add(ref.name)
                stored = self._store.shape(ref.name)
                actual = tuple(reversed(stored)) if ref.transpose else stored
                expected = _expected_shape(role, ref, dims, intermediate)
                if actual != expected:
                    layout = " (stored [in, out], shown transposed)" if ref.transpose else ""
                    raise TeacherError(self._store.file_of(ref.name), ref.name,
                                       f"shape {actual}{layout} does not match {expected} expected for role "
                                       f"{role!r} of layer {index}",
                                       "check that config.json (heads, head_dim, hidden size) belongs to these weights")


def _expected_shape(role: str, ref: TensorRef, dims: Dims, intermediate: int | None) -> tuple[int, ...]:
    n, hd = dims.hidden, dims.head_dim
    if ref.fused is not None:
        rows = sum(_fused_sizes(ref.fused, dims, None, intermediate))
        return (rows, n)
    table = {
        "q": (dims.n_heads * hd, n), "k": (dims.n_kv_heads * hd, n), "v": (dims.n_kv_heads * hd, n),
        "o": (n, dims.n_heads * hd), "gate": (intermediate, n), "up": (intermediate, n), "down": (n, intermediate),
        "q_norm": (hd,), "k_norm": (hd,),
    }
    return table.get(role, (n,))


def _fused_sizes(fused: Fused, dims: Dims, total_rows: int | None, intermediate: int | None = None) -> list[int]:
    if fused.roles == ("q", "k", "v"):
        return [dims.n_heads * dims.head_dim, dims.n_kv_heads * dims.head_dim, dims.n_kv_heads * dims.head_dim]
    if fused.roles == ("gate", "up"):
        half = intermediate if intermediate is not None else total_rows // 2
        return [half, half]
    raise ValueError(f"no split rule for fused roles {fused.roles}")


def _undo_llama_cpp_permute(matrix: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's converter reorders each head's rows from [first half | second half] to
    # interleaved pairs for its rotary embedding; this is the inverse reshape.
    rows, cols = matrix.shape
    return np.ascontiguousarray(matrix.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols))


def _resolve_names(store, family: Family, dims: Dims, *, gguf: bool, path: str):
    names = store.names
    if gguf:
        prefix, layer_prefix = "", "blk.{i}."
        embedding, final_norm = adapters.GGUF_EMBEDDING, adapters.GGUF_FINAL_NORM
        heads = (adapters.GGUF_HEAD,)
        roles, fused, in_out = family.gguf_roles, family.gguf_fused, frozenset()
    else:
        prefix = next((p for p in family.prefixes if p + family.embedding in names), None)
        if prefix is None:
            raise TeacherError(path, family.prefixes[0] + family.embedding,
                               f"embedding tensor not found in the {family.name} checkpoint",
                               "check that the weights are complete and match config.json's model_type")
        layer_prefix = prefix + family.layer
        embedding, final_norm = prefix + family.embedding, prefix + family.final_norm
        heads, roles, fused, in_out = family.head, family.roles, family.fused, family.stored_in_out

    if embedding not in names:
        raise TeacherError(path, embedding, "embedding tensor is missing", "download the complete checkpoint")
    head = next((name for name in heads if name in names), None)

    layers: list[dict[str, TensorRef]] = []
    for index in range(dims.n_layers):
        base = layer_prefix.format(i=index)
        refs: dict[str, TensorRef] = {}
        for role, relative in roles.items():
            if base + relative in names:
                refs[role] = TensorRef(base + relative, transpose=role in in_out)
        for spec in fused:
            if base + spec.tensor in names:
                for role in spec.roles:
                    refs[role] = TensorRef(base + spec.tensor, fused=spec, transpose=spec.tensor in in_out)
        missing = [role for role in adapters.OPERATOR_ROLES + ("input_norm",) if role not in refs]
        if missing:
            expected = {**roles, **{r: s.tensor for s in fused for r in s.roles}}
            tensor = base + expected.get(missing[0], missing[0])
            raise TeacherError(path, tensor, f"layer {index} lacks roles {missing} of the {family.name} adapter",
                               "download the complete checkpoint, or check num_hidden_layers in the metadata")
        layers.append(refs)
    return embedding, head, final_norm if final_norm in names else None, layers


# -- opening ------------------------------------------------------------------------------------


def open_teacher(path: str, *, allow_pickle: bool = False) -> TeacherReader:
    """Open a teacher from a local folder, a .gguf file or a hub id, reading metadata only."""
    path = os.fspath(path)
    if not os.path.exists(path):
        if _HUB_ID.match(path):
            path = _download_from_hub(path)
        else:
            raise TeacherError(path, "path", "no such file or folder",
                               "pass a Hugging Face folder, a .gguf file or a hub id such as org/name")

    if os.path.isfile(path):
        if os.path.basename(path) in PICKLE_FILES or path.endswith((".bin", ".pt", ".pth")):
            return _open_folder(os.path.dirname(path) or ".", allow_pickle=allow_pickle, pickle_file=path)
        return _open_gguf(path)
    return _open_folder(path, allow_pickle=allow_pickle)


def _download_from_hub(repo_id: str) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline:
        raise TeacherError(repo_id, "hub id", "not a local path, and HF_HUB_OFFLINE is set so the hub is not asked",
                           "download the model on a machine with hub access and pass its local folder")
    from huggingface_hub import snapshot_download

    log.info("downloading %s from the Hugging Face hub (safetensors, JSON and tokenizer files only)", repo_id)
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)
    except Exception as error:  # network, auth and not-found errors all mean the same to the caller
        raise TeacherError(repo_id, "hub id", f"download failed ({type(error).__name__}: {error})",
                           "check the id and network access, or pass a local folder") from None


def _read_config(folder: str) -> dict:
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise TeacherError(config_path, "config.json", "file is missing",
                           "copy the model's config.json into the folder")
    try:
        with open(config_path) as handle:
            config = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TeacherError(config_path, "config.json", f"file is not valid JSON ({error})",
                           "download config.json again") from None
    if not isinstance(config, dict):
        raise TeacherError(config_path, "config.json", "top level is not a JSON object", "download config.json again")
    text = config.get("text_config")
    if isinstance(text, dict):  # multimodal wrappers keep the language model's sizes here
        config = {**config, **text, "model_type": config.get("model_type", text.get("model_type"))}
    return config


def _config_int(config: dict, config_path: str, keys: tuple[str, ...], default: int | None = None) -> int:
    for key in keys:
        value = config.get(key)
        if value is not None:
            if not isinstance(value, int) or value <= 0:
                raise TeacherError(config_path, key, f"value {value!r} is not a positive integer",
                                   "fix config.json")
            return value
    if default is None:
        raise TeacherError(config_path, keys[0], "field is missing", "fix config.json")
    return default


def _family_or_error(family: Family | None, name: str, file: str, field: str) -> Family:
    if family is None:
        raise TeacherError(file, field, f"family {name!r} has no adapter; supported: {', '.join(adapters.SUPPORTED)}",
                           "convert the model to a supported family or add an adapter table in adapters.py")
    return family


def _open_folder(folder: str, *, allow_pickle: bool, pickle_file: str | None = None) -> TeacherReader:
    entries = os.listdir(folder)
    if not entries:
        raise TeacherError(folder, "folder", "folder is empty",
                           "pass a folder with config.json, *.safetensors and tokenizer files")
    config = _read_config(folder)
    config_path = os.path.join(folder, "config.json")
    model_type = config.get("model_type")
    if not model_type:
        raise TeacherError(config_path, "model_type", "field is missing", "add the model's model_type to config.json")
    family = _family_or_error(adapters.family_for_model_type(model_type), model_type, config_path, "model_type")

    hidden = _config_int(config, config_path, ("hidden_size", "n_embd", "d_model"))
    heads = _config_int(config, config_path, ("num_attention_heads", "n_head"))
    dims = Dims(
        hidden=hidden,
        n_layers=_config_int(config, config_path, ("num_hidden_layers", "n_layer")),
        n_heads=heads,
        n_kv_heads=_config_int(config, config_path, ("num_key_value_heads",), heads),
        head_dim=_config_int(config, config_path, ("head_dim",), hidden // heads),
    )

    store = None if pickle_file else SafetensorsStore.from_folder(folder)
    if store is None:
        store = _open_pickle(folder, entries, allow_pickle, pickle_file)
    tokenizer_size, loader = _folder_tokenizer(folder)
    return TeacherReader(folder, store, family, dims, tokenizer_size, loader, gguf=False)


def _open_pickle(folder: str, entries: list[str], allow_pickle: bool, pickle_file: str | None):
    path = pickle_file or next((os.path.join(folder, name) for name in PICKLE_FILES if name in entries), None)
    if path is None:
        raise TeacherError(folder, "*.safetensors", "no safetensors weights (and no pickle checkpoint) found",
                           "download the model's *.safetensors files into the folder")
    if not allow_pickle:
        raise TeacherError(path, "weights", "checkpoint is a pickle file, which can run code when loaded",
                           "convert it to safetensors, or pass allow_pickle=True to load it with "
                           "torch.load(weights_only=True)")
    import torch

    log.warning("loading pickle checkpoint %s with torch.load(weights_only=True)", path)
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # weights_only rejects any object outside plain tensors and containers
        raise TeacherError(path, "weights", f"torch.load(weights_only=True) failed ({type(error).__name__}: {error})",
                           "convert the checkpoint to safetensors") from None
    return StateDictStore(path, tensors)


def _folder_tokenizer(folder: str):
    from tokenizers import Tokenizer

    tokenizer_json = os.path.join(folder, "tokenizer.json")
    vocab_json, merges_txt = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    if os.path.exists(tokenizer_json):
        try:
            tokenizer = Tokenizer.from_file(tokenizer_json)
        except Exception as error:  # tokenizers raises its own Exception type on malformed JSON
            raise TeacherError(tokenizer_json, "tokenizer.json", f"file cannot be parsed ({error})",
                               "download tokenizer.json again") from None
    elif os.path.exists(vocab_json) and os.path.exists(merges_txt):
        from tokenizers import decoders, models, pre_tokenizers

        tokenizer = Tokenizer(models.BPE.from_file(vocab_json, merges_txt))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
    else:
        # NOTE: a folder with only a SentencePiece tokenizer.model is rejected here; converting it
        # needs transformers' slow-to-fast converter, which this reader does not call.
        raise TeacherError(os.path.join(folder, "tokenizer.json"), "tokenizer.json", "tokenizer file is missing",
                           "save the tokenizer beside the weights with AutoTokenizer.save_pretrained(folder)")
    return tokenizer_size_of(tokenizer), lambda: tokenizer


def tokenizer_size_of(tokenizer) -> int:
    """Return one more than the largest token id the tokenizer defines (ids may have holes)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def _open_gguf(path: str) -> TeacherReader:
    store = GGUFStore(path)
    architecture = store.field("general.architecture")
    if architecture is None:
        raise TeacherError(path, "general.architecture", "metadata field is missing",
                           "convert the model again with llama.cpp's convert_hf_to_gguf.py")
    family = _family_or_error(adapters.family_for_gguf(architecture), architecture, path, "general.architecture")

    def number(key: str, default: int | None = None) -> int:
        value = store.field(f"{architecture}.{key}", default)
        if value is None or isinstance(value, list) or int(value) <= 0:
            raise TeacherError(path, f"{architecture}.{key}", f"metadata value {value!r} is missing or invalid",
                               "convert the model again with llama.cpp's convert_hf_to_gguf.py")
        return int(value)

    hidden, heads = number("embedding_length"), number("attention.head_count")
    dims = Dims(hidden=hidden, n_layers=number("block_count"), n_heads=heads,
                n_kv_heads=number("attention.head_count_kv", heads),
                head_dim=number("attention.key_length", hidden // heads))

    tokenizer_size = store.array_length("tokenizer.ggml.tokens")
    if tokenizer_size == 0:
        raise TeacherError(path, "tokenizer.ggml.tokens", "GGUF has no tokenizer vocabulary",
                           "convert the model again so the tokenizer metadata is included")
    return TeacherReader(path, store, family, dims, tokenizer_size, lambda: _gguf_tokenizer(path), gguf=True)


def _gguf_tokenizer(path: str):
    # transformers rebuilds a `tokenizers.Tokenizer` from the GGUF's tokenizer metadata without
    # reading any tensors. The module is internal to transformers (checked with 5.25).
    try:
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError as error:
        raise TeacherError(path, "tokenizer.ggml.*", f"building a tokenizer from GGUF metadata needs "
                           f"transformers ({error})", "pip install 'somi-ray[teachers]'") from None
    try:
        architecture, tokenizer_dict, _ = get_gguf_tokenizer(path)
        tokenizer, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except Exception as error:  # transformers raises many types for unsupported tokenizer metadata
        raise TeacherError(path, "tokenizer.ggml.model", f"tokenizer cannot be rebuilt ({type(error).__name__}: "
                           f"{error})", "use a GGUF with a gpt2 (byte-level BPE) or llama (SentencePiece) "
                           "tokenizer") from None
    return tokenizer
