"""`data.path=synthetic`: random token windows, no files, for performance work and benchmarks.

Window i of a split is `seq_len + 1` token ids drawn uniformly from [0, vocab) (the vocabulary of
data.tokenizer) by a generator seeded with (data.shuffle_seed, split, i): batches are a pure function of the
step, resume works as for any source, and nothing is read or tokenised, so step times measure the model.
"""
from __future__ import annotations

import numpy as np

SYNTHETIC = "synthetic"
N_WINDOWS = 1 << 40  # "endless": a split never runs out


def is_synthetic(path: str) -> bool:
    return path == SYNTHETIC


class SyntheticWindows:
    """grain source: element i = int32 [seq_len + 1] ids, a pure function of (seed, split, i)."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int, split: str):
        self._vocab, self.seq_len = int(vocab_size), int(seq_len)
        self._salt = (int(seed), 0 if split == "train" else 1)

    def __len__(self) -> int:
        return N_WINDOWS

    def __getitem__(self, i: int) -> np.ndarray:
        return self.read_many([i])[0]

    def read_many(self, indices) -> np.ndarray:
        out = np.empty((len(indices), self.seq_len + 1), np.int32)
        for r, i in enumerate(indices):
            out[r] = np.random.default_rng([*self._salt, int(i)]).integers(0, self._vocab, self.seq_len + 1,
                                                                            dtype=np.int32)
        return out

    @property
    def is_gcs(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"SyntheticWindows(vocab={self._vocab}, seq_len={self.seq_len}, salt={self._salt})"
