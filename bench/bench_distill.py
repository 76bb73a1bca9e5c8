"""Output-space absorption on Shakespeare with the three real teachers: learning curves and target throughput.

Runs, on the same corpus slice, SOMI size, sampler seed and step count:

1. `--mode both`: weight absorption of every teacher, then learning with distillation.
   This run fills the target cache.
2. `--mode outputs`: random initial weights, learning with distillation; the targets come
   from the cache (its hit rate is the second-run hit rate).
3. `--mode weights` with the random-init baseline: weight absorption then plain learning,
   and SOMI from random initialisation trained for the same steps.

Each learning phase evaluates held-out bits per byte every `--every` steps. The script prints
every curve, the teachers' target throughput and coverage, and the steps `--mode both` needed
to reach the random-init model's final held-out bpb.

Example (about 20 minutes on 2 busy cores):
    python bench/bench_distill.py --steps 60 --every 10 --chars 40000 --out /tmp/bench-distill
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def run(mode: str, args, corpus: Path, heldout: Path, teachers: list[str], random_baseline: bool) -> dict:
    from actors.absorber import AbsorbJob, run_absorb_job

    out = Path(args.out) / f"somi-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(f"{out}-random-init", ignore_errors=True)
    job = AbsorbJob(teachers=teachers, corpus=str(corpus), eval_texts={"shakespeare": str(heldout)}, out=str(out),
                    steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, hidden_size=args.hidden,
                    n_parts=2, absorb_from=mode, distill_k=args.top_k, distill_windows=args.windows,
                    target_cache=str(Path(args.out) / "targets"), eval_bytes=args.eval_bytes,
                    score_teachers=False, random_baseline=random_baseline, commit_every=args.every, curve=True,
                    seed=0, num_cpus=4)
    started = time.time()
    report = run_absorb_job(job, progress=lambda line: print(f"[{mode}] {line}", flush=True))
    return {"mode": mode, "seconds": time.time() - started, "report": report.as_dict()}


def steps_to_reach(curve: list, target: float) -> int | None:
    for steps, bpb in curve:
        if bpb["shakespeare"] <= target:
            return steps
    return None


def main() -> None:
    from somi_ray.assets import corpus_path, teacher_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="learning steps per run")
    parser.add_argument("--every", type=int, default=10, help="learning steps between held-out evaluations")
    parser.add_argument("--chars", type=int, default=40_000, help="characters of the training corpus used")
    parser.add_argument("--eval-bytes", type=int, default=4_000, help="bytes of held-out text scored")
    parser.add_argument("--hidden", type=int, default=64, help="SOMI hidden size")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per window")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per learning step")
    parser.add_argument("--top-k", type=int, default=16, help="teacher candidates per position")
    parser.add_argument("--windows", type=int, default=512, help="windows that get teacher targets")
    parser.add_argument("--modes", default="both,outputs,weights", help="runs, in order")
    parser.add_argument("--out", default="/tmp/bench-distill", help="work folder (checkpoints, target cache)")
    args = parser.parse_args()

    Path(args.out).mkdir(parents=True, exist_ok=True)
    corpus = Path(args.out) / "train-slice.txt"
    corpus.write_text(corpus_path("shakespeare", "train").read_text(encoding="utf-8")[:args.chars], encoding="utf-8")
    heldout = corpus_path("shakespeare", "heldout")
    teachers = [str(teacher_path(name)) for name in ("smollm2", "gemma3", "qwen-coder")]

    results = []
    for mode in args.modes.split(","):
        results.append(run(mode, args, corpus, heldout, teachers, random_baseline=mode == "weights"))
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1, default=str))

    print("\nheld-out Shakespeare bits per byte by learning step (step 0: before learning)")
    curves = {}
    for result in results:
        rows = [row for row in result["report"]["rows"] if row["name"].startswith("SOMI ")]
        untrained = rows[0]["bpb"]  # "SOMI before absorbing": the random initial model of every run
        before_learning = [row for row in rows if "learning steps" not in row["name"]][-1]["bpb"]
        for label, curve in result["report"]["curves"].items():
            random_init = label.startswith("random")
            name = "random init" if random_init else f"--mode {result['mode']}"
            curves[name] = [(0, untrained if random_init else before_learning), *curve]
    for name, curve in curves.items():
        print(f"  {name:<16} " + "  ".join(f"{steps}: {bpb['shakespeare']:.4f}" for steps, bpb in curve))

    print("\nteacher targets (first computing run, then the cached run)")
    for result in results:
        for target in result["report"]["targets"]:
            print(f"  [{result['mode']}] {Path(target['teacher']).name}: {target['windows']} windows, "
                  f"{target['computed']} computed, coverage {target['coverage']:.3f}, "
                  f"{target['tokens_per_second']:.0f} teacher tokens/s, cache hit rate {target['hit_rate']:.2f}")

    if "random init" in curves and "--mode both" in curves:
        final = curves["random init"][-1][1]["shakespeare"]
        reached = steps_to_reach(curves["--mode both"], final)
        print(f"\nrandom init final bpb {final:.4f} after {curves['random init'][-1][0]} steps; --mode both reaches it "
              f"after {reached} steps" if reached else f"\n--mode both never reached {final:.4f}")
    for result in results:
        print(f"  [{result['mode']}] wall time {result['seconds']:.0f} s, stages "
              f"{ {k: round(v) for k, v in result['report']['stage_seconds'].items()} }")


if __name__ == "__main__":
    main()
