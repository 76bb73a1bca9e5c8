"""Long demonstration of self-organisation: growth on Shakespeare, compression on repeated text.

    .venv/bin/python bench/run_self_organisation.py --out runs/self-organisation

Phase 1 starts from SomiConfig.from_scratch() (H=16, P=1) and streams the Shakespeare
training works in order, batch after batch, with automatic growth and compression on.
Phase 2 feeds one act repeated many times, text the model can memorise. Every growth is on
trial beside an ungrown copy and is undone unless it lowers held-out bits per byte. So growth
stops when more capacity stops helping, which on the repeated act it does not. Held-out bits
per byte is measured on the start of the held-out works every --eval-every steps and around
every structural event.

The tokenizer is byte-level (V=256, one token per UTF-8 byte), chosen for speed; bits per
byte is then nats per token / ln 2. The run writes a checkpoint with its lineage to --out and
prints hidden size, Parts, parameters and bits per byte over time.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from somi_ray import assets
from somi_ray.config import SomiConfig
from somi_ray.compress import CompressionPolicy
from somi_ray.data import byte_tokenizer
from somi_ray.evaluate import bits_per_byte
from somi_ray.grow import GrowthPolicy
from somi_ray.lineage import Lineage, save_checkpoint
from somi_ray.model import SomiModel
from somi_ray.organize import OrganizerPolicy, SelfOrganizer, current_structure


def stream_batches(data: np.ndarray, batch_size: int, seq_len: int):
    """Yield consecutive (B, T+1) windows that walk through `data` once, in order."""
    step = batch_size * seq_len
    for start in range(0, len(data) - step - 1, step):
        rows = start + np.arange(batch_size)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
        yield torch.from_numpy(data[rows].astype(np.int64))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/self-organisation", help="folder for the checkpoint and lineage")
    parser.add_argument("--grow-steps", type=int, default=None,
                        help="steps of phase 1 (default: one pass over the Shakespeare training works)")
    parser.add_argument("--compress-steps", type=int, default=3000, help="steps of phase 2 (one act repeated)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64, help="positions per window, in bytes")
    parser.add_argument("--eval-every", type=int, default=150, help="steps between held-out bits per byte reports")
    parser.add_argument("--eval-bytes", type=int, default=6000, help="held-out bytes scored per report")
    parser.add_argument("--minutes", type=float, default=14.0, help="wall-clock budget; phases are cut to fit")
    parser.add_argument("--trial-windows", type=int, default=GrowthPolicy.trial_windows,
                        help="stress windows an ungrown copy learns beside each growth before it is judged")
    parser.add_argument("--min-hidden", type=int, default=CompressionPolicy.min_hidden,
                        help="hidden size that compression never goes below")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 makes runs repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("minutes", "batch_size", "seq_len", "eval_every", "eval_bytes", "threads"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("grow_steps", "compress_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be zero or more, got {getattr(args, name)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.time()

    tokenizer = byte_tokenizer()
    train = assets.read_documents("shakespeare", "train")
    heldout = assets.read_documents("shakespeare", "heldout")
    stream = np.frombuffer("".join(text for _, text in train).encode("utf-8"), dtype=np.uint8)
    heldout_text = heldout[0][1][: args.eval_bytes]
    act_name, act_text = train[0][0], train[0][1]
    act = act_text[len(act_text) // 3: len(act_text) // 3 + 16_000]  # about one act
    act_bytes = len(act.encode("utf-8"))
    repeats = math.ceil(args.compress_steps * args.batch_size * args.seq_len / act_bytes) + 1
    repeated = np.frombuffer((act * repeats).encode("utf-8"), dtype=np.uint8)

    def held_out_bpb(model: SomiModel) -> float:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            result = bits_per_byte(model, tokenizer, heldout_text, context=128, batch_size=16)
        model.train(was_training)
        return result.bpb

    model = SomiModel(SomiConfig.from_scratch(), seed=args.seed)
    lineage = Lineage()
    lineage.append("init", {"config": "from_scratch", "tokenizer": "byte-level, V=256"},
                   {**current_structure(model), "bpb": held_out_bpb(model)})
    policy = OrganizerPolicy(grow=GrowthPolicy(trial_windows=args.trial_windows), compress=CompressionPolicy(min_hidden=args.min_hidden))
    organizer = SelfOrganizer(policy, eval_fn=held_out_bpb)
    optimizer = model.make_optimizer()
    out = Path(args.out)
    history = []

    print(f"{'phase':>8} {'step':>5} {'H':>4} {'P':>2} {'S':>2} {'params':>8} {'stress':>7} {'loss':>6} {'bpb':>6} {'min':>5}")

    def report(phase: str, step: int, stress: float, loss: float) -> None:
        sizes = current_structure(model)
        bpb = held_out_bpb(model)
        row = {"phase": phase, "step": step, **sizes, "stress": stress, "loss": loss, "bpb": bpb,
               "minutes": (time.time() - started) / 60}
        history.append(row)
        print(f"{phase:>8} {step:>5} {sizes['hidden_size']:>4} {sizes['n_parts']:>2} {sizes['n_systems']:>2} "
              f"{sizes['parameters']:>8} {stress:7.4f} {loss:6.3f} {bpb:6.3f} {row['minutes']:5.1f}", flush=True)

    grow_steps = args.grow_steps if args.grow_steps is not None else len(stream) // (args.batch_size * args.seq_len)
    phases = [("grow", stream, grow_steps), ("compress", repeated, args.compress_steps)]
    step = 0
    budget = args.minutes * 60
    for index, (phase, data, steps) in enumerate(phases):
        phase_deadline = started + budget * (0.6 if index == 0 else 1.0)
        recent_stress, recent_loss = [], []
        for phase_step, batch in enumerate(stream_batches(data, args.batch_size, args.seq_len)):
            if phase_step >= steps or time.time() > phase_deadline:
                break
            stats = model.learn_step(batch, optimizer)
            recent_stress.append(stats.jepa_error)
            recent_loss.append(stats.loss)
            for event in organizer.after_step(model, stats, step, batch):
                event["details"]["phase"] = phase
                lineage.append(event["kind"], event["details"], event["metrics"], bump_version=event["changed"])
                metrics = event["metrics"]
                action = event["details"].get("action")
                label = f"{event['kind']} ({action})" if action else event["kind"]
                print(f"  -> {label} at step {step}: "
                      f"{event['details']['reason']}; H {metrics['hidden_size_before']} -> {metrics['hidden_size_after']}, "
                      f"P {metrics['n_parts_before']} -> {metrics['n_parts_after']}, parameters "
                      f"{metrics['parameters_before']} -> {metrics['parameters_after']}, bpb "
                      f"{metrics.get('bpb_before', float('nan')):.3f} -> {metrics.get('bpb_after', float('nan')):.3f}",
                      flush=True)
            if organizer.optimizer_stale:
                optimizer = model.make_optimizer()
                organizer.optimizer_stale = False
            step += 1
            if step % args.eval_every == 0:
                report(phase, step, float(np.mean(recent_stress)), float(np.mean(recent_loss)))
                recent_stress, recent_loss = [], []
        lineage.append("learn", {"phase": phase, "corpus": "shakespeare train" if index == 0 else f"{act_name} act x{repeats}",
                                 "steps": step}, {**current_structure(model), "bpb": held_out_bpb(model)})
        save_checkpoint(out, model, tokenizer.to_str(), lineage)

    (out.parent / f"{out.name}-history.json").write_text(json.dumps(history, indent=2) + "\n")
    for event in organizer.finish(model):  # a growth still on trial is judged on the steps it had
        lineage.append(event["kind"], event["details"], event["metrics"], bump_version=event["changed"])
        print(f"  -> grow (trial) at the end: {event['details']['reason']}", flush=True)
        save_checkpoint(out, model, tokenizer.to_str(), lineage)
    growths = [event for event in lineage if event.kind == "grow" and event.details.get("action") != "trial"]
    kept_growths = [event for event in lineage if event.details.get("action") == "trial" and event.details.get("accepted")]
    compressions = [event for event in lineage if event.kind == "compress"]
    print(f"done in {(time.time() - started) / 60:.1f} min: {len(growths)} growths ({len(kept_growths)} kept after their trial), "
          f"{len(compressions)} compression attempts; checkpoint {out.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
