"""The `somi-ray` command.

Heavy modules (torch, Ray, transformers) are imported inside the commands, so `--help`
stays fast. Commands that need Ray import the `actors` package when they run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _progress_bar(total: int, description: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="step", file=sys.stderr, dynamic_ncols=True)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _write_json(path: str | None, data) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")
        _say(f"wrote {path}")


def _parse_probe(value: str) -> tuple[str, str]:
    domain, sep, path = value.partition("=")
    if not sep or not domain or not path:
        raise argparse.ArgumentTypeError(f"--probe needs DOMAIN=PATH, got {value!r}")
    return domain, path


# ------------------------------------------------------------------------------ absorb


def cmd_absorb(args: argparse.Namespace) -> int:
    from actors.absorber import AbsorbJob, JobError, format_events, format_table, run_absorb_job

    eval_texts = dict(args.probe or [])
    if args.eval:
        eval_texts.setdefault(Path(args.eval).parent.name or "eval", args.eval)
    if not eval_texts:
        _say("error: pass held-out text with --eval PATH or --probe DOMAIN=PATH")
        return 2
    job = AbsorbJob(
        teachers=args.teacher, corpus=args.corpus, eval_texts=eval_texts, out=args.out, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, hidden_size=args.hidden, n_parts=args.parts,
        between_steps=args.between_steps, max_attempts=args.max_attempts, bpb_tolerance=args.bpb_tolerance,
        interference_tolerance=args.interference_tolerance, random_baseline=args.random_baseline,
        strength=args.strength, mode=args.absorb_mode, absorb_from=args.mode, distill_k=args.top_k,
        distill_windows=args.distill_windows, target_cache=args.target_cache, eval_bytes=args.eval_bytes or None,
        teacher_eval_bytes=args.teacher_eval_bytes or None, score_teachers=not args.no_teacher_scores,
        commit_every=args.commit_every, seed=args.seed, address=args.address, num_cpus=args.num_cpus,
        auto_grow=not args.no_auto_grow, auto_compress=not args.no_auto_compress,
    )
    try:
        report = run_absorb_job(job, progress=_say, bar=_progress_bar)
    except JobError as error:
        _say(f"error: {error}")
        return 1
    print(format_events(report))
    print()
    print(format_table(report))
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in report.stage_seconds.items())
    print(f"stages: {stages}")
    print(f"checkpoint {report.checkpoint} at version {report.version} ({report.seconds:.0f} s)")
    _write_json(args.json, report.as_dict())
    return 0


# ------------------------------------------------------------------------------ eval / lineage


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from somi_ray.evaluate import bits_per_byte
    from somi_ray.lineage import CheckpointError, load_checkpoint

    try:
        checkpoint = load_checkpoint(args.dir)
    except CheckpointError as error:
        _say(f"error: {error}")
        return 1
    text_path = Path(args.text)
    if not text_path.is_file():
        _say(f"error: text {text_path} is not a file")
        return 1
    model = checkpoint.model.eval()

    @torch.no_grad()
    def logits_fn(ids):
        return model(ids)

    result = bits_per_byte(logits_fn, checkpoint.tokenizer(), text_path.read_text(encoding="utf-8"),
                           context=args.context, max_bytes=args.max_bytes or None)
    print(f"{args.dir}: {result.bpb:.4f} bits per byte ({result.tokens} tokens, {result.bytes} bytes, "
          f"version {checkpoint.version})")
    _write_json(args.json, {"checkpoint": str(checkpoint.path), "version": checkpoint.version,
                            "text": str(text_path), **result.__dict__})
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from somi_ray.lineage import CheckpointError, load_lineage

    try:
        lineage = load_lineage(args.dir)
    except CheckpointError as error:
        _say(f"error: {error}")
        return 1
    from datetime import datetime, timezone

    for event in lineage:
        when = datetime.fromtimestamp(event.time, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        metrics = {k: v for k, v in event.metrics.items() if not isinstance(v, (list, dict)) or k == "bpb"}
        details = {k: v for k, v in event.details.items() if not isinstance(v, (list, dict))}
        print(f"#{event.event_id:<3} v{event.version:<4} {when}  {event.kind:<14} "
              f"{json.dumps(details, default=str)}  {json.dumps(metrics, default=str)}")
    if args.plot:
        from somi_ray.plots import plot_lineage

        plot_lineage(lineage, args.plot)
        _say(f"wrote {args.plot}")
    _write_json(args.json, [event.row() for event in lineage])
    return 0


# ------------------------------------------------------------------------------ init / learn


def _load_tokenizer(path: str):
    """Load a tokenizer from a tokenizer.json file, or from a teacher (GGUF file or model folder)."""
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        return Tokenizer.from_file(str(p))
    from somi_ray.teachers import open_teacher

    with open_teacher(str(p)) as reader:
        return reader.tokenizer


def cmd_init(args: argparse.Namespace) -> int:
    from somi_ray.config import SomiConfig
    from somi_ray.lineage import Lineage, checkpoint_exists, save_checkpoint
    from somi_ray.model import SomiModel

    if checkpoint_exists(args.dir):
        _say(f"error: {args.dir} already holds a SOMI checkpoint; choose another folder")
        return 1
    try:
        tokenizer = _load_tokenizer(args.tokenizer)
    except (OSError, ValueError, Exception) as error:  # tokenizers raises its own Exception type
        _say(f"error: could not read a tokenizer from {args.tokenizer}: {error}")
        return 1
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if args.from_scratch:
        config = SomiConfig.from_scratch(vocab_size=vocab)
    else:
        config = SomiConfig.auto(args.hidden, args.parts, vocab_size=vocab)
    model = SomiModel(config, seed=args.seed)
    lineage = Lineage()
    lineage.append("init", {"hidden_size": config.hidden_size, "n_parts": config.n_parts,
                            "tokenizer_from": args.tokenizer, "seed": args.seed},
                   {"parameters": model.parameter_count()})
    save_checkpoint(args.dir, model, tokenizer.to_str(), lineage)
    print(f"created {args.dir}: hidden {config.hidden_size}, {config.n_parts} Parts, vocabulary {vocab}, "
          f"{model.parameter_count()} parameters")
    return 0


def cmd_learn(args: argparse.Namespace) -> int:
    from somi_ray.learn import LearnOptions, learn_checkpoint
    from somi_ray.lineage import CheckpointError

    options = LearnOptions(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                           auto_grow=not args.no_auto_grow, auto_compress=not args.no_auto_compress,
                           seed=args.seed, commit_every=args.commit_every)
    try:
        summary = learn_checkpoint(args.dir, args.corpus, options, progress=_say, bar=_progress_bar)
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        _say(f"error: {error}")
        return 1
    print(json.dumps(summary, indent=2, default=str))
    return 0


# ------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="somi-ray",
        description="SOMI: one language model that absorbs open-weight teachers, learns on every pass "
                    "and records its history; run on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    absorb = commands.add_parser("absorb", help="absorb teachers into a SOMI model on Ray and report bits per byte")
    absorb.add_argument("--teacher", action="append", required=True,
                        help="teacher .gguf file or Hugging Face folder; repeat for several (absorbed in order)")
    absorb.add_argument("--corpus", required=True, help="training text file for learning after absorption")
    absorb.add_argument("--eval", help="held-out text file (domain named after its folder)")
    absorb.add_argument("--probe", action="append", type=_parse_probe, metavar="DOMAIN=PATH",
                        help="held-out text of a probe domain; repeat for several")
    absorb.add_argument("--out", required=True, help="checkpoint folder (created, or continued when it exists)")
    absorb.add_argument("--steps", type=int, default=200, help="learning steps after absorption (default 200)")
    absorb.add_argument("--between-steps", type=int, default=0,
                        help="learning steps after each absorption but the last (default 0)")
    absorb.add_argument("--random-baseline", action="store_true",
                        help="also train SOMI from random initialisation for the same number of steps")
    absorb.add_argument("--max-attempts", type=int, default=3,
                        help="absorption attempts per teacher; each retry after a rollback halves the strength")
    absorb.add_argument("--bpb-tolerance", type=float, default=0.02,
                        help="allowed relative rise of probe bits per byte after an absorption (default 0.02)")
    absorb.add_argument("--interference-tolerance", type=float, default=0.02,
                        help="allowed relative rise on probe domains where the teacher is not stronger")
    absorb.add_argument("--batch-size", type=int, default=8, help="windows per learning step (default 8)")
    absorb.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
    absorb.add_argument("--hidden", type=int, default=128, help="hidden size of a new SOMI model (default 128)")
    absorb.add_argument("--parts", type=int, default=2, help="Parts of a new SOMI model (default 2)")
    absorb.add_argument("--strength", type=float, default=0.5,
                        help="blend strength in [0, 1] for teachers absorbed into an existing model (default 0.5)")
    absorb.add_argument("--absorb-mode", choices=["blend", "spectral"], default="blend",
                        help="how band operators enter the Parts (default blend)")
    absorb.add_argument("--mode", choices=["weights", "outputs", "both"], default="both",
                        help="absorb through teacher weights, through their top-k next-token distributions "
                             "(distillation; works for API endpoints too), or both (default both)")
    absorb.add_argument("--top-k", type=int, default=16, help="teacher candidates kept per position (default 16)")
    absorb.add_argument("--distill-windows", type=int, default=512,
                        help="corpus windows that get teacher targets, evenly spaced (default 512)")
    absorb.add_argument("--target-cache", help="folder of cached teacher targets (default: beside the checkpoint)")
    absorb.add_argument("--eval-bytes", type=int, default=60_000,
                        help="bytes of each held-out text scored for SOMI and baselines; 0 scores all")
    absorb.add_argument("--teacher-eval-bytes", type=int, default=20_000,
                        help="bytes scored for each teacher itself; 0 scores all (slow on CPU)")
    absorb.add_argument("--no-teacher-scores", action="store_true", help="skip scoring the teachers themselves")
    absorb.add_argument("--commit-every", type=int, default=50, help="learning steps per lineage event")
    absorb.add_argument("--no-auto-grow", action="store_true", help="never grow while learning after absorptions")
    absorb.add_argument("--no-auto-compress", action="store_true",
                        help="never compress while learning after absorptions")
    absorb.add_argument("--seed", type=int, default=0)
    absorb.add_argument("--address", help="join this Ray cluster instead of starting an embedded local one")
    absorb.add_argument("--num-cpus", type=float, help="CPUs of the embedded local Ray (default: all)")
    absorb.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    absorb.set_defaults(func=cmd_absorb)

    evaluate = commands.add_parser("eval", help="bits per byte of a checkpoint on a text")
    evaluate.add_argument("dir", help="checkpoint folder")
    evaluate.add_argument("--text", required=True, help="UTF-8 text file")
    evaluate.add_argument("--context", type=int, default=256, help="tokens of context per scoring window")
    evaluate.add_argument("--max-bytes", type=int, default=0, help="score only the first N bytes; 0 scores all")
    evaluate.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    evaluate.set_defaults(func=cmd_eval)

    lineage = commands.add_parser("lineage", help="print a checkpoint's event history")
    lineage.add_argument("dir", help="checkpoint folder")
    lineage.add_argument("--plot", metavar="FILE.png", help="draw bits per byte, hidden size and Parts over events")
    lineage.add_argument("--json", metavar="FILE", help="also write the events as JSON")
    lineage.set_defaults(func=cmd_lineage)

    init = commands.add_parser("init", help="create a new SOMI model")
    init.add_argument("dir", help="checkpoint folder to create")
    init.add_argument("--tokenizer", required=True, help="tokenizer.json, or a teacher whose tokenizer SOMI adopts")
    size = init.add_mutually_exclusive_group(required=True)
    size.add_argument("--from-scratch", action="store_true", help="start at hidden size 16 with one Part")
    size.add_argument("--hidden", type=int, help="hidden size")
    init.add_argument("--parts", type=int, default=1, help="Parts (with --hidden; default 1)")
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(func=cmd_init)

    learn = commands.add_parser("learn", help="continue learning from text and record it in the lineage")
    learn.add_argument("dir", help="checkpoint folder")
    learn.add_argument("--corpus", required=True, help="training text file")
    learn.add_argument("--steps", type=int, required=True, help="learning steps")
    learn.add_argument("--batch-size", type=int, default=8)
    learn.add_argument("--seq-len", type=int, default=128)
    learn.add_argument("--commit-every", type=int, default=100, help="learning steps per lineage event")
    learn.add_argument("--no-auto-grow", action="store_true", help="never grow during this run")
    learn.add_argument("--no-auto-compress", action="store_true", help="never compress during this run")
    learn.add_argument("--seed", type=int, default=0)
    learn.set_defaults(func=cmd_learn)

    for module_name in ("somi_ray.teachers.cli", "somi_ray.integrity", "actors.serve_app"):
        register = _optional_register(module_name)
        if register is not None:
            register(commands)
    return parser


def _optional_register(module_name: str):
    """Return the `register_cli` of a command module, or None when the module is not installed."""
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        if error.name and module_name.startswith(error.name):
            return None
        raise
    return getattr(module, "register_cli", None)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
