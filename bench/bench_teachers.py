"""Benchmark teacher reading against transformers, and the Gram PCA against a full SVD.

Run:  SOMI_RAY_SMOLLM2=... SOMI_RAY_GEMMA3=... SOMI_RAY_QWEN_CODER=... python bench/bench_teachers.py

Sections, each measured side by side in one run:
1. Build the projected package vs `AutoModelForCausalLM.from_pretrained(gguf_file=...)` plus
   reading its state dict, on the same teacher; each in a fresh subprocess for honest peak RSS.
2. PCA of the teacher embedding by the Gram eigendecomposition and by randomised SVD vs a full SVD.
3. All three teachers projected into one SOMI basis: the first by PCA, the next two by Procrustes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

TEACHERS = (("smollm2", "SOMI_RAY_SMOLLM2"), ("gemma3", "SOMI_RAY_GEMMA3"), ("qwen_coder", "SOMI_RAY_QWEN_CODER"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# -- workers, run in fresh subprocesses ---------------------------------------------------------


def work_package(args) -> dict:
    import numpy as np

    from somi_ray.teachers import build_package
    from somi_ray.teachers.cli import load_somi_checkpoint

    started = time.perf_counter()
    tokenizer, embedding = None, None
    if args.somi:
        tokenizer, _, _, embedding = load_somi_checkpoint(args.somi)
    package = build_package(args.teacher, tokenizer, args.hidden, args.parts, somi_embedding=embedding)
    seconds = time.perf_counter() - started

    if args.save:  # this teacher defines SOMI: write the checkpoint the next teachers align to
        from safetensors.numpy import save_file

        from somi_ray.teachers import open_teacher

        os.makedirs(args.save, exist_ok=True)
        with open_teacher(args.teacher) as reader:
            reader.tokenizer.save(os.path.join(args.save, "tokenizer.json"))
        rows = np.zeros((reader.info.tokenizer_size, args.hidden), dtype=np.float32)
        rows[package.vocab.somi_ids] = package.embedding
        save_file({"embedding.weight": rows}, os.path.join(args.save, "model.safetensors"))
        with open(os.path.join(args.save, "config.json"), "w") as handle:
            json.dump({"hidden_size": args.hidden, "n_parts": args.parts}, handle)

    return {
        "seconds": seconds, "peak_rss_mb": peak_rss_mb(), "family": package.info.family,
        "coverage": package.vocab.coverage, "shared_tokens": int(len(package.vocab.somi_ids)),
        "method": package.basis.method, "residual": package.basis.residual, "scale": package.basis.scale,
        "embedding_energy_kept": package.basis.energy_kept,
        "bands": [{"layers": [b.layers[0], b.layers[-1]], "energy_kept": b.energy_kept,
                   "energy_delivered": b.energy_delivered, "gap": b.spectrum["gap"],
                   "effective_rank": b.spectrum["effective_rank"]} for b in package.bands],
    }


def work_transformers(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    folder, name = os.path.split(os.path.abspath(args.teacher))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = {key: value.detach().numpy() for key, value in model.state_dict().items()}
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "tensors": len(state)}


def work_svd(args) -> dict:
    import numpy as np

    from somi_ray.teachers import open_teacher
    from somi_ray.teachers.basis import pca_basis, randomized_pca

    with open_teacher(args.teacher) as reader:
        embedding = reader.embedding()
    timings = {"rows": embedding.shape[0], "width": embedding.shape[1]}

    started = time.perf_counter()
    gram = pca_basis(embedding, args.hidden).q
    timings["gram_seconds"] = time.perf_counter() - started

    started = time.perf_counter()
    randomized = randomized_pca(embedding, args.hidden)
    timings["randomized_seconds"] = time.perf_counter() - started

    started = time.perf_counter()
    centred = embedding - embedding.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    reference = vt[:args.hidden].T
    timings["full_svd_seconds"] = time.perf_counter() - started

    def subspace_error(q):
        return float(np.linalg.norm(q @ q.T - reference @ reference.T) / np.sqrt(2 * args.hidden))

    timings["gram_subspace_error"] = subspace_error(gram.astype(np.float64))
    timings["randomized_subspace_error"] = subspace_error(randomized)
    return timings


WORKERS = {"package": work_package, "transformers": work_transformers, "svd": work_svd}


# -- driver -------------------------------------------------------------------------------------


def run_worker(kind: str, teacher: str, hidden: int, parts: int, *, somi: str | None = None,
               save: str | None = None) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--teacher", teacher, "--hidden", str(hidden),
               "--parts", str(parts)]
    if somi:
        command += ["--somi", somi]
    if save:
        command += ["--save", save]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{kind} worker failed on {teacher}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    parser.add_argument("--somi", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=256, help="SOMI hidden size H (default 256)")
    parser.add_argument("--parts", type=int, default=4, help="SOMI Parts, one band each (default 4)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["transformers", "svd", "chain"],
                        help="sections to leave out")
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return

    paths = {name: os.environ.get(variable) for name, variable in TEACHERS}
    missing = [variable for name, variable in TEACHERS if not paths[name] or not os.path.exists(paths[name])]
    if missing:
        sys.exit(f"set {', '.join(missing)} to the teachers' .gguf files")
    print(f"H={args.hidden}, parts={args.parts}, cpus={os.cpu_count()}")

    if "transformers" not in args.skip:
        teacher = paths["smollm2"]
        ours = run_worker("package", teacher, args.hidden, args.parts)
        theirs = run_worker("transformers", teacher, args.hidden, args.parts)
        print("\n1. SmolLM2 GGUF: projected package vs transformers from_pretrained + state dict")
        print(f"   {'':28}{'seconds':>10}{'peak RSS MB':>14}")
        print(f"   {'somi_ray build_package':28}{ours['seconds']:>10.1f}{ours['peak_rss_mb']:>14.0f}")
        print(f"   {'transformers':28}{theirs['seconds']:>10.1f}{theirs['peak_rss_mb']:>14.0f}")
        print(f"   ratio transformers / ours: time {theirs['seconds'] / ours['seconds']:.2f}x, "
              f"peak RSS {theirs['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x")

    if "svd" not in args.skip:
        print("\n2. PCA of the embedding, top-H directions")
        for name in ("smollm2", "qwen_coder"):
            svd = run_worker("svd", paths[name], args.hidden, args.parts)
            print(f"   {name} ({svd['rows']} x {svd['width']}): Gram {svd['gram_seconds']:.2f} s, randomised "
                  f"{svd['randomized_seconds']:.2f} s, full SVD {svd['full_svd_seconds']:.2f} s; full/Gram "
                  f"{svd['full_svd_seconds'] / svd['gram_seconds']:.1f}x, full/randomised "
                  f"{svd['full_svd_seconds'] / svd['randomized_seconds']:.1f}x; subspace error Gram "
                  f"{svd['gram_subspace_error']:.1e}, randomised {svd['randomized_subspace_error']:.1e}")

    if "chain" not in args.skip:
        print("\n3. Three teachers into one SOMI basis (each in a fresh process)")
        with tempfile.TemporaryDirectory(prefix="somi_bench_") as somi:
            for index, (name, _) in enumerate(TEACHERS):
                if index == 0:
                    result = run_worker("package", paths[name], args.hidden, args.parts, save=somi)
                else:
                    result = run_worker("package", paths[name], args.hidden, args.parts, somi=somi)
                print(f"   {name} ({result['family']}): {result['method']}, coverage {result['coverage']:.3f} "
                      f"({result['shared_tokens']} tokens), residual {result['residual']:.3f}, embedding energy "
                      f"kept {result['embedding_energy_kept']:.3f}, {result['seconds']:.1f} s, peak RSS "
                      f"{result['peak_rss_mb']:.0f} MB")
                for band in result["bands"]:
                    print(f"      layers {band['layers'][0]:>2}-{band['layers'][1]:<2}: energy kept "
                          f"{band['energy_kept']:.4f}, delivered {band['energy_delivered']:.4f}, gap "
                          f"{band['gap']:.3f}, effective rank {band['effective_rank']:.1f}")


if __name__ == "__main__":
    main()
