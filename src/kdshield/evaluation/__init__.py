"""ASR, CACC, FAR, FRR; tables."""

from kdshield.evaluation.metrics import asr, cacc, far_frr, markdown_table

__all__ = ["asr", "cacc", "far_frr", "markdown_table"]
