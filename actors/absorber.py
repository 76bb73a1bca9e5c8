"""The absorb job: teachers in parallel on Ray, absorbed into one SOMI model that keeps learning.

Flow: open every teacher in its own TeacherActor (in parallel) -> the first teacher's tokenizer
and embedding define a new SOMI model (unless the output folder already holds one) -> each
teacher's package header and streamed bands are absorbed by the ModelActor -> the model
learns from StressSampler batches -> bits per byte on held-out text is reported next to a
unigram baseline and the teachers' own scores.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


class JobError(RuntimeError):
    """The job cannot run with the given inputs; the message names the input and the fix."""


@dataclass
class AbsorbJob:
    """Inputs of `somi-ray absorb`."""

    teachers: list[str]  # teacher paths (.gguf files or Hugging Face folders), absorbed in this order
    corpus: str  # training text file
    eval_texts: dict[str, str]  # domain -> held-out text file
    out: str  # checkpoint folder
    steps: int = 200  # learning steps after absorption
    batch_size: int = 8
    seq_len: int = 128
    hidden_size: int = 128
    n_parts: int = 2
    strength: float = 0.5  # blend strength of teachers absorbed into an existing model
    mode: str = "blend"  # "blend" or "spectral"
    eval_bytes: int | None = 60_000  # bytes of each held-out text scored for SOMI and the baselines
    teacher_eval_bytes: int | None = 20_000  # bytes scored for each teacher (slow on CPU)
    score_teachers: bool = True
    commit_every: int = 50  # learning steps per learn event
    seed: int = 0
    address: str | None = None  # Ray cluster address; None starts an embedded loopback-only Ray
    num_cpus: float | None = None


@dataclass
class JobReport:
    """Bits per byte of every row of the results table, per held-out domain."""

    rows: list[dict] = field(default_factory=list)  # {"name": ..., "bpb": {domain: value}, ...}
    teachers: list[dict] = field(default_factory=list)
    checkpoint: str = ""
    version: int = 0
    seconds: float = 0.0

    def add(self, name: str, bpb: dict[str, float], **extra) -> None:
        self.rows.append({"name": name, "bpb": dict(bpb), **extra})

    def as_dict(self) -> dict:
        return asdict(self)


def _check_inputs(job: AbsorbJob) -> None:
    if not job.teachers:
        raise JobError("no teacher given; pass --teacher PATH (a .gguf file or a Hugging Face folder)")
    for path in job.teachers:
        if not Path(path).exists():
            raise JobError(f"teacher {path} does not exist; run scripts/setup.sh to fetch the real teachers "
                           "or pass an existing .gguf file or model folder")
    for label, path in [("corpus", job.corpus), *[(f"eval text {d}", p) for d, p in job.eval_texts.items()]]:
        if not Path(path).is_file():
            raise JobError(f"{label} {path} is not a file; pass a UTF-8 text file")
    if job.steps < 0 or job.batch_size < 1 or job.seq_len < 2:
        raise JobError(f"steps, batch size and sequence length must be positive, got {job.steps}, "
                       f"{job.batch_size}, {job.seq_len}")
    if job.hidden_size < 4 or job.n_parts < 1:
        raise JobError(f"hidden size must be >= 4 and Parts >= 1, got {job.hidden_size} and {job.n_parts}")


def _unwrap(error: Exception) -> Exception:
    """The original exception inside a RayTaskError, when there is one."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, Exception) else error


def run_absorb_job(job: AbsorbJob, progress: Callable[[str], None] | None = None,
                   bar: Callable | None = None) -> JobReport:
    """Run the whole job and return its report. `progress` receives one line per stage;
    `bar(total, description)` returns an object with update(n) and close() for long loops."""
    from actors.model_actor import remote_model_actor
    from actors.runtime import RayOptions, start_ray
    from actors.stress_sampler import StressSampler
    from actors.teacher_actor import remote_teacher_actor

    say = progress or (lambda message: None)
    started = time.time()
    _check_inputs(job)
    texts = {domain: Path(path).read_text(encoding="utf-8") for domain, path in job.eval_texts.items()}

    ray = start_ray(RayOptions(address=job.address, num_cpus=job.num_cpus))
    report = JobReport(checkpoint=str(Path(job.out).resolve()))

    say(f"opening {len(job.teachers)} teacher(s) in parallel")
    teachers = [remote_teacher_actor(path) for path in job.teachers]
    infos = []
    for path, actor in zip(job.teachers, teachers):
        try:
            infos.append(ray.get(actor.info.remote()))
        except Exception as error:  # a damaged teacher ends the job before anything is written
            raise JobError(f"teacher {path} could not be read: {_unwrap(error)}") from None
    for info in infos:
        say(f"  {info['path']}: {info['family']}, {info['n_layers']} layers, hidden {info['hidden_size']}, "
            f"vocabulary {info['tokenizer_size']}")

    model = remote_model_actor(job.out)
    state = ray.get(model.info.remote())
    first_header = None
    if not state["initialized"]:
        say("building SOMI's basis from the first teacher's embedding")
        try:
            first_header = ray.get(teachers[0].header.remote(job.hidden_size))
            tokenizer_json = ray.get(teachers[0].tokenizer_json.remote())
        except Exception as error:
            raise JobError(f"teacher {job.teachers[0]} could not be read: {_unwrap(error)}") from None
        state = ray.get(model.initialize.remote(
            tokenizer_json, job.hidden_size, job.n_parts, job.seed,
            {"tokenizer_from": job.teachers[0]}))
        say(f"created SOMI at {state['path']}: hidden {state['hidden_size']}, {state['n_parts']} Parts, "
            f"vocabulary {state['vocab_size']}")
    else:
        say(f"continuing SOMI at {state['path']} (version {state['version']}, {state['events']} events)")
    tokenizer_json = ray.get(model.get_tokenizer_json.remote())

    from tokenizers import Tokenizer

    from somi_ray.evaluate import UnigramModel

    tokenizer = Tokenizer.from_str(tokenizer_json)
    corpus_text = Path(job.corpus).read_text(encoding="utf-8")
    unigram = UnigramModel.fit(tokenizer, corpus_text)
    report.add("unigram (SOMI tokenizer)", {d: unigram.bits_per_byte(t, max_bytes=job.eval_bytes).bpb
                                             for d, t in texts.items()})

    say("scoring SOMI before absorbing")
    report.add("SOMI before absorbing", ray.get(model.evaluate.remote(texts, job.eval_bytes)),
               version=ray.get(model.info.remote())["version"])

    for index, (path, actor) in enumerate(zip(job.teachers, teachers)):
        fresh = index == 0 and first_header is not None
        strength = 1.0 if fresh else job.strength
        say(f"absorbing {path} (strength {strength})")
        try:
            if fresh:
                header = first_header
            else:
                header = ray.get(actor.header.remote(
                    state["hidden_size"],
                    tokenizer_json, ray.get(model.embedding.remote())))
            ray.get(model.begin_absorb.remote(header, strength))
            n_parts = ray.get(model.info.remote())["n_parts"]
            pending = []
            for band_ref in actor.stream_bands.options(num_returns="streaming").remote(n_parts):
                pending.append(model.absorb_band.remote(band_ref, job.mode))
            ray.get(pending)
        except Exception as error:
            cause = _unwrap(error)
            try:
                ray.get(model.abort_absorb.remote(f"{type(cause).__name__}: {cause}"))
            except Exception:
                logger.exception("abort_absorb failed after %s", cause)
            raise JobError(f"absorbing teacher {path} failed and was rolled back: {cause}") from None
        bpb = ray.get(model.evaluate.remote(texts, job.eval_bytes))
        try:
            event = ray.get(model.finish_absorb.remote({"bpb": bpb}))
        except Exception as error:
            raise JobError(f"absorbing teacher {path} failed its check: {_unwrap(error)}") from None
        report.add(f"SOMI after absorbing {Path(path).name}", bpb, version=event["version"])
        report.teachers.append({"path": path, "coverage": float(header.vocab.coverage),
                                "basis": header.basis.method, "basis_residual": float(header.basis.residual),
                                "energy_kept": float(header.basis.energy_kept)})

    if job.steps > 0:
        say(f"learning for {job.steps} steps from {job.corpus}")
        sampler = ray.remote(StressSampler).options(num_cpus=0.25).remote(
            _windows(corpus_text, tokenizer, job.seq_len), seed=job.seed)
        tracker = bar(job.steps, "learning") if bar else None
        done = 0
        while done < job.steps:
            chunk = min(job.commit_every, job.steps - done)
            event = ray.get(model.learn.remote(sampler, chunk, job.batch_size, {"corpus": job.corpus}))
            done += chunk
            if tracker:
                tracker.update(chunk)
            say(f"  step {done}/{job.steps}: loss {event_metric(event, 'loss'):.3f} nats/token")
        if tracker:
            tracker.close()
        report.add(f"SOMI after {job.steps} learning steps", ray.get(model.evaluate.remote(texts, job.eval_bytes)),
                   version=ray.get(model.info.remote())["version"])

    if job.score_teachers:
        say("scoring the teachers themselves (transformers, CPU)")
        scores = ray.get([actor.bits_per_byte.remote(texts, job.teacher_eval_bytes) for actor in teachers])
        for path, bpb in zip(job.teachers, scores):
            report.add(f"teacher {Path(path).name}", bpb, scored_bytes=job.teacher_eval_bytes)

    final = ray.get(model.info.remote())
    ray.get(model.record.remote("note", {"job": "absorb", "table": report.rows}, {}))
    report.version = final["version"]
    report.seconds = time.time() - started
    for actor in teachers:
        ray.kill(actor)
    return report


def event_metric(event: dict, key: str) -> float:
    value = json.loads(event["metrics"]).get(key)
    return float("nan") if value is None else float(value)


def _windows(text: str, tokenizer, seq_len: int):
    from somi_ray.data import build_windows, tokenize_text

    return build_windows([tokenize_text(tokenizer, text, name="corpus")], seq_len)


def format_table(report: JobReport) -> str:
    """The results table as aligned text, one row per model and one column per domain."""
    domains = sorted({d for row in report.rows for d in row["bpb"]})
    width = max(len(row["name"]) for row in report.rows) if report.rows else 10
    lines = [f"{'bits per byte':<{width}}  " + "  ".join(f"{d:>12}" for d in domains)]
    for row in report.rows:
        cells = "  ".join(f"{row['bpb'].get(d, float('nan')):>12.4f}" for d in domains)
        lines.append(f"{row['name']:<{width}}  {cells}")
    return "\n".join(lines)
