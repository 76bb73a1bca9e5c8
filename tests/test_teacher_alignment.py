"""Vocabulary, basis and projection recover planted structure."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import teacher_fixtures as fixtures  # noqa: E402

from somi_ray.teachers import align_vocab, build_package, canonical_token, fit_basis, iter_bands, open_teacher  # noqa: E402
from somi_ray.teachers.basis import pca_basis, procrustes_basis, randomized_pca  # noqa: E402
from somi_ray.teachers.package import Basis, TeacherInfo, VocabAlignment  # noqa: E402
from somi_ray.teachers.projection import (band_layers, band_mass, default_sparsity, layer_operator,  # noqa: E402
                                          project_operator, spectrum_summary)
from somi_ray.teachers.sources import Dims  # noqa: E402


@pytest.mark.parametrize("byte_level, sentencepiece, text", [
    ("Ġhello", "▁hello", " hello"),
    ("hello", "hello", "hello"),
    ("ĠcafÃ©", "▁café", " café"),
    ("Ċ", "<0x0A>", "\n"),
])
def test_canonical_token_schemes_agree(byte_level, sentencepiece, text):
    assert canonical_token(byte_level, "byte_level") == text
    assert canonical_token(sentencepiece, "sentencepiece") == text


def test_canonical_token_partial_utf8_bytes():
    # "é" is C3 A9: a byte-level token of the first byte and SentencePiece's <0xC3> must agree.
    assert canonical_token("Ã", "byte_level") == canonical_token("<0xC3>", "sentencepiece")
    assert canonical_token("Ã", "byte_level") != canonical_token("<0xA9>", "sentencepiece")


def test_canonical_token_keeps_special_tokens():
    assert canonical_token("<|endoftext|>", "byte_level", special=True) == "<|endoftext|>"
    assert canonical_token("<s>", "sentencepiece", special=True) == "<s>"


def test_two_formats_align_to_same_somi_ids():
    byte_level = fixtures.byte_level_tokenizer()
    sentencepiece = fixtures.sentencepiece_tokenizer()
    somi = byte_level  # SOMI speaks the byte-level tokenizer

    from_byte_level = align_vocab(byte_level, somi)
    from_sentencepiece = align_vocab(sentencepiece, somi)
    for word in fixtures.WORDS:
        somi_id = somi.token_to_id(canonical_to_byte_level(" " + word))
        row = np.flatnonzero(from_sentencepiece.somi_ids == somi_id)
        assert len(row) == 1, word
        assert from_sentencepiece.teacher_ids[row[0]] == sentencepiece.token_to_id("▁" + word)
        assert somi_id in from_byte_level.somi_ids
    assert from_byte_level.coverage == 1.0


def canonical_to_byte_level(text: str) -> str:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    return "".join(alphabet[b] for b in text.encode("utf-8"))


def test_coverage_counts_shared_strings():
    byte_level = fixtures.byte_level_tokenizer()
    sentencepiece = fixtures.sentencepiece_tokenizer()
    alignment = align_vocab(sentencepiece, byte_level)
    # Shared: 256 single bytes, each word with and without a leading space.
    expected = 256 + 2 * len(fixtures.WORDS)
    assert len(alignment.somi_ids) == expected
    assert alignment.coverage == pytest.approx(expected / byte_level.get_vocab_size(with_added_tokens=True))
    assert len(set(alignment.somi_ids.tolist())) == len(alignment.somi_ids)


def test_procrustes_recovers_rotation():
    rng = np.random.default_rng(1)
    teacher = rng.standard_normal((500, 12))
    rotation, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    basis = procrustes_basis(teacher, teacher @ rotation)
    assert basis.residual < 1e-5
    assert basis.scale == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(basis.q, rotation, atol=1e-5)


def test_procrustes_recovers_scale_and_rectangular_map():
    rng = np.random.default_rng(2)
    teacher = rng.standard_normal((400, 20))
    q_true, _ = np.linalg.qr(rng.standard_normal((20, 8)))  # (N, H) orthonormal columns
    somi = 3.0 * teacher @ q_true
    # Only the part of the teacher inside span(q_true) reaches SOMI, so fit on that part.
    basis = procrustes_basis(teacher @ q_true @ q_true.T, somi)
    assert basis.residual < 1e-5
    assert basis.scale == pytest.approx(3.0, rel=1e-5)
    np.testing.assert_allclose(basis.q.T @ basis.q, np.eye(8), atol=1e-5)


def test_fit_basis_uses_shared_rows_only():
    rng = np.random.default_rng(3)
    teacher = rng.standard_normal((50, 10)).astype(np.float32)
    rotation, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    somi = np.zeros((60, 10), dtype=np.float32)
    somi_ids, teacher_ids = np.arange(10, 50), np.arange(0, 40)
    somi[somi_ids] = teacher[teacher_ids] @ rotation
    vocab = VocabAlignment(somi_ids=somi_ids, teacher_ids=teacher_ids, coverage=40 / 60)
    basis = fit_basis(teacher, vocab, 10, somi)
    assert basis.method == "procrustes"
    assert basis.residual < 1e-5


def test_pca_gram_matches_full_svd():
    rng = np.random.default_rng(4)
    embedding = (rng.standard_normal((2000, 6)) @ rng.standard_normal((6, 30))
                 + 0.01 * rng.standard_normal((2000, 30))).astype(np.float32)
    basis = pca_basis(embedding, 6)
    centred = embedding - embedding.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    reference = vt[:6].T
    # Same subspace: the projector difference is small.
    assert np.linalg.norm(basis.q @ basis.q.T - reference @ reference.T) < 1e-3
    assert basis.method == "pca-gram"
    assert 0.99 < basis.energy_kept <= 1.0
    randomized = randomized_pca(embedding, 6)
    assert np.linalg.norm(randomized @ randomized.T - reference @ reference.T) < 1e-3


def test_pca_basis_wider_than_teacher():
    embedding = np.random.default_rng(5).standard_normal((100, 4)).astype(np.float32)
    basis = pca_basis(embedding, 6)
    assert basis.q.shape == (4, 6)
    np.testing.assert_allclose(basis.q @ basis.q.T, np.eye(4), atol=1e-5)


class PlantedReader:
    """A reader stand-in whose layers' coupling operator is a planted matrix."""

    def __init__(self, operators, gains):
        n = operators[0].shape[0]
        self.dims = Dims(hidden=n, n_layers=len(operators), n_heads=1, n_kv_heads=1, head_dim=n)
        self.info = TeacherInfo(path="planted", family="llama", n_layers=len(operators), hidden_size=n,
                                vocab_size=0, tokenizer_size=0, tied_embeddings=True)
        self._operators, self._gains = operators, gains

    def layer(self, index, roles=None):
        n = self.dims.hidden
        # O = C, V = I and a zero MLP make C = O·V exactly.
        return {"v": np.eye(n), "o": self._operators[index], "up": np.zeros((1, n)), "down": np.zeros((n, 1)),
                "input_norm": self._gains[index]}


def test_planted_low_rank_coupling_recovered():
    rng = np.random.default_rng(6)
    n, h = 24, 6
    q, _ = np.linalg.qr(rng.standard_normal((n, h)))
    planted = np.abs(rng.standard_normal((h, h)))
    planted = planted + planted.T
    np.fill_diagonal(planted, 0.0)
    operator = q @ planted @ q.T  # rank h, entirely inside span(Q)
    basis = Basis(q=q.astype(np.float32), method="pca-gram", residual=0.0, energy_kept=1.0)

    reader = PlantedReader([operator, operator], [np.ones(n), np.ones(n)])
    (band,) = list(iter_bands(reader, basis, 1, sparsity=h - 1))
    assert band.layers == [0, 1]
    assert band.energy_kept == pytest.approx(1.0, abs=1e-5)
    assert band.energy_delivered == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(band.coupling * band.scale, planted, atol=1e-4)
    assert band.mask.sum() == h * (h - 1)


def test_projection_drops_energy_outside_basis():
    rng = np.random.default_rng(7)
    n, h = 16, 4
    full, _ = np.linalg.qr(rng.standard_normal((n, n)))
    q, outside = full[:, :h], full[:, h:]
    operator = outside @ np.diag(rng.uniform(1, 2, n - h)) @ outside.T
    basis = Basis(q=q.astype(np.float32), method="pca-gram", residual=0.0, energy_kept=1.0)
    _, _, numbers = project_operator(operator, basis, 3)
    assert numbers["energy_kept"] < 1e-10


def test_coupling_constraints_hold():
    rng = np.random.default_rng(8)
    n, h, k = 20, 12, 3
    q, _ = np.linalg.qr(rng.standard_normal((n, h)))
    basis = Basis(q=q.astype(np.float32), method="pca-gram", residual=0.0, energy_kept=1.0)
    coupling, mask, numbers = project_operator(rng.standard_normal((n, n)), basis, k)
    np.testing.assert_array_equal(coupling, coupling.T)
    assert (coupling >= 0).all()
    assert (np.diag(coupling) == 0).all()
    np.testing.assert_array_equal(mask, mask.T)
    assert (coupling[~mask] == 0).all()
    assert (mask.sum(axis=1) >= 1).all()
    assert coupling.sum(axis=1).mean() == pytest.approx(1.0, rel=1e-5)
    assert numbers["energy_delivered"] <= numbers["energy_kept"] + 1e-9


def test_band_layers_contiguous_and_covering():
    assert band_layers(30, 4) == [list(range(0, 8)), list(range(8, 15)), list(range(15, 22)), list(range(22, 30))]
    assert band_layers(2, 4) == [[0], [0], [1], [1]]
    assert sum(band_layers(7, 7), []) == list(range(7))


def test_band_mass_positive_mean_one():
    q = np.eye(4)[:, :2].astype(np.float32)
    basis = Basis(q=q, method="pca-gram", residual=0.0, energy_kept=1.0)
    mass = band_mass(np.array([1.0, 3.0, 100.0, 100.0]), basis)
    np.testing.assert_allclose(mass, [0.5, 1.5])
    assert (band_mass(np.array([0.0, -2.0, 1.0, 1.0]), basis) > 0).all()


def test_spectrum_of_complete_and_split_graphs():
    h = 6
    complete = np.ones((h, h)) - np.eye(h)
    summary = spectrum_summary(complete)
    assert summary["lambda_0"] == pytest.approx(0.0, abs=1e-9)
    assert summary["gap"] == pytest.approx(h / (h - 1))
    split = np.zeros((h, h))
    split[:3, :3] = split[3:, 3:] = 1.0
    np.fill_diagonal(split, 0.0)
    assert spectrum_summary(split)["gap"] == pytest.approx(0.0, abs=1e-9)
    assert 1.0 < summary["effective_rank"] <= h


def test_default_sparsity():
    assert default_sparsity(256) == 32
    assert default_sparsity(4) == 3


def test_gqa_operator_repeats_value_heads():
    rng = np.random.default_rng(9)
    n, hd = 8, 2
    value = rng.standard_normal((2 * hd, n))  # 2 kv heads
    output = rng.standard_normal((n, 4 * hd))  # 4 query heads
    tensors = {"v": value, "o": output, "up": np.zeros((1, n)), "down": np.zeros((n, 1))}
    heads = [value[:hd], value[:hd], value[hd:], value[hd:]]
    expected = sum(output[:, j * hd:(j + 1) * hd] @ heads[j] for j in range(4))
    np.testing.assert_allclose(layer_operator(tensors, hd), expected, atol=1e-12)


def test_build_package_first_then_second_teacher():
    teachers = fixtures.tiny_teachers()
    stages = []
    first = build_package(teachers["qwen2"], None, 16, 3, progress=lambda *args: stages.append(args))
    assert first.basis.method == "pca-gram"
    assert first.vocab.coverage == 1.0
    assert first.embedding.shape == (first.info.tokenizer_size, 16)
    np.testing.assert_array_equal(first.head, first.embedding)  # qwen2 fixture is tied
    assert len(first.bands) == 3
    assert ("bands", 3, 3) in stages
    with open_teacher(teachers["qwen2"]) as reader:
        np.testing.assert_allclose(first.embedding, reader.embedding() @ first.basis.q, atol=1e-5)

    somi_tokenizer = fixtures.byte_level_tokenizer()  # the qwen2 fixture's tokenizer
    somi_embedding = np.zeros((somi_tokenizer.get_vocab_size(True), 16), dtype=np.float32)
    somi_embedding[first.vocab.somi_ids] = first.embedding
    second = build_package(teachers["gemma3"], somi_tokenizer, 16, 3, somi_embedding=somi_embedding)
    assert second.basis.method == "procrustes"
    assert 0 < second.vocab.coverage < 1
    assert second.embedding.shape == (len(second.vocab.somi_ids), 16)
    assert second.basis.residual > 0
    for band in second.bands:
        assert band.coupling.shape == (16, 16)
        assert 0 <= band.energy_delivered <= band.energy_kept <= 1
        assert band.mass.mean() == pytest.approx(1.0, rel=1e-5)
        assert {"gap", "effective_rank", "lambda_0"} <= set(band.spectrum)


def test_scheme_detected_from_replace_decoder():
    from tokenizers import Tokenizer, decoders, models

    from somi_ray.teachers.vocab import tokenizer_scheme

    tokenizer = Tokenizer(models.BPE(vocab={"▁hi": 0, "hi": 1}, merges=[]))
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse()])
    assert tokenizer_scheme(tokenizer) == "sentencepiece"
