"""Benchmark SOMI's forward-plus-learning step against a naive integrator and a transformer block.

Run:  python bench/bench_engine.py [--hidden 256 --parts 4 --seq-len 256 --batch 4 --steps 5]
      python bench/bench_engine.py --train [train_shakespeare.py options]

Three variants, each timed in a fresh subprocess on the same byte-level batches (V = 256, so
the Parts and not the decoder dominate), measured side by side in one run:

1. somi: `SomiModel.learn_step` with AdamW and the local rules (closed-form settle).
2. naive: the same model and step, but every settle (free and nudged) integrates the same
   equations with a dense (H, H) operator and explicit symplectic-Euler steps. The step is
   the cascade's correction step, run over the whole settling time, and backprop runs
   through every step.
3. transformer: embedding, one `torch.nn.TransformerEncoderLayer` of the same width with a
   causal mask, and a linear decoder, trained by AdamW.

Prints tokens per second, the speed-up of somi over each, and the peak resident memory of
each subprocess (peak GPU memory on CUDA). `--train` runs bench/train_shakespeare.py instead.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def naive_settle(op, s, target=None, *, noise_std: float = 0.0, track_energy: bool = False):
    """Explicit small-step integration of the settle's equations with a dense operator.

    The operator is the same truncated Â the closed form uses (K kept modes, the rest at the
    shared complement eigenvalue), formed as a dense (H, H) matrix, so both solve one system.
    """
    from somi_ray.physics.settle import SettleResult

    H = op.modes.shape[0]
    eye = torch.eye(H, dtype=s.dtype, device=s.device)
    shift = op.eigenvalues - op.complement_eigenvalue  # (K,)
    dense = op.complement_eigenvalue * eye + (op.modes * shift) @ op.modes.T  # (H, H)
    b_tilde = op.drive(s, target)
    psi = s / op.inv_sqrt_mass
    velocity = torch.zeros_like(psi)
    dt = op.correction_dt
    steps = int(round(op.settle_time / dt))
    for _ in range(steps):
        phi = psi * op.inv_sqrt_mass
        force = -psi @ dense + b_tilde - op.inv_sqrt_mass * (torch.tanh(phi) - phi)
        velocity = velocity + dt * (force - op.damping * velocity)
        psi = psi + dt * velocity
    return SettleResult(phi=psi * op.inv_sqrt_mass, energies=[], rejected=0)


class TransformerLM(torch.nn.Module):
    def __init__(self, vocab: int, width: int, heads: int):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab, width)
        self.block = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True)
        self.decoder = torch.nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(T, device=ids.device)
        return self.decoder(self.block(self.embedding(ids), src_mask=mask, is_causal=True))


def batches(args, device) -> list[torch.Tensor]:
    from somi_ray import assets

    data = torch.tensor(list(assets.corpus_path("shakespeare", "train").read_bytes()[:1_000_000]))
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(args.steps + 1):
        starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch,), generator=generator)
        out.append(torch.stack([data[s : s + args.seq_len + 1] for s in starts.tolist()]).to(device))
    return out


def run_variant(args) -> dict:
    """Time one variant in this process; the first batch is a warm-up."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    data = batches(args, device)

    if args.variant == "transformer":
        model = TransformerLM(256, args.hidden, args.heads).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(batch):
            logits = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    else:
        import somi_ray.model as model_module
        from somi_ray.config import SomiConfig

        if args.variant == "naive":
            model_module.settle = naive_settle  # Part.forward and the local step both call it
        model = model_module.SomiModel(SomiConfig.auto(args.hidden, args.parts), seed=0).to(device)
        optimizer = model.make_optimizer()

        def step(batch):
            model.learn_step(batch, optimizer)

    step(data[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for batch in data[1:]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens = args.steps * args.batch * args.seq_len
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux reports KiB
    return {"variant": args.variant, "tokens_per_s": tokens / seconds, "seconds_per_step": seconds / args.steps,
            "peak_mb": peak, "memory": "cuda allocated" if device.type == "cuda" else "process RSS"}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--train" in argv:
        argv.remove("--train")
        sys.path.insert(0, str(Path(__file__).parent))
        import train_shakespeare

        train_shakespeare.main(argv)
        return

    parser = argparse.ArgumentParser(description="SOMI engine throughput against a naive integrator and a transformer block")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size H (the transformer's width)")
    parser.add_argument("--parts", type=int, default=4, help="Part count P")
    parser.add_argument("--heads", type=int, default=4, help="attention heads of the transformer block")
    parser.add_argument("--seq-len", type=int, default=256, help="positions per window T")
    parser.add_argument("--batch", type=int, default=4, help="windows per batch")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.variant is not None:
        print(json.dumps(run_variant(args)))
        return

    results = {}
    for variant in ("somi", "naive", "transformer"):
        command = [sys.executable, __file__, *argv, "--variant", variant, "--threads", str(args.threads)]
        completed = subprocess.run(command, capture_output=True, text=True, check=True)
        results[variant] = json.loads(completed.stdout.strip().splitlines()[-1])

    print(f"H={args.hidden} P={args.parts} T={args.seq_len} B={args.batch} steps={args.steps} "
          f"device={args.device} threads={args.threads}")
    for variant, result in results.items():
        print(f"{variant:12s} {result['tokens_per_s']:10.0f} tokens/s  {result['seconds_per_step']:8.3f} s/step  "
              f"peak {result['peak_mb']:8.0f} MB ({result['memory']})")
    somi = results["somi"]["tokens_per_s"]
    print(f"somi / naive integrator: {somi / results['naive']['tokens_per_s']:.1f}x")
    print(f"somi / transformer block: {somi / results['transformer']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
