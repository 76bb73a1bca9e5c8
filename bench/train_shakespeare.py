"""Train SOMI on the Shakespeare training works and score held-out bits per byte.

Run:  python bench/train_shakespeare.py [--tokenizer bytes|smollm2] [--minutes 18] [--hidden 128] [--parts 2]

Dual learning (backprop plus the local rules) runs on shuffled windows of the training split
for a wall-clock budget. Held-out bits per byte are measured on a fixed slice during training
and on the whole held-out split at the end, next to the Kneser-Ney bigram and the unigram of
the same tokenizer fitted on the same training text. Prints one JSON line per evaluation and
a summary line at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from somi_ray import assets
from somi_ray.config import SomiConfig
from somi_ray.data import build_windows, byte_tokenizer, iter_batches, load_corpus, tokenize_documents
from somi_ray.evaluate import BigramModel, UnigramModel, bits_per_byte
from somi_ray.model import SomiModel


def load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    path = assets.teacher_path("smollm2")
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).backend_tokenizer


def scheduled_lr(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the base rate at `total` steps."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", choices=["bytes", "smollm2"], default="bytes",
                        help="byte-level (V=256) or the SmolLM2 tokenizer (V=49152)")
    parser.add_argument("--minutes", type=float, default=18.0, help="training wall-clock budget, minutes")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size H")
    parser.add_argument("--parts", type=int, default=2, help="Part count P")
    parser.add_argument("--batch", type=int, default=16, help="windows per batch")
    parser.add_argument("--seq-len", type=int, default=128, help="positions per window T")
    parser.add_argument("--lr", type=float, default=None, help="peak AdamW rate (default: the cascade's)")
    parser.add_argument("--expected-steps", type=int, default=600, help="steps the cosine schedule spans")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between held-out slice evaluations")
    parser.add_argument("--eval-bytes", type=int, default=40_000, help="bytes of the held-out slice")
    parser.add_argument("--final-bytes", type=int, default=None, help="bytes of held-out text scored at the end (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-local", action="store_true", help="turn the local rules off (backprop only)")
    parser.add_argument("--no-context", action="store_true",
                        help="ablation: hold every Part's context gain at zero, so no position sees an earlier one")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    tokenizer = byte_tokenizer() if args.tokenizer == "bytes" else load_smollm2_tokenizer()
    train_docs = load_corpus("shakespeare", "train")
    heldout_text = assets.corpus_path("shakespeare", "heldout").read_text(encoding="utf-8")
    train_text = "".join(doc.text for doc in train_docs)

    started = time.perf_counter()
    bigram_model = BigramModel.fit(tokenizer, train_text)
    bigram = bigram_model.bits_per_byte(heldout_text, max_bytes=args.final_bytes).bpb
    unigram_model = UnigramModel.fit(tokenizer, train_text)
    unigram = unigram_model.bits_per_byte(heldout_text, max_bytes=args.final_bytes).bpb
    bigram_slice = bigram_model.bits_per_byte(heldout_text, max_bytes=args.eval_bytes).bpb
    windows = build_windows(tokenize_documents(tokenizer, train_docs), args.seq_len)
    print(json.dumps({"event": "baselines", "bigram_bpb": round(bigram, 4), "unigram_bpb": round(unigram, 4),
                      "bigram_slice_bpb": round(bigram_slice, 4), "train_windows": windows.num_rows, "seconds": round(time.perf_counter() - started, 1)}),
          flush=True)

    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    config = SomiConfig.auto(args.hidden, args.parts, vocab_size=vocab, tokens_per_step=args.batch * args.seq_len)
    model = SomiModel(config, seed=args.seed)
    # The decoder bias starts at the unigram log-probabilities of the training text, so the
    # first steps spend no effort learning token frequencies.
    with torch.no_grad():
        model.decoder.bias.copy_(torch.from_numpy(unigram_model.log_probs).float())
    if args.no_context:
        # With c = 0 the drive of position t is x_t alone. Every layer works per position,
        # so the model is a function of the current token, like the bigram.
        for part in model.parts:
            part.context_gain.requires_grad_(False)
            part.context_gain.data.zero_()
    lr = args.lr or config.lr
    optimizer = model.make_optimizer(lr)

    def score(max_bytes: int | None) -> float:
        model.eval()
        with torch.no_grad():
            result = bits_per_byte(model, tokenizer, heldout_text, context=args.seq_len, batch_size=16,
                                   max_bytes=max_bytes)
        return result.bpb

    curve = []
    step, seen_tokens, epoch = 0, 0, 0
    budget = args.minutes * 60.0
    train_started = time.perf_counter()
    losses: list[float] = []
    done = False
    while not done:
        for batch in iter_batches(windows, args.batch, seed=args.seed + epoch):
            for group in optimizer.param_groups:
                group["lr"] = scheduled_lr(step, lr, 20, args.expected_steps)
            stats = model.learn_step(batch, optimizer, local=not args.no_local)
            losses.append(stats.loss)
            step += 1
            seen_tokens += batch.shape[0] * (batch.shape[1] - 1)
            elapsed = time.perf_counter() - train_started
            if step % args.eval_every == 0:
                point = {"event": "eval", "step": step, "tokens": seen_tokens, "seconds": round(elapsed, 1),
                         "train_loss": round(float(np.mean(losses[-args.eval_every:])), 4),
                         "heldout_slice_bpb": round(score(args.eval_bytes), 4),
                         "jepa_error": round(stats.jepa_error, 4),
                         "stress_loss_corr": round(model.stress_loss_correlation(), 3)}
                curve.append(point)
                print(json.dumps(point), flush=True)
                model.train()
            if time.perf_counter() - train_started >= budget:
                done = True
                break
        epoch += 1

    train_seconds = time.perf_counter() - train_started
    final = score(args.final_bytes)
    summary = {
        "event": "final", "tokenizer": args.tokenizer, "hidden": args.hidden, "parts": args.parts, "batch": args.batch, "seq_len": args.seq_len,
        "lr": lr, "local_rules": not args.no_local, "context": not args.no_context, "steps": step, "tokens": seen_tokens,
        "train_seconds": round(train_seconds, 1), "heldout_bpb": round(final, 4), "bigram_bpb": round(bigram, 4),
        "unigram_bpb": round(unigram, 4), "beats_bigram": final < bigram,
        "stress_loss_corr": round(model.stress_loss_correlation(), 3), "parameters": model.parameter_count(),
    }
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
