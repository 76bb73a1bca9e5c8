"""Output-space absorption: window text, alignment across tokenizers, the target cache, the loss,
and a served SOMI used as a teacher through its completions API."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

import numpy as np
import pytest
import torch

from somi_ray.distill import (
    ApiTeacher,
    LocalTeacher,
    SomiVocab,
    TargetCache,
    align_window,
    compute_targets,
    distillation_loss,
    stack_targets,
    teacher_key,
    window_key,
)

TEXT = ("the quick brown fox jumps over the lazy dog. the lazy dog sleeps, and the quick fox "
        "runs over the hills to the river where the brown bears fish. ") * 6


def byte_level_bpe(vocab_size: int):
    """A byte-level BPE tokenizer trained on TEXT; the vocabulary size sets how words split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([TEXT], trainer)
    return tokenizer


def metaspace_bpe(vocab_size: int):
    """A SentencePiece-style BPE tokenizer ("▁" for a space) trained on TEXT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>"], show_progress=False)
    tokenizer.train_from_iterator([TEXT], trainer)
    return tokenizer


class PlantedModel:
    """A fake causal LM that puts all mass on the true next token and records every input row."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.rows: list[list[int]] = []

    def __call__(self, input_ids, attention_mask):
        B, L = input_ids.shape
        logits = torch.zeros(B, L, self.vocab_size)
        for b in range(B):
            length = int(attention_mask[b].sum())
            row = input_ids[b, :length].tolist()
            self.rows.append(row)
            for position in range(length - 1):
                logits[b, position, row[position + 1]] = 30.0
        return type("Output", (), {"logits": logits})()


def somi_windows(tokenizer, seq_len: int = 24) -> np.ndarray:
    ids = np.array(tokenizer.encode(TEXT, add_special_tokens=False).ids, dtype=np.int32)
    count = (len(ids) - 1) // seq_len
    return np.stack([ids[i * seq_len:i * seq_len + seq_len + 1] for i in range(count)])


# ------------------------------------------------------------------------------ window text


def test_window_text_spans_match_tokens():
    somi = byte_level_bpe(330)
    vocab = SomiVocab(somi)
    window = somi_windows(somi)[1]
    decoded = vocab.window_text(window)
    assert decoded.text in TEXT
    for token_id, start, end in zip(window, decoded.starts, decoded.ends):
        assert decoded.text[start:end] == somi.decode([int(token_id)])


def test_window_key_depends_on_ids():
    somi = byte_level_bpe(330)
    windows = somi_windows(somi)
    assert window_key(windows[0]) == window_key(windows[0].copy())
    assert window_key(windows[0]) != window_key(windows[1])


# ------------------------------------------------------------------------------ alignment


@pytest.mark.parametrize("teacher_factory", [lambda: byte_level_bpe(280), lambda: metaspace_bpe(120)],
                         ids=["byte-level", "metaspace"])
def test_planted_teacher_maps_to_true_next(teacher_factory):
    somi = byte_level_bpe(330)
    teacher_tokenizer = teacher_factory()
    vocab = SomiVocab(somi)
    model = PlantedModel(teacher_tokenizer)
    teacher = LocalTeacher("planted", model=model, tokenizer=teacher_tokenizer)
    windows = somi_windows(somi)

    agreeing = 0
    for window in windows:
        decoded = vocab.window_text(window)
        prediction = teacher.predict([decoded.text], k=4)[0]
        targets = align_window(decoded, prediction, vocab, k=4)
        teacher_starts = set(prediction.starts)
        for t in range(len(window) - 1):
            start, end = int(decoded.starts[t + 1]), int(decoded.ends[t + 1])
            index = prediction.starts.index(start) if start in teacher_starts else None
            if index is not None and prediction.ends[index] == end:
                # Same boundaries and the same string: SOMI's true next token gets the teacher's mass.
                assert targets.ids[t, 0] == window[t + 1], (t, decoded.text[start:end])
                assert float(targets.logprobs[t, 0]) > -0.01
                assert float(targets.confidence[t]) > 0.99
                agreeing += 1
    assert agreeing > 50


def test_two_teachers_receive_only_own_ids():
    somi = byte_level_bpe(330)
    vocab = SomiVocab(somi)
    windows = somi_windows(somi)[:6]
    texts = [vocab.window_text(w).text for w in windows]
    splits = {}
    for name, tokenizer in [("byte-level", byte_level_bpe(270)), ("metaspace", metaspace_bpe(110))]:
        model = PlantedModel(tokenizer)
        teacher = LocalTeacher(name, model=model, tokenizer=tokenizer)
        teacher.predict(texts, k=4)
        assert len(model.rows) == len(texts)
        for row, text in zip(model.rows, texts):
            assert max(row) < tokenizer.get_vocab_size(with_added_tokens=True)
            assert row == tokenizer.encode(text, add_special_tokens=False).ids
            assert tokenizer.decode(row).replace("▁", " ") == text
        splits[name] = model.rows
    assert splits["byte-level"] != splits["metaspace"]
    assert [len(r) for r in splits["byte-level"]] != [len(r) for r in somi_windows(somi)[:6]]


def test_boundary_inside_teacher_token_uses_known_prefix():
    from somi_ray.distill import TeacherPredictions, WindowText

    somi = byte_level_bpe(330)
    vocab = SomiVocab(somi)
    # SOMI splits " lazy" as " la" + "zy" here; the teacher predicted " lazy" as one token.
    window = WindowText(text="the lazy", starts=np.array([0, 3, 6]), ends=np.array([3, 6, 8]))
    prediction = TeacherPredictions(starts=[3], ends=[8], tokens=[" lazy"],
                                    candidates=[[(" lazy", -0.1), (" quick", -2.5)]])
    targets = align_window(window, prediction, vocab, k=4)
    assert targets.ids[0, 0] == vocab.lookup(" lazy")  # position 0 predicts the string at character 3
    assert targets.ids[1, 0] == vocab.lookup("zy")  # " la" is known; only " lazy" fits and leaves "zy"
    assert targets.ids[1, 1] == -1
    assert vocab.strings[targets.ids[1, 0]] == "zy"[:len(vocab.strings[targets.ids[1, 0]])]


# ------------------------------------------------------------------------------ cache and loss


def test_cache_reused_after_restart(tmp_path):
    somi = byte_level_bpe(330)
    teacher_tokenizer = byte_level_bpe(280)
    windows = somi_windows(somi)[:8]
    model = PlantedModel(teacher_tokenizer)
    teacher = LocalTeacher("planted", model=model, tokenizer=teacher_tokenizer)
    source = str(tmp_path / "teacher.bin")
    (tmp_path / "teacher.bin").write_bytes(b"weights")

    first = compute_targets(teacher, source, windows, somi, tmp_path / "cache", k=4)
    calls = len(model.rows)

    def no_model():
        raise AssertionError("a fully cached run must not load the teacher")

    second = compute_targets(no_model, source, windows, somi, tmp_path / "cache", k=4)
    assert first.computed == 8
    assert first.hit_rate == 0.0
    assert second.computed == 0
    assert second.hit_rate == 1.0
    assert len(model.rows) == calls
    assert first.coverage > 0.5

    cache = TargetCache(tmp_path / "cache", teacher_key(source), SomiVocab(somi).hash, 4)  # a new process
    stored = cache.get(window_key(windows[3]))
    assert stored is not None
    assert stored.ids.dtype == np.int32
    assert stored.logprobs.dtype == np.float16
    assert stored.ids.shape == (len(windows[3]) - 1, 4)


def test_teacher_key_changes_with_file(tmp_path):
    path = tmp_path / "teacher.gguf"
    path.write_bytes(b"a")
    before = teacher_key(str(path))
    path.write_bytes(b"ab")
    assert teacher_key(str(path)) != before
    assert teacher_key("http://127.0.0.1:1/v1").startswith("api-")


def test_distillation_loss_pulls_towards_teacher():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 10, requires_grad=True)
    ids = torch.full((2, 3, 2), -1, dtype=torch.long)
    ids[0, 1] = torch.tensor([7, 2])
    logprobs = torch.zeros(2, 3, 2)
    logprobs[0, 1] = torch.log(torch.tensor([0.9, 0.1]))
    confidence = torch.zeros(2, 3)
    confidence[0, 1] = 0.9

    loss = distillation_loss(logits, ids, logprobs, confidence)
    loss.backward()
    assert loss.item() > 0
    assert logits.grad[0, 1, 7] < 0  # descending raises the teacher's favourite
    assert torch.all(logits.grad[1] == 0)  # positions without targets get no gradient

    empty = distillation_loss(logits, torch.full_like(ids, -1), logprobs, confidence)
    assert empty.item() == 0.0


def test_stress_weights_positions():
    logits = torch.zeros(1, 2, 4)
    ids = torch.tensor([[[1, -1], [1, -1]]])
    logprobs = torch.zeros(1, 2, 2)
    confidence = torch.ones(1, 2)
    calm = distillation_loss(logits, ids, logprobs, confidence, torch.tensor([[1.0, 1.0]]))
    stressed = distillation_loss(logits, ids, logprobs, confidence, torch.tensor([[0.1, 3.0]]))
    assert stressed.item() > calm.item()


def test_stack_targets_leaves_missing_windows_empty():
    somi = byte_level_bpe(330)
    teacher_tokenizer = byte_level_bpe(280)
    vocab = SomiVocab(somi)
    window = somi_windows(somi)[0]
    teacher = LocalTeacher("planted", model=PlantedModel(teacher_tokenizer), tokenizer=teacher_tokenizer)
    decoded = vocab.window_text(window)
    targets = align_window(decoded, teacher.predict([decoded.text], 4)[0], vocab, 4)
    ids, logprobs, confidence = stack_targets([targets, None], len(window) - 1, 4)
    assert ids.shape == (2, len(window) - 1, 4)
    assert bool((ids[1] == -1).all())
    assert bool((ids[0, :, 0] >= 0).any())


def test_tiny_transformers_teacher_targets(tmp_path):
    from tests.teacher_fixtures import byte_level_tokenizer, tiny_teachers

    folder = tiny_teachers()["qwen2"]
    somi = byte_level_tokenizer()
    text = "the hello world model teacher data " * 8
    ids = np.array(somi.encode(text, add_special_tokens=False).ids, dtype=np.int32)
    windows = np.stack([ids[:17], ids[17:34]])
    report = compute_targets(LocalTeacher(folder), folder, windows, somi, tmp_path, k=8)
    assert report.windows == 2
    assert report.coverage > 0.9  # both tokenizers are the same byte-level fixture, so every position aligns
    assert report.teacher_tokens > 0


# ------------------------------------------------------------------------------ served SOMI as a teacher


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served_teacher(ray_session):
    """A tiny SOMI checkpoint served on 127.0.0.1 by the session's Ray; yields (base URL, tokenizer)."""
    from ray import serve

    from actors.serve_app import ServeOptions, run_server
    from somi_ray.config import SomiConfig
    from somi_ray.lineage import Lineage, save_checkpoint
    from somi_ray.model import SomiModel

    temp = tempfile.mkdtemp(prefix="sd", dir="/tmp")
    checkpoint = os.path.join(temp, "teacher")
    tokenizer = byte_level_bpe(300)
    model = SomiModel(SomiConfig.auto(32, 1, vocab_size=tokenizer.get_vocab_size(with_added_tokens=True)), seed=1)
    lineage = Lineage()
    lineage.append("init", {"hidden_size": 32, "n_parts": 1}, {})
    save_checkpoint(checkpoint, model, tokenizer.to_str(), lineage)
    options = ServeOptions(checkpoint_dir=checkpoint, model_name="somi-teacher", max_prompt_tokens=256)
    try:
        url = run_server(options, "127.0.0.1", free_port(), block=False)
        yield url, tokenizer, temp
    finally:
        serve.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_served_logprobs_echo(served_teacher):
    url, tokenizer, _ = served_teacher
    prompt = TEXT[:120]
    prediction = ApiTeacher(url).predict([prompt], k=5)[0]
    ids = tokenizer.encode(prompt).ids
    assert len(prediction.tokens) == len(ids) - 1  # every prompt token but the first
    assert "".join([tokenizer.decode(ids[:1])] + prediction.tokens) == prompt
    assert all(1 <= len(c) <= 5 for c in prediction.candidates)  # ids that decode alike are merged
    assert all(lp <= 0.0 for c in prediction.candidates for _, lp in c)
    assert all(a <= b for a, b in zip(prediction.ends, prediction.ends[1:]))


@pytest.mark.slow
def test_absorb_outputs_from_served_teacher(served_teacher):
    from actors.absorber import AbsorbJob, run_absorb_job

    url, _, temp = served_teacher
    corpus = os.path.join(temp, "corpus.txt")
    heldout = os.path.join(temp, "heldout.txt")
    with open(corpus, "w") as handle:
        handle.write(TEXT)
    with open(heldout, "w") as handle:
        handle.write(TEXT[:400])

    # The student uses a different tokenizer from the served teacher's.
    student = os.path.join(temp, "student")
    from somi_ray.config import SomiConfig
    from somi_ray.lineage import Lineage, save_checkpoint
    from somi_ray.model import SomiModel

    tokenizer = byte_level_bpe(340)
    lineage = Lineage()
    lineage.append("init", {"hidden_size": 16, "n_parts": 1}, {})
    model = SomiModel(SomiConfig.auto(16, 1, vocab_size=tokenizer.get_vocab_size(with_added_tokens=True)))
    save_checkpoint(student, model, tokenizer.to_str(), lineage)

    job = AbsorbJob(teachers=[url], corpus=corpus, eval_texts={"toy": heldout}, out=student, steps=4,
                    batch_size=2, seq_len=16, absorb_from="outputs", distill_k=5, distill_windows=8,
                    target_cache=os.path.join(temp, "targets"), eval_bytes=400, commit_every=2, curve=True,
                    num_cpus=2)
    report = run_absorb_job(job)
    assert report.absorb_from == "outputs"
    assert report.targets[0]["windows"] == 8
    assert report.targets[0]["coverage"] > 0.5
    assert len(report.curves["learning"]) == 2

    from somi_ray.lineage import load_checkpoint

    events = list(load_checkpoint(student, torch.device("cpu")).lineage)
    learned = [e for e in events if e.kind == "learn"]
    assert learned
    assert learned[-1].details["absorb_from"] == "outputs"
    assert learned[-1].details["distill_teachers"][0]["teacher"] == url
