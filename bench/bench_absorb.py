"""Teacher extraction in parallel against one after another, on the same embedded Ray cluster.

Prints, measured in one run, the wall time of extracting the three real teachers with one
TeacherActor each running at once, against the same work done teacher after teacher, and the
ratio. Extraction means the band operators of every layer plus the package header. With --report FILE (the
JSON of `somi-ray absorb --json`), it also prints the time of each stage of that job.

    .venv/bin/python bench/bench_absorb.py [--parts 2] [--hidden 128] [--report runs/main.json]
"""

from __future__ import annotations

import argparse
import json
import time


def extract(ray, actors, n_parts: int, hidden: int) -> None:
    ray.get([actor.prepare.remote(n_parts) for actor in actors])
    ray.get([actor.header.remote(hidden) for actor in actors])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--report", help="JSON report of an absorb job, for its stage times")
    args = parser.parse_args()

    from actors.runtime import RayOptions, start_ray
    from actors.teacher_actor import remote_teacher_actor
    from somi_ray.assets import teacher_path

    paths = [str(teacher_path(name)) for name in ("smollm2", "gemma3", "qwen-coder")]
    ray = start_ray(RayOptions(num_cpus=4))

    started = time.perf_counter()
    for path in paths:
        actor = remote_teacher_actor(path)
        extract(ray, [actor], args.parts, args.hidden)
        ray.kill(actor)
    sequential = time.perf_counter() - started

    started = time.perf_counter()
    actors = [remote_teacher_actor(path) for path in paths]
    extract(ray, actors, args.parts, args.hidden)
    parallel = time.perf_counter() - started
    for actor in actors:
        ray.kill(actor)

    print(f"teachers: {', '.join(p.rsplit('/', 1)[-1] for p in paths)}; {args.parts} bands, hidden {args.hidden}")
    print(f"one after another: {sequential:7.1f} s")
    print(f"in parallel:       {parallel:7.1f} s")
    print(f"speed-up:          {sequential / parallel:7.2f}x  (machine cores: {__import__('os').cpu_count()})")

    if args.report:
        report = json.loads(open(args.report).read())
        print("\nstages of the absorb job in", args.report)
        for stage, seconds in report.get("stage_seconds", {}).items():
            print(f"  {stage:<24} {seconds:8.1f} s")
        print(f"  {'whole job':<24} {report.get('seconds', 0.0):8.1f} s")


if __name__ == "__main__":
    main()
