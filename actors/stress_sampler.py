"""StressSampler: serves training windows chosen by the model's stress.

The corpus is held as Arrow record batches of token windows. Every window has its own
stress score, reported back by the ModelActor after each batch. Sampling draws windows with
probability proportional to exp(z / temperature), where z is the window's standardised
stress. Windows not yet seen get a coverage bonus, so the whole corpus is visited.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


class StressSampler:
    """Stress-guided sampling over a table of token windows."""

    def __init__(self, windows, *, temperature: float = 1.0, coverage_bonus: float = 2.0, seed: int = 0):
        from somi_ray.data import to_record_batches, window_tokens

        if windows.num_rows == 0:
            raise ValueError("the corpus produced no token windows; use a longer corpus or a shorter --seq-len")
        self.batches = to_record_batches(windows, 4096)  # the corpus, as Arrow record batches
        self.tokens = window_tokens(windows)  # (N, T+1) int32 view for fast gathering
        n = len(self.tokens)
        self.stress = np.full(n, np.nan)
        self.visits = np.zeros(n, dtype=np.int64)
        self.temperature = float(temperature)
        self.coverage_bonus = float(coverage_bonus)
        self.rng = np.random.default_rng(seed)
        logger.info("StressSampler loaded %d windows of %d tokens", n, self.tokens.shape[1])

    @classmethod
    def from_corpus(cls, text_path: str, tokenizer_json: str, seq_len: int, **kwargs) -> "StressSampler":
        """Tokenise a text file with SOMI's tokenizer and cut it into windows of seq_len + 1 tokens."""
        from tokenizers import Tokenizer

        from somi_ray.data import build_windows, read_text, tokenize_text

        tokenizer = Tokenizer.from_str(tokenizer_json)
        document = tokenize_text(tokenizer, read_text(text_path), name=str(text_path))
        return cls(build_windows([document], seq_len), **kwargs)

    def __len__(self) -> int:
        return len(self.tokens)

    def probabilities(self) -> np.ndarray:
        """Sampling distribution over windows."""
        seen = ~np.isnan(self.stress)
        z = np.zeros(len(self.stress))
        if seen.sum() >= 2:
            values = self.stress[seen]
            z[seen] = (values - values.mean()) / (values.std() + 1e-8)
        z[~seen] = self.coverage_bonus
        logits = z / max(self.temperature, 1e-6)
        p = np.exp(logits - logits.max())
        return p / p.sum()

    def sample(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (window ids (B,), tokens (B, T+1) int64), drawn without replacement."""
        n = len(self.tokens)
        ids = self.rng.choice(n, size=min(batch_size, n), replace=False, p=self.probabilities())
        self.visits[ids] += 1
        return ids, self.tokens[ids].astype(np.int64)

    def report(self, window_ids, stress) -> None:
        """Store the stress the model measured on each window."""
        window_ids = np.asarray(window_ids, dtype=np.int64)
        stress = np.asarray(stress, dtype=np.float64)
        if window_ids.shape != stress.shape:
            raise ValueError(f"got {window_ids.shape} window ids but {stress.shape} stress values")
        finite = np.isfinite(stress)
        self.stress[window_ids[finite]] = stress[finite]

    def curriculum(self, count: int | None = None) -> np.ndarray:
        """Window ids ordered from least to most stressed; unseen windows last."""
        order = np.argsort(np.where(np.isnan(self.stress), np.inf, self.stress), kind="stable")
        return order[:count] if count else order

    def stats(self) -> dict:
        seen = ~np.isnan(self.stress)
        return {
            "windows": int(len(self.tokens)),
            "seen": int(seen.sum()),
            "coverage": float(seen.mean()),
            "mean_stress": float(np.nanmean(self.stress)) if seen.any() else None,
            "max_visits": int(self.visits.max()),
        }


def remote_stress_sampler(windows, **kwargs):
    import ray

    return ray.remote(StressSampler).options(num_cpus=0.25).remote(windows, **kwargs)
