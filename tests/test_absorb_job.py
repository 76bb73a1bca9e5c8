"""The absorb job end to end on a local loopback Ray: the real SmolLM2 teacher and real text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actors.absorber import AbsorbJob, JobError, format_table, run_absorb_job
from somi_ray.lineage import REQUIRED_FILES, load_checkpoint, load_lineage
from tests.conftest import ray_listeners_of, session_process_ids

LOOPBACK_ADDRESSES = {"127.0.0.1", "::ffff:127.0.0.1"}


def _held_out_slice(shakespeare_paths, tmp_path: Path, n_chars: int = 6000) -> Path:
    text = shakespeare_paths["heldout"].read_text(encoding="utf-8")[:n_chars]
    path = tmp_path / "heldout.txt"
    path.write_text(text, encoding="utf-8")
    return path


def _train_slice(shakespeare_paths, tmp_path: Path, n_chars: int = 200_000) -> Path:
    text = shakespeare_paths["train"].read_text(encoding="utf-8")[:n_chars]
    path = tmp_path / "train.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.slow
def test_absorb_job_on_real_teacher(ray_session, smollm2_path, shakespeare_paths, tmp_path):
    out = tmp_path / "somi"
    job = AbsorbJob(
        teachers=[str(smollm2_path)],
        corpus=str(_train_slice(shakespeare_paths, tmp_path)),
        eval_texts={"shakespeare": str(_held_out_slice(shakespeare_paths, tmp_path))},
        out=str(out), steps=6, batch_size=4, seq_len=64, hidden_size=32, n_parts=2,
        eval_bytes=4000, teacher_eval_bytes=1500, commit_every=3,
    )
    report = run_absorb_job(job)

    names = [row["name"] for row in report.rows]
    assert names[0] == "unigram (SOMI tokenizer)"
    assert "SOMI before absorbing" in names
    assert any(name.startswith("SOMI after absorbing") for name in names)
    assert "SOMI after 6 learning steps" in names
    assert any(name.startswith("teacher ") for name in names)
    for row in report.rows:
        value = row["bpb"]["shakespeare"]
        assert 0.1 < value < 30.0, f"{row['name']} scored {value} bits per byte"
    teacher_row = next(row for row in report.rows if row["name"].startswith("teacher "))
    unigram_row = report.rows[0]
    assert teacher_row["bpb"]["shakespeare"] < unigram_row["bpb"]["shakespeare"]
    assert "shakespeare" in format_table(report)

    for name in REQUIRED_FILES:
        assert (out / name).is_file(), f"checkpoint lacks {name}"
    kinds = [event.kind for event in load_lineage(out)]
    assert kinds[:3] == ["init", "absorb-attempt", "absorb"]
    assert kinds.count("learn") == 2
    checkpoint = load_checkpoint(out)
    assert checkpoint.model.config.hidden_size == 32
    assert checkpoint.model.config.vocab_size == 49152
    assert checkpoint.version == report.version


@pytest.mark.slow
def test_ray_listens_on_loopback_only(ray_session):
    @ray_session.remote(num_cpus=0.1)
    def ping() -> int:
        return 1

    assert ray_session.get(ping.remote()) == 1
    listeners = ray_listeners_of(session_process_ids())
    assert listeners, "found no Ray listener to check"
    outside = [(address, pid) for address, pid in listeners if address not in LOOPBACK_ADDRESSES]
    assert not outside, f"listeners outside loopback: {outside}"


def test_missing_teacher_names_the_file(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text " * 100)
    job = AbsorbJob(teachers=[str(tmp_path / "absent.gguf")], corpus=str(corpus),
                    eval_texts={"x": str(corpus)}, out=str(tmp_path / "out"))
    with pytest.raises(JobError, match="absent.gguf does not exist"):
        run_absorb_job(job)
    assert not (tmp_path / "out").exists()


def test_missing_corpus_names_the_file(tmp_path, smollm2_path):
    job = AbsorbJob(teachers=[str(smollm2_path)], corpus=str(tmp_path / "nothing.txt"),
                    eval_texts={"x": str(tmp_path / "nothing.txt")}, out=str(tmp_path / "out"))
    with pytest.raises(JobError, match="nothing.txt is not a file"):
        run_absorb_job(job)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "not-gguf", "empty-folder"])
def test_damaged_teacher_leaves_no_checkpoint(ray_session, smollm2_path, tmp_path, damage):
    if damage == "truncated":
        teacher = tmp_path / "truncated.gguf"
        with open(smollm2_path, "rb") as source:
            teacher.write_bytes(source.read(20_000_000))
    elif damage == "not-gguf":
        teacher = tmp_path / "model.gguf"
        teacher.write_bytes(b"this is not a model file" * 100)
    else:
        teacher = tmp_path / "empty"
        teacher.mkdir()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Enter Hamlet, reading. " * 200)
    out = tmp_path / "out"
    job = AbsorbJob(teachers=[str(teacher)], corpus=str(corpus), eval_texts={"x": str(corpus)}, out=str(out),
                    steps=1)
    with pytest.raises(JobError) as caught:
        run_absorb_job(job)
    message = str(caught.value)
    assert teacher.name in message
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*")), "a staging folder was left behind"


def test_cli_absorb_reports_bad_teacher(tmp_path, capsys):
    from somi_ray.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("text " * 50)
    code = main(["absorb", "--teacher", str(tmp_path / "gone.gguf"), "--corpus", str(corpus),
                 "--eval", str(corpus), "--out", str(tmp_path / "o"), "--steps", "1"])
    assert code == 1
    assert "gone.gguf does not exist" in capsys.readouterr().err


def test_report_json_round_trip(tmp_path):
    from actors.absorber import JobReport

    report = JobReport(checkpoint="x", version=3)
    report.add("unigram (SOMI tokenizer)", {"shakespeare": 2.9})
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report.as_dict()))
    assert json.loads(path.read_text())["rows"][0]["bpb"]["shakespeare"] == 2.9
