"""The absorb job: teachers in parallel on Ray, absorbed into one SOMI model that keeps learning.

Schedule:
1. Every teacher opens in its own TeacherActor; all of them dequantise their layers into
   band operators and score themselves on the probe texts in parallel.
2. The first teacher's tokenizer and embedding define a new SOMI model (unless the output
   folder already contains one).
3. Fingerprints: SOMI's per-Part stress and probe bits per byte; each teacher's probe bits per
   byte. The knowledge diff orders the later teachers (largest advantage first) and sets
   per-Part strengths (absorb where SOMI is stressed and the teacher is not).
4. Each teacher is absorbed by the ModelActor from its streamed bands, then checked
   (integrity, Wilson loops, probe bits per byte, interference with the other domains). A
   failed check rolls the whole state back; the absorption is retried at half strength.
5. Continual learning between teachers and after the last one, from StressSampler batches.
6. Baselines on the same held-out text: a unigram model of SOMI's tokenizer, SOMI from random
   initialisation trained for the same number of steps, and the teachers themselves.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


class JobError(RuntimeError):
    """The job cannot run with the given inputs; the message names the input and the fix."""


@dataclass
class AbsorbJob:
    """Inputs of `somi-ray absorb`."""

    teachers: list[str]  # teacher paths (.gguf files or Hugging Face folders); the first defines the tokenizer
    corpus: str  # training text file
    eval_texts: dict[str, str]  # probe domain -> held-out text file
    out: str  # checkpoint folder
    steps: int = 200  # learning steps after the last absorption
    between_steps: int = 0  # learning steps after each absorption but the last
    batch_size: int = 8
    seq_len: int = 128
    hidden_size: int = 128
    n_parts: int = 2
    strength: float = 0.5  # base blend strength of teachers absorbed into an existing model
    mode: str = "blend"  # "blend" or "spectral"
    absorb_from: str = "both"  # "weights", "outputs" (distil top-k next-token targets) or "both"
    distill_k: int = 16  # teacher candidates kept per position
    distill_windows: int = 512  # corpus windows that get teacher targets, evenly spaced
    distill_weight: float = 1.0  # factor of the distillation term next to cross-entropy
    target_cache: str | None = None  # cache folder of teacher targets; None: beside the checkpoint
    curve: bool = False  # evaluate the held-out texts after every commit_every learning steps
    max_attempts: int = 3  # absorption attempts per teacher; each retry halves the strength
    bpb_tolerance: float = 0.02  # allowed relative rise of probe bpb after an absorption
    interference_tolerance: float = 0.02  # allowed relative rise on domains the teacher is not strong in
    eval_bytes: int | None = 60_000  # bytes of each held-out text scored for SOMI and the baselines
    teacher_eval_bytes: int | None = 20_000  # bytes scored for each teacher itself (slow on CPU)
    score_teachers: bool = True
    random_baseline: bool = False  # also train SOMI from random initialisation for the same steps
    commit_every: int = 50  # learning steps per learn event
    auto_grow: bool = True  # let the ModelActor grow the model while it learns
    auto_compress: bool = True  # let the ModelActor compress the model while it learns
    seed: int = 0
    address: str | None = None  # Ray cluster address; None starts an embedded loopback-only Ray
    num_cpus: float | None = None


@dataclass
class JobReport:
    """Bits per byte of every row of the results table, per held-out domain, plus the events."""

    rows: list[dict] = field(default_factory=list)  # {"name": ..., "bpb": {domain: value}, ...}
    events: list[dict] = field(default_factory=list)  # one entry per absorption attempt and learning phase
    teachers: list[dict] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list] = field(default_factory=dict)  # label -> [(learning steps, {domain: bpb})]
    targets: list[dict] = field(default_factory=list)  # one TargetReport per teacher (output-space absorption)
    absorb_from: str = "both"
    checkpoint: str = ""
    version: int = 0
    learning_steps: int = 0
    seconds: float = 0.0

    def add(self, name: str, bpb: dict[str, float], **extra) -> None:
        self.rows.append({"name": name, "bpb": dict(bpb), **extra})

    def as_dict(self) -> dict:
        return asdict(self)


class _Stages:
    """Wall time per stage of the job."""

    def __init__(self, report: JobReport):
        self.report = report

    def __call__(self, name: str):
        stages = self

        class _Timer:
            def __enter__(self):
                self.started = time.perf_counter()

            def __exit__(self, *exc):
                seconds = time.perf_counter() - self.started
                stages.report.stage_seconds[name] = stages.report.stage_seconds.get(name, 0.0) + seconds

        return _Timer()


def _check_inputs(job: AbsorbJob) -> None:
    if not job.teachers:
        raise JobError("no teacher given; pass --teacher PATH (a .gguf file or a Hugging Face folder)")
    if job.absorb_from not in ABSORB_FROM:
        raise JobError(f"mode must be one of {ABSORB_FROM}, got {job.absorb_from!r}")
    for path in job.teachers:
        if is_endpoint(path):
            if job.absorb_from == "weights":
                raise JobError(f"teacher {path} is an API endpoint, which has no weights; use --mode outputs or both")
            continue
        if not Path(path).exists():
            raise JobError(f"teacher {path} does not exist; run scripts/setup.sh to fetch the real teachers "
                           "or pass an existing .gguf file or model folder")
    if not job.eval_texts:
        raise JobError("no held-out text given; pass --eval PATH or --probe DOMAIN=PATH")
    for label, path in [("corpus", job.corpus), *[(f"held-out text {d}", p) for d, p in job.eval_texts.items()]]:
        if not Path(path).is_file():
            raise JobError(f"{label} {path} is not a file; pass a UTF-8 text file")
    if job.steps < 0 or job.between_steps < 0 or job.batch_size < 1 or job.seq_len < 2:
        raise JobError(f"steps, batch size and sequence length must be positive, got {job.steps}, "
                       f"{job.batch_size}, {job.seq_len}")
    if job.hidden_size < 4 or job.n_parts < 1:
        raise JobError(f"hidden size must be >= 4 and Parts >= 1, got {job.hidden_size} and {job.n_parts}")
    if not 0.0 < job.strength <= 1.0:
        raise JobError(f"strength must be in (0, 1], got {job.strength}")
    if job.max_attempts < 1:
        raise JobError(f"max_attempts must be at least 1, got {job.max_attempts}")


ABSORB_FROM = ("weights", "outputs", "both")


def is_endpoint(path: str) -> bool:
    """True for a teacher given as the base URL of an OpenAI-compatible API."""
    return str(path).startswith(("http://", "https://"))


def _unwrap(error: Exception) -> Exception:
    """Return the original exception inside a RayTaskError, or the error itself."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, Exception) else error


def knowledge_diff(somi_bpb: dict[str, float], teacher_bpb: dict[str, float]) -> dict[str, float]:
    """Per probe domain, the teacher's relative advantage (somi - teacher) / somi, in [-1, 1]."""
    diff = {}
    for domain, somi in somi_bpb.items():
        teacher = teacher_bpb.get(domain)
        if teacher is None or not somi > 0:
            continue
        diff[domain] = max(-1.0, min(1.0, (somi - teacher) / somi))
    return diff


def part_strengths(base: float, part_stress: dict[int, float], advantage: float) -> dict[int, float]:
    """Return the stress-guided strength per Part: base * advantage * (Part stress / mean stress).

    Parts under more stress than average take more of the teacher. A teacher with no
    advantage on any probe domain is absorbed at a quarter of the base strength at most.
    """
    if not part_stress:
        return {}
    mean = sum(part_stress.values()) / len(part_stress)
    gain = max(0.25, min(1.0, advantage))
    strengths = {}
    for part, stress in part_stress.items():
        relative = stress / mean if mean > 0 else 1.0
        strengths[int(part)] = float(min(1.0, max(0.0, base * gain * min(1.5, max(0.5, relative)))))
    return strengths


def run_absorb_job(job: AbsorbJob, progress: Callable[[str], None] | None = None,
                   bar: Callable | None = None) -> JobReport:
    """Run the whole job and return its report. `progress` receives one line per stage;
    `bar(total, description)` returns an object with update(n) and close() for long loops."""
    from actors.model_actor import remote_model_actor
    from actors.runtime import RayOptions, start_ray
    from actors.teacher_actor import remote_teacher_actor

    say = progress or (lambda message: None)
    started = time.time()
    _check_inputs(job)
    texts = {domain: Path(path).read_text(encoding="utf-8") for domain, path in job.eval_texts.items()}
    embedded = job.address is None

    num_cpus = job.num_cpus
    if embedded and num_cpus is None:
        # The embedded cluster declares at least 4 logical CPUs, so the ModelActor, the sampler
        # and several TeacherActors can all be placed on a small machine. The actors mostly wait
        # on each other, and the ModelActor sets its own thread count.
        num_cpus = max(os.cpu_count() or 1, 4)
    ray = start_ray(RayOptions(address=job.address, num_cpus=num_cpus))
    report = JobReport(checkpoint=str(Path(job.out).resolve()), absorb_from=job.absorb_from)
    from_weights = job.absorb_from in ("weights", "both")
    from_outputs = job.absorb_from in ("outputs", "both")
    stage = _Stages(report)
    threads = os.cpu_count() if embedded else None

    say(f"opening {len(job.teachers)} teacher(s) in parallel")
    with stage("open teachers"):
        teachers = [remote_teacher_actor(path) for path in job.teachers]
        infos = []
        for path, actor in zip(job.teachers, teachers):
            if is_endpoint(path):
                continue
            try:
                infos.append(ray.get(actor.info.remote()))
            except Exception as error:  # a damaged teacher ends the job before anything is written
                raise JobError(f"teacher {path} could not be read: {_unwrap(error)}") from None
    for info in infos:
        say(f"  {info['path']}: {info['family']}, {info['n_layers']} layers, hidden {info['hidden_size']}, "
            f"vocabulary {info['tokenizer_size']}")

    model = remote_model_actor(job.out, threads=threads, auto_grow=job.auto_grow, auto_compress=job.auto_compress)
    state = ray.get(model.info.remote())
    n_parts = state["n_parts"] if state["initialized"] else job.n_parts
    hidden = state["hidden_size"] if state["initialized"] else job.hidden_size

    # Extraction and the teachers' own scores run in the background from here on.
    local = [(path, actor) for path, actor in zip(job.teachers, teachers) if not is_endpoint(path)]
    prepared = {path: actor.prepare.remote(n_parts) for path, actor in local} if from_weights else {}
    teacher_scores = {}
    if job.score_teachers:
        teacher_scores = {path: actor.bits_per_byte.remote(texts, job.teacher_eval_bytes) for path, actor in local}

    first_header = None
    if not state["initialized"]:
        if is_endpoint(job.teachers[0]):
            raise JobError(f"the first teacher defines a new model's tokenizer, but {job.teachers[0]} is an API "
                           "endpoint; list a local teacher first or continue an existing checkpoint")
        say("building SOMI's basis from the first teacher's embedding" if from_weights
            else "adopting the first teacher's tokenizer (random initial weights, --mode outputs)")
        with stage("first teacher header"):
            try:
                first_header = ray.get(teachers[0].header.remote(hidden)) if from_weights else None
                tokenizer_json = ray.get(teachers[0].tokenizer_json.remote())
            except Exception as error:
                raise JobError(f"teacher {job.teachers[0]} could not be read: {_unwrap(error)}") from None
        state = ray.get(model.initialize.remote(tokenizer_json, hidden, n_parts, job.seed,
                                                {"tokenizer_from": job.teachers[0], "absorb_from": job.absorb_from}))
        say(f"created SOMI at {state['path']}: hidden {state['hidden_size']}, {state['n_parts']} Parts, "
            f"vocabulary {state['vocab_size']}")
    else:
        say(f"continuing SOMI at {state['path']} (version {state['version']}, {state['events']} events)")
    tokenizer_json = ray.get(model.get_tokenizer_json.remote())

    from tokenizers import Tokenizer

    from somi_ray.evaluate import UnigramModel

    tokenizer = Tokenizer.from_str(tokenizer_json)
    corpus_text = Path(job.corpus).read_text(encoding="utf-8")
    with stage("baselines"):
        unigram = UnigramModel.fit(tokenizer, corpus_text)
        report.add("unigram (SOMI tokenizer)", {d: unigram.bits_per_byte(t, max_bytes=job.eval_bytes).bpb
                                                 for d, t in texts.items()})

    say("scoring SOMI before absorbing")
    with stage("evaluate SOMI"):
        somi_bpb = ray.get(model.evaluate.remote(texts, job.eval_bytes))
    report.add("SOMI before absorbing", somi_bpb, version=ray.get(model.info.remote())["version"])

    scores: dict[str, dict[str, float]] = {}
    if teacher_scores:
        say("waiting for the teachers' own scores (transformers on CPU)")
        with stage("score teachers"):
            for path, ref in teacher_scores.items():
                try:
                    scores[path] = ray.get(ref)
                except Exception as error:
                    logger.warning("scoring teacher %s failed: %s", path, _unwrap(error))
                    say(f"  could not score {path}: {_unwrap(error)}")

    order = _teacher_order(job.teachers, first_header is not None, somi_bpb, scores)
    distill = None
    if from_outputs:
        with stage("teacher targets"):
            distill = _teacher_targets(ray, job, teachers, tokenizer_json, corpus_text, tokenizer, somi_bpb, scores,
                                       report, say)
        for path, actor in zip(job.teachers, teachers):
            if is_endpoint(path) or not from_weights:
                ray.kill(actor)  # its targets are in the cache and it has no weights to absorb, so its CPU is freed
    sampler = None
    learned_steps = 0
    for position, path in enumerate(order):
        actor = teachers[job.teachers.index(path)]
        adoption = position == 0 and first_header is not None
        diff = knowledge_diff(somi_bpb, scores.get(path, {}))
        own_domains = [d for d, v in diff.items() if v > 0]
        if path in prepared:
            with stage("wait for extraction"):
                try:
                    ray.get(prepared[path])
                except Exception as error:
                    logger.warning("preparing %s failed (%s); its bands will be read on demand", path, _unwrap(error))
            committed = _absorb_teacher(ray, job, model, actor, path, adoption, first_header if adoption else None,
                                        tokenizer_json, texts, diff, own_domains, report, say, stage)
            if committed:
                somi_bpb = committed
        last = position == len(order) - 1
        steps = job.steps if last else job.between_steps
        if steps > 0:
            sampler = sampler or _make_sampler(ray, corpus_text, tokenizer, job)
            with stage("learning"):
                _learn(ray, model, sampler, steps, job, say, bar, label="learning", distill=distill,
                       report=report, texts=texts, first_step=learned_steps)
            learned_steps += steps
            somi_bpb = ray.get(model.evaluate.remote(texts, job.eval_bytes))
            report.add(f"SOMI after {learned_steps} learning steps", somi_bpb,
                       version=ray.get(model.info.remote())["version"])
            report.events.append({"kind": "learn", "steps": steps, "bpb": somi_bpb})
    report.learning_steps = learned_steps

    if job.random_baseline and learned_steps > 0:
        say(f"training SOMI from random initialisation for the same {learned_steps} steps")
        with stage("random-init baseline"):
            baseline_bpb = _random_baseline(ray, job, tokenizer_json, hidden, n_parts, corpus_text, tokenizer,
                                            texts, learned_steps, threads, say, bar,
                                            curve=report.curves.setdefault("random-init learning", []))
        report.add(f"SOMI random init, {learned_steps} learning steps", baseline_bpb)

    for path in job.teachers:
        if path in scores:
            report.add(f"teacher {Path(path).name}", scores[path], scored_bytes=job.teacher_eval_bytes)

    final = ray.get(model.info.remote())
    ray.get(model.record.remote("note", {"job": "absorb", "absorb_from": job.absorb_from, "table": report.rows,
                                         "targets": report.targets}, {}))
    report.version = final["version"]
    report.seconds = time.time() - started
    for actor in teachers:
        ray.kill(actor)
    return report


def _teacher_order(teachers: list[str], first_is_fixed: bool, somi_bpb: dict, scores: dict) -> list[str]:
    """Order teachers: the first stays first when it defines a new model, the rest by mean advantage."""
    fixed = [teachers[0]] if first_is_fixed else []
    rest = [t for t in teachers if t not in fixed]

    def advantage(path: str) -> float:
        diff = knowledge_diff(somi_bpb, scores.get(path, {}))
        return sum(diff.values()) / len(diff) if diff else 0.0

    return fixed + sorted(rest, key=advantage, reverse=True)


def _absorb_teacher(ray, job: AbsorbJob, model, actor, path: str, adoption: bool, header, tokenizer_json: str,
                    texts: dict, diff: dict, own_domains: list[str], report: JobReport, say, stage):
    """Absorb one teacher with up to job.max_attempts attempts; returns the probe bpb when committed."""
    name = Path(path).name
    advantage = max(diff.values()) if diff else 1.0
    base = 1.0 if adoption else job.strength
    part_stress = {} if adoption else {int(k): v for k, v in ray.get(model.probe_stress.remote(texts)).items()}
    attempt = 0
    restarts = 0
    while attempt < job.max_attempts:
        info = ray.get(model.info.remote())
        strengths = ({p: 1.0 for p in range(info["n_parts"])} if adoption
                     else part_strengths(base, part_stress, advantage))
        attempt_id = uuid.uuid4().hex[:12]
        say(f"absorbing {name}, attempt {attempt + 1}/{job.max_attempts}, strengths "
            f"{ {p: round(a, 3) for p, a in strengths.items()} }")
        with stage("absorb"):
            try:
                if header is None:
                    header = ray.get(actor.header.remote(info["hidden_size"], tokenizer_json,
                                                         ray.get(model.embedding.remote())))
                ray.get(model.begin_absorb.remote(header, strengths, texts,
                                                  {"attempt": attempt_id, "knowledge_diff": diff,
                                                   "adoption": adoption}))
                bands = actor.stream_bands.options(num_returns="streaming").remote(info["n_parts"], header.basis)
                ray.get([model.absorb_band.remote(band_ref, job.mode) for band_ref in bands])
                result = ray.get(model.finish_absorb.remote({
                    "adoption": adoption, "bpb_tolerance": job.bpb_tolerance,
                    "interference_tolerance": job.interference_tolerance, "teacher_domains": own_domains}))
            except ray.exceptions.RayActorError as error:
                # The ModelActor died. It restarts from its last committed checkpoint, which
                # contains this attempt's absorb event only if the commit finished.
                restarts += 1
                if restarts > 3:
                    raise JobError(f"the ModelActor died {restarts} times while absorbing {path}: {error}") from None
                say(f"  the ModelActor died during the attempt ({type(error).__name__}); waiting for its restart")
                committed = _committed_attempt(ray, model, attempt_id)
                if committed is None:
                    continue  # the same attempt again, at the same strength
                result = {"committed": True, "reasons": [], "event": committed, "bpb": json.loads(
                    committed["metrics"]).get("bpb", {})}
            except Exception as error:
                cause = _unwrap(error)
                try:
                    ray.get(model.abort_absorb.remote(f"{type(cause).__name__}: {cause}"))
                except Exception:
                    logger.warning("nothing to roll back after %s", cause)
                raise JobError(f"absorbing teacher {path} failed and was rolled back: {cause}") from None
        report.events.append({"kind": "absorb" if result["committed"] else "rollback", "teacher": path,
                              "attempt": attempt + 1, "strengths": strengths, "reasons": result["reasons"],
                              "bpb": result["bpb"]})
        if result["committed"]:
            report.add(f"SOMI after absorbing {name}", result["bpb"], version=result["event"]["version"])
            report.teachers.append({"path": path, "coverage": float(header.vocab.coverage),
                                    "basis": header.basis.method, "basis_residual": float(header.basis.residual),
                                    "energy_kept": float(header.basis.energy_kept), "attempts": attempt + 1,
                                    "strengths": strengths})
            say(f"  committed {name} at version {result['event']['version']}")
            return result["bpb"]
        say(f"  rolled back: {'; '.join(result['reasons'])}")
        base /= 2.0
        attempt += 1
    report.teachers.append({"path": path, "coverage": float(header.vocab.coverage) if header else None,
                            "attempts": job.max_attempts, "rejected": True})
    say(f"  {name} was not absorbed: every attempt failed its checks")
    return None


def _committed_attempt(ray, model, attempt_id: str) -> dict | None:
    """Return the absorb event of an attempt once the restarted ModelActor replies, or None."""
    deadline = time.time() + 120.0
    while True:
        try:
            rows = ray.get(model.lineage_rows.remote())
            break
        except ray.exceptions.RayActorError:
            if time.time() > deadline:
                raise JobError("the ModelActor did not come back within 120 s after dying") from None
            time.sleep(1.0)
    for row in rows:
        if row["kind"] == "absorb" and json.loads(row["details"]).get("attempt") == attempt_id:
            return row
    return None


def _make_sampler(ray, corpus_text: str, tokenizer, job: AbsorbJob):
    from actors.stress_sampler import StressSampler

    return ray.remote(StressSampler).options(num_cpus=0.25).remote(
        _windows(corpus_text, tokenizer, job.seq_len), seed=job.seed)


def _teacher_targets(ray, job: AbsorbJob, teachers, tokenizer_json: str, corpus_text: str, tokenizer,
                     somi_bpb: dict, scores: dict, report: JobReport, say) -> list[dict]:
    """Have every TeacherActor fill the target cache for up to job.distill_windows corpus windows.

    Returns the teachers for `ModelActor.learn_distill`: cache key and weight. A teacher's weight
    is its mean knowledge-diff advantage clipped to [0.1, 1], or 1 when it was not scored.
    """
    import numpy as np

    from somi_ray.data import window_tokens
    from somi_ray.distill import default_cache_root, teacher_key

    cache_root = str(job.target_cache or default_cache_root(job.out))
    windows = window_tokens(_windows(corpus_text, tokenizer, job.seq_len))
    chosen = np.unique(np.linspace(0, len(windows) - 1, min(job.distill_windows, len(windows))).astype(np.int64))
    # NOTE: with a corpus of more than distill_windows windows, the others learn from cross-entropy alone.
    selected = np.ascontiguousarray(windows[chosen])
    say(f"computing top-{job.distill_k} targets of {len(job.teachers)} teacher(s) on {len(selected)} windows "
        f"(cache {cache_root})")
    refs = [actor.topk_targets.remote(selected, tokenizer_json, job.distill_k, cache_root) for actor in teachers]
    distill = []
    for path, ref in zip(job.teachers, refs):
        try:
            result = ray.get(ref)
        except Exception as error:
            raise JobError(f"teacher {path} could not compute top-k targets: {_unwrap(error)}") from None
        diff = knowledge_diff(somi_bpb, scores.get(path, {}))
        weight = min(1.0, max(0.1, sum(diff.values()) / len(diff))) if diff else 1.0
        result["weight"] = weight
        report.targets.append(result)
        distill.append({"key": teacher_key(path), "weight": weight * job.distill_weight, "teacher": path})
        say(f"  {Path(path).name}: coverage {result['coverage']:.3f} of SOMI positions, "
            f"{result['tokens_per_second']:.0f} teacher tokens/s, cache hit rate {result['hit_rate']:.2f}, "
            f"weight {weight:.2f}")
    return distill


def _learn(ray, model, sampler, steps: int, job: AbsorbJob, say, bar, label: str, distill: list | None = None,
           report: JobReport | None = None, texts: dict | None = None, first_step: int = 0) -> None:
    """Learn in chunks of job.commit_every steps; with `distill`, through ModelActor.learn_distill."""
    from somi_ray.distill import default_cache_root

    cache_root = str(job.target_cache or default_cache_root(job.out))
    tracker = bar(steps, label) if bar else None
    done = 0
    restarts = 0
    while done < steps:
        chunk = min(job.commit_every, steps - done)
        try:
            details = {"corpus": job.corpus, "absorb_from": job.absorb_from if distill is not None else "none"}
            if distill:
                event = ray.get(model.learn_distill.remote(sampler, chunk, job.batch_size, distill, cache_root,
                                                           job.distill_k, details))
            else:
                event = ray.get(model.learn.remote(sampler, chunk, job.batch_size, details))
        except ray.exceptions.RayActorError as error:
            # Uncommitted steps of the chunk are lost with the actor; the chunk runs again.
            restarts += 1
            if restarts > 3:
                raise JobError(f"the ModelActor died {restarts} times while learning: {error}") from None
            say(f"  the ModelActor died while learning ({type(error).__name__}); repeating the chunk")
            _committed_attempt(ray, model, "")
            continue
        done += chunk
        if tracker:
            tracker.update(chunk)
        say(f"  {label} step {done}/{steps}: loss {event_metric(event, 'loss'):.3f} nats/token")
        if job.curve and report is not None and texts:
            bpb = ray.get(model.evaluate.remote(texts, job.eval_bytes))
            report.curves.setdefault(label, []).append((first_step + done, bpb))
            say(f"  {label} step {first_step + done}: held-out bpb {bpb}")
    if tracker:
        tracker.close()


def _random_baseline(ray, job: AbsorbJob, tokenizer_json: str, hidden: int, n_parts: int, corpus_text: str,
                     tokenizer, texts: dict, steps: int, threads, say, bar, curve: list | None = None) -> dict[str, float]:
    """SOMI of the same size from random initialisation, trained for `steps` on the same sampler settings."""
    import shutil

    from actors.model_actor import remote_model_actor

    folder = f"{Path(job.out).resolve()}-random-init"
    shutil.rmtree(folder, ignore_errors=True)
    baseline = remote_model_actor(folder, name=None, threads=threads, auto_grow=job.auto_grow,
                                  auto_compress=job.auto_compress)
    ray.get(baseline.initialize.remote(tokenizer_json, hidden, n_parts, job.seed, {"baseline": "random-init"}))
    sampler = _make_sampler(ray, corpus_text, tokenizer, job)
    curves = JobReport()
    _learn(ray, baseline, sampler, steps, job, say, bar, label="random-init learning", report=curves, texts=texts)
    if curve is not None:
        curve[:] = curves.curves.get("random-init learning", [])
    bpb = ray.get(baseline.evaluate.remote(texts, job.eval_bytes))
    ray.kill(baseline)
    ray.kill(sampler)
    return bpb


def event_metric(event: dict, key: str) -> float:
    value = json.loads(event["metrics"]).get(key)
    return float("nan") if value is None else float(value)


def _windows(text: str, tokenizer, seq_len: int):
    from somi_ray.data import build_windows, tokenize_text

    return build_windows([tokenize_text(tokenizer, text, name="corpus")], seq_len)


def format_table(report: JobReport) -> str:
    """Format the results table: one row per model and one column per domain."""
    domains = sorted({d for row in report.rows for d in row["bpb"]})
    width = max(len(row["name"]) for row in report.rows) if report.rows else 10
    lines = [f"{'bits per byte':<{width}}  " + "  ".join(f"{d:>12}" for d in domains)]
    for row in report.rows:
        cells = "  ".join(f"{row['bpb'].get(d, float('nan')):>12.4f}" for d in domains)
        lines.append(f"{row['name']:<{width}}  {cells}")
    return "\n".join(lines)


def format_events(report: JobReport) -> str:
    """Format one line per absorption attempt and learning phase."""
    lines = []
    for event in report.events:
        bpb = ", ".join(f"{d} {v:.4f}" for d, v in sorted(event.get("bpb", {}).items()))
        if event["kind"] == "learn":
            lines.append(f"learn    {event['steps']} steps: {bpb}")
        else:
            reasons = f" ({'; '.join(event['reasons'])})" if event["reasons"] else ""
            lines.append(f"{event['kind']:<8} {Path(event['teacher']).name} attempt {event['attempt']}: {bpb}{reasons}")
    return "\n".join(lines)
