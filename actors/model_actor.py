"""ModelActor: the single writer of a SOMI model.

It keeps the model in memory, applies every change (init, absorb, learn, rollback) and commits each
change as a lineage event to the checkpoint folder before the call returns, so an
acknowledged event survives a restart. The constructor reloads the latest committed
checkpoint, which makes the actor safe to restart (`max_restarts`).

The class is plain Python; `remote_model_actor` wraps it with Ray options.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch

from somi_ray.absorb import absorb_band, absorb_rows, check_band, check_package
from somi_ray.config import SomiConfig
from somi_ray.evaluate import bits_per_byte
from somi_ray.lineage import Lineage, checkpoint_exists, load_checkpoint, save_checkpoint
from somi_ray.model import SomiModel

logger = logging.getLogger(__name__)

ACTOR_NAME = "somi-model"

# Absorption checks; relative tolerances on bits per byte, a floor for the Wilson-loop drift.
DEFAULT_ABSORB_POLICY = {
    "adoption": False,  # the first teacher of a new model: no earlier knowledge to protect
    "bpb_tolerance": 0.02,  # allowed relative rise of probe bpb on the teacher's own domains
    "interference_tolerance": 0.02,  # allowed relative rise on every other probe domain
    "wilson_floor": 0.05,  # smallest Wilson-trace tolerance, used until learning has shown its drift
    "teacher_domains": [],
}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ModelActor:
    """Holds one SOMI model and its checkpoint folder."""

    def __init__(self, checkpoint_dir: str, device: str = "auto", threads: int | None = None,
                 auto_grow: bool = True, auto_compress: bool = True):
        if threads:
            # Ray limits an actor's threads to its CPU request. The embedded local cluster passes
            # the machine's core count here because the model is the main compute.
            torch.set_num_threads(int(threads))
        self.path = Path(checkpoint_dir).resolve()
        self.device = pick_device(device)
        self.model: SomiModel | None = None
        self.tokenizer_json: str | None = None
        self.lineage = Lineage()
        self.optimizer = None
        self._pending_absorb: dict | None = None
        self._probe_bytes = 20_000  # bytes of each probe text scored by the absorption checks
        from somi_ray.integrity import WilsonDrift

        # NOTE: the drift history lives in memory; after a restart tolerances start again from
        # the floor until learning has recorded new changes.
        self.wilson_drift = WilsonDrift()
        # Automatic growth and compression run inside `learn` and `learn_distill`. Each
        # structural change and each verdict is committed as its own lineage event.
        self.organizer = None
        if auto_grow or auto_compress:
            from somi_ray.organize import SelfOrganizer

            self.organizer = SelfOrganizer.from_flags(auto_grow=auto_grow, auto_compress=auto_compress)
        self.organizer_step = 0  # learning steps seen by the organizer since the actor started
        if checkpoint_exists(self.path):
            checkpoint = load_checkpoint(self.path, self.device)
            self.model = checkpoint.model
            self.tokenizer_json = checkpoint.tokenizer_json
            self.lineage = checkpoint.lineage
            logger.info("ModelActor loaded %s at version %d on %s", self.path, self.lineage.version, self.device)
        else:
            logger.info("ModelActor started without a checkpoint at %s", self.path)

    # ------------------------------------------------------------------ state

    def _require_model(self) -> SomiModel:
        if self.model is None:
            raise RuntimeError(f"no SOMI model at {self.path} yet; call initialize() first")
        return self.model

    def _commit(self, kind: str, details: dict, metrics: dict, bump_version: bool = True) -> dict:
        """Append an event and write the checkpoint; on a failed write the lineage is unchanged."""
        model = self._require_model()
        lineage = self.lineage.copy()
        event = lineage.append(kind, details, metrics, bump_version=bump_version)
        save_checkpoint(self.path, model, self.tokenizer_json, lineage)
        self.lineage = lineage
        return event.row()

    def info(self) -> dict:
        """Version, sizes and history length of the model (None fields before initialize)."""
        if self.model is None:
            return {"initialized": False, "path": str(self.path), "version": 0, "events": 0}
        c = self.model.config
        return {
            "initialized": True,
            "path": str(self.path),
            "device": str(self.device),
            "version": self.lineage.version,
            "events": len(self.lineage),
            "hidden_size": c.hidden_size,
            "n_parts": c.n_parts,
            "n_systems": len(c.routes),
            "vocab_size": c.vocab_size,
            "parameters": self.model.parameter_count(),
            "stress_ema": [float(p.stress_ema) for p in self.model.parts],
            "stress_loss_correlation": self.model.stress_loss_correlation(),
            "teachers": [e.details.get("teacher") for e in self.lineage if e.kind == "absorb"],
        }

    def initialize(self, tokenizer_json: str, hidden_size: int, n_parts: int, seed: int = 0,
                   details: dict | None = None) -> dict:
        """Create the model once; a second call (for example after a restart) changes nothing."""
        if self.model is not None:
            return self.info()
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_str(tokenizer_json).get_vocab_size(with_added_tokens=True)
        config = SomiConfig.auto(hidden_size, n_parts, vocab_size=vocab)
        self.model = SomiModel(config, seed=seed).to(self.device)
        self.tokenizer_json = tokenizer_json
        self.lineage = Lineage()
        try:
            self._commit("init", {"hidden_size": hidden_size, "n_parts": n_parts, "seed": seed, **(details or {})},
                         {"parameters": self.model.parameter_count()})
        except BaseException:
            self.model, self.tokenizer_json = None, None
            raise
        return self.info()

    def get_tokenizer_json(self) -> str:
        self._require_model()
        return self.tokenizer_json

    def embedding(self) -> np.ndarray:
        """SOMI's (V, H) embedding, for Procrustes alignment of later teachers."""
        return self._require_model().embedding.weight.detach().float().cpu().numpy()

    def lineage_rows(self) -> list[dict]:
        return [event.row() for event in self.lineage]

    def snapshot(self) -> dict:
        """Return a versioned copy of the weights for inference replicas."""
        model = self._require_model()
        return {
            "version": self.lineage.version,
            "config": model.config.to_dict(),
            "tokenizer_json": self.tokenizer_json,
            "state": {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()},
        }

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, texts: dict[str, str], max_bytes: int | None = None, context: int = 256) -> dict[str, float]:
        """Bits per byte of the model on each named text."""
        model = self._require_model()
        tokenizer = _tokenizer(self.tokenizer_json)
        model.eval()

        @torch.no_grad()
        def logits_fn(ids: torch.Tensor) -> torch.Tensor:
            return model(ids.to(self.device)).float().cpu()

        return {name: bits_per_byte(logits_fn, tokenizer, text, context=context, max_bytes=max_bytes).bpb
                for name, text in texts.items()}

    # ------------------------------------------------------------------ absorption

    def probe_ids(self, texts: dict[str, str], sequences: int = 4, length: int = 64) -> torch.Tensor:
        """Return a probe batch (B, length + 1) of real text: the first windows of each probe text."""
        tokenizer = _tokenizer(self.tokenizer_json)
        rows = []
        for text in texts.values():
            ids = tokenizer.encode(text[:20_000], add_special_tokens=False).ids
            starts = range(0, len(ids) - length, length + 1)
            rows += [ids[start:start + length + 1] for start in list(starts)[:sequences]]
        if len(rows) < 2:
            raise ValueError(f"probe texts give {len(rows)} windows of {length + 1} tokens; at least 2 are needed")
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def probe_stress(self, texts: dict[str, str]) -> dict[int, float]:
        """Mean relative JEPA error of each Part on the probe texts."""
        model = self._require_model()
        stress = model.measure_stress(self.probe_ids(texts))
        return {int(k): float(v) for k, v in stress["per_part"].items()}

    def begin_absorb(self, package, strength: float | dict, probes: dict[str, str] | None = None,
                     details: dict | None = None) -> dict:
        """Start an absorption attempt: record it, keep a rollback copy, blend the token rows.

        `strength` is one factor or a factor per Part (stress-guided). Bands follow with
        absorb_band as the TeacherActor streams them; finish_absorb then checks the model and
        commits, or rolls back.
        """
        from somi_ray.integrity import check_model

        model = self._require_model()
        if self._pending_absorb is not None:
            raise RuntimeError("an absorption is already in progress; finish or abort it first")
        check_package(model, package)
        per_part = strength if isinstance(strength, dict) else {p: float(strength) for p in range(len(model.parts))}
        per_part = {int(p): float(a) for p, a in per_part.items()}
        row_strength = sum(per_part.values()) / max(len(per_part), 1)
        probe = self.probe_ids(probes) if probes else None
        attempt = dict(details or {}, teacher=package.info.path, family=package.info.family,
                       strength=row_strength, part_strengths=per_part, coverage=float(package.vocab.coverage),
                       basis=package.basis.method, basis_residual=float(package.basis.residual))
        self._commit("absorb-attempt", attempt, {}, bump_version=False)
        self._pending_absorb = {
            "state": copy.deepcopy(model.state_dict()),
            "teacher": package.info.path,
            "strength": per_part,
            "details": attempt,
            "bands": [],
            "started": time.time(),
            "probes": probes or {},
            "probe_ids": probe,
            "before_bpb": self.evaluate(probes, max_bytes=self._probe_bytes) if probes else {},
            "before_report": check_model(model, probe) if probe is not None else None,
        }
        rows = absorb_rows(model, package, row_strength)
        self._pending_absorb["details"]["rows"] = rows
        return {"rows": rows}

    def absorb_band(self, band, mode: str = "blend") -> dict:
        model = self._require_model()
        pending = self._pending_absorb
        if pending is None:
            raise RuntimeError("absorb_band called without begin_absorb")
        check_band(model, band, pending["teacher"])
        if band.part >= len(model.parts):
            logger.warning("band for Part %d skipped: the model has %d Parts", band.part, len(model.parts))
            return {"part": band.part, "skipped": True}
        a = pending["strength"].get(band.part, 0.0)
        absorb_band(model, band, a, mode)
        pending["bands"].append({"part": band.part, "layers": band.layers, "energy_kept": float(band.energy_kept),
                                 "strength": a, "mode": mode})
        return {"part": band.part, "skipped": False}

    def finish_absorb(self, policy: dict | None = None) -> dict:
        """Check the absorbed model; commit the absorb event, or roll back and record why.

        The checks: every tensor is finite, and the integrity report (W constraints, spectrum,
        energy, finite Wilson loops, causality) is healthy. Each Wilson trace stays within the
        drift tolerance learned from ordinary learning. Probe bits per byte rise by at most
        `bpb_tolerance` on the teacher's domains and `interference_tolerance` on the others.
        `adoption` (the first teacher of a new model) skips the comparisons with before.
        Returns {"committed", "reasons", "event", "bpb"}.
        """
        from somi_ray.integrity import check_model, compare

        model = self._require_model()
        pending = self._pending_absorb
        if pending is None:
            raise RuntimeError("finish_absorb called without begin_absorb")
        policy = dict(DEFAULT_ABSORB_POLICY, **(policy or {}))
        reasons: list[str] = []

        bad = non_finite_tensors(model)
        if bad:
            reasons.append(f"non-finite values in {bad[:5]}")
        after_bpb: dict[str, float] = {}
        if not reasons and pending["probe_ids"] is not None:
            report = check_model(model, pending["probe_ids"])
            reasons += [f"integrity: {issue}" for issue in report.issues]
            if not policy["adoption"] and pending["before_report"] is not None:
                tolerances = self.wilson_drift.tolerances() or policy["wilson_floor"]
                if isinstance(tolerances, dict):
                    tolerances = {k: max(v, policy["wilson_floor"]) for k, v in tolerances.items()}
                comparison = compare(pending["before_report"], report, tolerances)
                if not comparison.ok:
                    reasons.append(f"Wilson loops of Systems {comparison.exceeded} moved by "
                                   f"{[round(comparison.changes[s], 4) for s in comparison.exceeded]}, beyond "
                                   f"{[round(comparison.tolerances[s], 4) for s in comparison.exceeded]}")
        if not reasons and pending["probes"]:
            after_bpb = self.evaluate(pending["probes"], max_bytes=self._probe_bytes)
            if not policy["adoption"]:
                own = set(policy.get("teacher_domains") or [])
                for domain, after in after_bpb.items():
                    before = pending["before_bpb"][domain]
                    limit = policy["bpb_tolerance"] if domain in own or not own else policy["interference_tolerance"]
                    if after > before * (1.0 + limit):
                        kind = "probe" if domain in own or not own else "interference on"
                        reasons.append(f"{kind} {domain} bits per byte rose from {before:.4f} to {after:.4f} "
                                       f"(limit +{100 * limit:.1f} %)")

        if reasons:
            rollback = self.abort_absorb("; ".join(reasons))
            return {"committed": False, "reasons": reasons, "event": rollback, "bpb": after_bpb}

        details = dict(pending["details"], bands=pending["bands"], seconds=time.time() - pending["started"])
        metrics = {"bpb": after_bpb, "bpb_before": pending["before_bpb"], "parameters": model.parameter_count(),
                   "hidden_size": model.config.hidden_size, "n_parts": model.config.n_parts}
        self._pending_absorb = None
        self.optimizer = None
        event = self._commit("absorb", details, metrics)
        return {"committed": True, "reasons": [], "event": event, "bpb": after_bpb}

    def abort_absorb(self, reason: str) -> dict:
        """Restore the whole state from before begin_absorb and record the rollback."""
        model = self._require_model()
        pending = self._pending_absorb
        if pending is None:
            raise RuntimeError("abort_absorb called without begin_absorb")
        model.load_state_dict(pending["state"])
        self._pending_absorb = None
        logger.warning("rolled back absorption of %s: %s", pending["teacher"], reason)
        return self._commit("rollback", {"teacher": pending["teacher"], "reason": reason,
                                         "attempt": pending["details"].get("attempt"),
                                         "part_strengths": pending["strength"]}, {}, bump_version=False)

    # ------------------------------------------------------------------ learning

    def _organize(self, stats, batch: torch.Tensor) -> int:
        """Hand one learning step to the organizer, commit each of its events and return their count."""
        if self.organizer is None:
            return 0
        model = self._require_model()
        events = self.organizer.after_step(model, stats, self.organizer_step, batch)
        for event in events:
            self._commit(event["kind"], event["details"], event["metrics"], bump_version=event["changed"])
        if self.organizer.optimizer_stale:
            self.optimizer = model.make_optimizer()
            self.organizer.optimizer_stale = False
        self.organizer_step += 1
        return len(events)

    def learn(self, sampler, steps: int, batch_size: int, details: dict | None = None,
              probes: dict[str, str] | None = None, eval_bytes: int | None = None) -> dict:
        """Learn from `steps` batches served by a StressSampler handle, then commit a learn event.

        After each batch the per-window stress goes back to the sampler, so its next
        choices follow what the model finds hard.
        """
        import ray

        model = self._require_model()
        if self.optimizer is None:
            self.optimizer = model.make_optimizer()
        started = time.time()
        losses, stresses = [], []
        structure_events = 0
        from somi_ray.integrity import wilson_loops

        for step in range(steps):
            window_ids, tokens = ray.get(sampler.sample.remote(batch_size))
            batch = torch.tensor(tokens, dtype=torch.long, device=self.device)
            stats = model.learn_step(batch, self.optimizer)
            losses.append(stats.loss)
            stresses.append(float(stats.stress_per_sequence.mean()))
            sampler.report.remote(window_ids, stats.stress_per_sequence.numpy())
            if (step + 1) % 5 == 0:
                self.wilson_drift.record(wilson_loops(model))
            structure_events += self._organize(stats, batch)
        model.eval()
        tokens_seen = steps * batch_size * (int(tokens.shape[1]) - 1) if steps else 0
        metrics = {
            "loss": float(np.mean(losses)) if losses else None,
            "last_loss": losses[-1] if losses else None,
            "stress": float(np.mean(stresses)) if stresses else None,
            "stress_loss_correlation": model.stress_loss_correlation(),
            "tokens": tokens_seen,
            "seconds": time.time() - started,
            "hidden_size": model.config.hidden_size,
            "n_parts": model.config.n_parts,
            "parameters": model.parameter_count(),
            "structure_events": structure_events,
        }
        if probes:
            metrics["bpb"] = self.evaluate(probes, max_bytes=eval_bytes)
        return self._commit("learn", dict(details or {}, steps=steps, batch_size=batch_size), metrics)

    def learn_distill(self, sampler, steps: int, batch_size: int, teachers: list[dict], cache_root: str,
                      k: int, details: dict | None = None) -> dict:
        """Learn like `learn`, with a distillation term per teacher next to cross-entropy.

        `teachers` holds {"key": teacher cache key, "weight": float} entries; their targets are
        read from the target cache under `cache_root` by window. A window without targets
        learns from cross-entropy alone. Each step measures SOMI's per-token stress first
        (one extra forward pass), so the term weighs positions where SOMI is surprised.
        """
        import ray

        from somi_ray.distill import SomiVocab, TargetCache, distillation_loss, stack_targets, window_key
        from somi_ray.integrity import wilson_loops

        model = self._require_model()
        if self.optimizer is None:
            self.optimizer = model.make_optimizer()
        vocab_hash = SomiVocab(_tokenizer(self.tokenizer_json)).hash
        caches = [(TargetCache(cache_root, t["key"], vocab_hash, k), float(t["weight"])) for t in teachers]
        started = time.time()
        losses, stresses, distill_terms, covered = [], [], [], []
        structure_events = 0
        for step in range(steps):
            window_ids, tokens = ray.get(sampler.sample.remote(batch_size))
            batch = torch.tensor(tokens, dtype=torch.long, device=self.device)
            T = batch.shape[1] - 1
            token_stress = model.measure_stress(batch)["per_token"]  # (B, T)
            keys = [window_key(row) for row in tokens.astype(np.int32)]
            stacked = [(stack_targets([cache.get(key) for key in keys], T, k), weight) for cache, weight in caches]
            terms = []

            def extra_loss(logits, inputs):
                total = logits.sum() * 0.0
                for (ids, logprobs, confidence), weight in stacked:
                    term = distillation_loss(logits, ids, logprobs, confidence, token_stress, weight)
                    terms.append(float(term.detach()))
                    total = total + term
                return total

            stats = model.learn_step(batch, self.optimizer, extra_loss=extra_loss)
            losses.append(stats.loss)
            stresses.append(float(stats.stress_per_sequence.mean()))
            distill_terms.append(sum(terms))
            covered.append(float(np.mean([float((ids[..., 0] >= 0).float().mean()) for (ids, _, _), _ in stacked])))
            sampler.report.remote(window_ids, stats.stress_per_sequence.numpy())
            if (step + 1) % 5 == 0:
                self.wilson_drift.record(wilson_loops(model))
            # NOTE: the ungrown copy of a growth on trial learns from cross-entropy alone, without
            # the distillation term, so during distillation the trial compares unequal learners.
            structure_events += self._organize(stats, batch)
        model.eval()
        metrics = {
            "loss": float(np.mean(losses)) if losses else None,
            "last_loss": losses[-1] if losses else None,
            "distill": float(np.mean(distill_terms)) if distill_terms else None,
            "target_coverage": float(np.mean(covered)) if covered else None,
            "cache_hit_rate": float(np.mean([cache.stats.hit_rate for cache, _ in caches])) if caches else None,
            "stress": float(np.mean(stresses)) if stresses else None,
            "tokens": steps * batch_size * (int(tokens.shape[1]) - 1) if steps else 0,
            "seconds": time.time() - started,
            "structure_events": structure_events,
        }
        return self._commit("learn", dict(details or {}, steps=steps, batch_size=batch_size, distill_teachers=teachers,
                                          distill_k=k), metrics)

    def learn_texts(self, texts: list[str], window: int = 64, details: dict | None = None) -> dict:
        """Learn from raw texts (one learning step per text), then commit one learn event.

        Each text is tokenised with SOMI's tokenizer and cut into windows of `window` + 1
        tokens, and the windows of one text form one batch. When a step leaves any weight
        non-finite, the weights before the call are restored and ValueError is raised,
        so the version only rises for a committed, finite update.
        """
        model = self._require_model()
        tokenizer = _tokenizer(self.tokenizer_json)
        batches = []
        for index, text in enumerate(texts):
            ids = tokenizer.encode(text).ids
            if len(ids) < 2:
                raise ValueError(f"texts[{index}] has {len(ids)} tokens; learning needs at least 2")
            span = min(window + 1, len(ids))
            starts = range(0, len(ids) - span + 1, span)
            rows = [ids[start:start + span] for start in starts]  # each row is span tokens long
            if starts[-1] + span < len(ids):
                rows.append(ids[-span:])  # the tail that the last full window missed
            batches.append(torch.as_tensor(rows, dtype=torch.long, device=self.device))  # (B, span)

        if self.optimizer is None:
            self.optimizer = model.make_optimizer()
        before = copy.deepcopy(model.state_dict())
        started = time.time()
        losses = [model.learn_step(batch, self.optimizer).loss for batch in batches]
        model.eval()
        bad = non_finite_tensors(model)
        if bad:
            model.load_state_dict(before)
            self.optimizer = None
            raise ValueError(f"learning from {len(texts)} texts made {bad[:5]} non-finite; the weights were restored")
        metrics = {
            "loss": float(np.mean(losses)),
            "tokens": int(sum(batch.numel() for batch in batches)),
            "seconds": time.time() - started,
        }
        try:
            return self._commit("learn", dict(details or {}, texts=len(texts), window=window), metrics)
        except BaseException:
            model.load_state_dict(before)
            self.optimizer = None
            raise

    def record(self, kind: str, details: dict, metrics: dict) -> dict:
        """Commit an event that changes no weights (for example evaluation results)."""
        return self._commit(kind, details, metrics, bump_version=False)


def non_finite_tensors(model: SomiModel) -> list[str]:
    """Names of floating-point tensors with NaN or Inf; a Part's stress EMA is NaN until first measured."""
    return [name for name, tensor in model.state_dict().items()
            if tensor.is_floating_point() and not name.endswith("stress_ema") and not torch.isfinite(tensor).all()]


def _tokenizer(tokenizer_json: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def actor_name(checkpoint_dir: str) -> str:
    """Return the ModelActor's name, unique per checkpoint folder, so a cluster has one writer per folder."""
    import hashlib

    digest = hashlib.sha1(str(Path(checkpoint_dir).resolve()).encode()).hexdigest()[:12]
    return f"{ACTOR_NAME}-{digest}"


def remote_model_actor(checkpoint_dir: str, *, name: str | None = "", num_gpus: float | None = None,
                       num_cpus: float = 1.0, namespace: str | None = None, threads: int | None = None,
                       auto_grow: bool = True, auto_compress: bool = True):
    """Create (or get) the restartable ModelActor of a checkpoint folder, with a GPU when the cluster has one.

    The default name comes from the folder, so a second caller gets the same single writer;
    `name=None` makes an unnamed actor.
    """
    import ray

    from actors.runtime import cluster_has_gpu

    if num_gpus is None:
        num_gpus = 1 if cluster_has_gpu() else 0
    options = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=3, max_task_retries=0,
                   max_concurrency=1)
    if name == "":
        name = actor_name(checkpoint_dir)
    if name:
        options.update(name=name, get_if_exists=True, lifetime=None)
        if namespace:
            options["namespace"] = namespace
    return ray.remote(ModelActor).options(**options).remote(checkpoint_dir, "auto", threads, auto_grow, auto_compress)
