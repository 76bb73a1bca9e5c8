"""Real GGUF teachers: read, align and project all three into one SOMI basis.

The files are located by SOMI_RAY_SMOLLM2, SOMI_RAY_GEMMA3 and SOMI_RAY_QWEN_CODER; each test
is skipped when its variable is unset.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from somi_ray.teachers import build_package, open_teacher

pytestmark = pytest.mark.slow

HIDDEN, PARTS = 256, 4

# name -> (environment variable, family, layers, hidden size, tokenizer size, tied)
EXPECTED = {
    "smollm2": ("SOMI_RAY_SMOLLM2", "llama", 30, 576, 49152, True),
    "gemma3": ("SOMI_RAY_GEMMA3", "gemma3", 18, 640, 262144, True),
    "qwen_coder": ("SOMI_RAY_QWEN_CODER", "qwen2", 24, 896, 151936, False),
}


def teacher_path(name: str) -> str:
    variable = EXPECTED[name][0]
    path = os.environ.get(variable)
    if not path:
        pytest.skip(f"{variable} is not set; point it at the {name} .gguf file to run this test")
    if not os.path.exists(path):
        pytest.skip(f"{variable}={path} does not exist")
    return path


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_teacher_info_and_roles(name):
    _, family, layers, hidden, tokens, tied = EXPECTED[name]
    with open_teacher(teacher_path(name)) as reader:
        info = reader.info
        assert (info.family, info.n_layers, info.hidden_size) == (family, layers, hidden)
        assert info.tokenizer_size == tokens
        assert info.tied_embeddings == tied
        for role in ("q", "k", "v", "o", "gate", "up", "down", "input_norm"):
            assert info.roles[role] == layers, role
        layer = reader.layer(layers - 1, roles=("v", "o", "input_norm"))
        assert layer["o"].shape[0] == hidden
        assert np.isfinite(layer["v"]).all()
        assert reader.tokenizer.get_vocab_size() == tokens


@pytest.fixture(scope="module")
def chain():
    """Project SmolLM2 (PCA basis), then Gemma 3 and Qwen2.5-Coder by Procrustes into it."""
    first = build_package(teacher_path("smollm2"), None, HIDDEN, PARTS)
    with open_teacher(teacher_path("smollm2")) as reader:
        somi_tokenizer = reader.tokenizer
    somi_embedding = np.zeros((first.info.tokenizer_size, HIDDEN), dtype=np.float32)
    somi_embedding[first.vocab.somi_ids] = first.embedding
    packages = {"smollm2": first}
    for name in ("gemma3", "qwen_coder"):
        packages[name] = build_package(teacher_path(name), somi_tokenizer, HIDDEN, PARTS,
                                       somi_embedding=somi_embedding)
    return packages


def test_chain_first_teacher_defines_basis(chain):
    first = chain["smollm2"]
    assert first.basis.method == "pca-gram"
    np.testing.assert_allclose(first.basis.q.T @ first.basis.q, np.eye(HIDDEN), atol=1e-4)
    assert first.vocab.coverage == 1.0
    assert 0.5 < first.basis.energy_kept <= 1.0


@pytest.mark.parametrize("name, min_coverage", [("gemma3", 0.3), ("qwen_coder", 0.6)])
def test_chain_later_teachers_procrustes(chain, name, min_coverage):
    package = chain[name]
    assert package.basis.method == "procrustes"
    assert package.vocab.coverage > min_coverage
    # Unrelated models' embeddings agree only loosely under a rotation; a residual of 1 would
    # mean the map explains nothing.
    assert 0.0 < package.basis.residual < 0.95
    assert package.embedding.shape == (len(package.vocab.somi_ids), HIDDEN)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_chain_bands_valid(chain, name):
    package = chain[name]
    assert len(package.bands) == PARTS
    covered = sorted(layer for band in package.bands for layer in band.layers)
    assert covered == list(range(package.info.n_layers))
    for band in package.bands:
        assert 0.0 < band.energy_delivered <= band.energy_kept <= 1.0
        assert np.isfinite(band.coupling).all()
        assert (band.coupling >= 0).all()
        assert (band.mass > 0).all()
        assert band.mass.mean() == pytest.approx(1.0, rel=1e-4)
        assert band.spectrum["gap"] > 0
