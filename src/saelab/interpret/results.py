"""What the pipeline finds for one latent, shared by the pipeline (which fills it) and the
report (which draws it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .sampling import LatentSamples


@dataclass
class LatentResult:
    samples: LatentSamples
    explanation: str | None = None
    completions: list[str | None] = field(default_factory=list)
    error: str = ""
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def latent(self) -> int:
        return self.samples.latent
