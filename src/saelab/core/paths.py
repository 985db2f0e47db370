"""The file contract between stages (DESIGN §3), relative to the repository root."""
from pathlib import Path

MODEL_DIR = Path("models/base")
MODEL_JSON = Path("models/base.json")
CORPUS_DIR = Path("data/corpus")
ACTIVATIONS_DIR = Path("data/activations")
SCALING_DIR = Path("reports/scaling")
FIT_JSON = SCALING_DIR / "fit.json"
BUDGET_JSON = Path("reports/budget.json")
BUDGET_MD = Path("reports/budget.md")
SAE_DIR = Path("models/sae")
TRAIN_DIR = Path("reports/train")
TRAIN_METRICS = TRAIN_DIR / "metrics.json"
INTERPRET_DIR = Path("reports/interpret")
INTERPRET_METRICS = Path("reports/interpret_metrics.json")
# The numeric views of the reports above: the DVC metrics files (core.metrics).
METRICS_DIR = Path("reports/metrics")
# The GPU suite's record (bench/gpu.py): measured rates `saelab budget` shows.
GPU_RESULTS = Path("bench/results.json")
# Resume state lives outside DVC outputs: DVC deletes a stage's outs before rerunning it.
STATE_DIR = Path(".saelab")
CHECKPOINT_DIR = STATE_DIR / "checkpoints"
