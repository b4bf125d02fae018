"""The figures a report carries beside the task's own metric, where a run logs them: one registry line each.

Every column, table cell, headline phrase and plot panel of an extra is derived from its `Extra` here, so adding one
(a metrics.csv column some task logs) is one line. Column names (kept as earlier reports wrote them):
- per run (runs.csv): `value`, `baseline_<value>`, `<value>_delta` (run - its reference, seed by seed);
- per variant (report.csv): `value` and `<value>_std` over seeds, `<value>_delta` with `_std`, `_ci_low`,
  `_ci_high`, and `p_value_<key>` (paired t-test);
- per pair of settings (settings.csv): `<key>_a`, `<key>_b`, `<key>_diff`... (report/settings.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Extra:
    key: str  # short name in derived columns: p_value_<key>, <key>_a in settings.csv
    column: str  # the metrics.csv column the task logs (an eval_* metric)
    value: str  # the report's per-run column of it
    how: Literal["last", "min", "max"]  # which eval point: the final one, or the best
    name: str  # how tables and headlines name it
    scale: float = 1.0  # for display: 100 shows a fraction in %
    unit: str = ""  # of the value as displayed ("%")
    delta_unit: str = ""  # of a difference as displayed (" pp")
    fmt: str = ".4f"
    summary_key: str | None = None  # summary.json's copy, for folders whose metrics.csv lacks the column

    @property
    def label(self) -> str:
        return f"{'final' if self.how == 'last' else 'best'} {self.name}"

    @property
    def delta(self) -> str:
        return f"{self.value}_delta"


EXTRAS = (
    # language models: the loss in bits per byte, comparable across tokenizers
    Extra("bpb", "eval_bpb", "final_eval_bpb", "last", "bpb"),
    # classifiers
    Extra("top1", "eval_top1", "best_top1", "max", "top-1", 100.0, "%", " pp", ".2f", "best_eval_top1"),
    # masked LMs: the share of masked tokens predicted right
    Extra("acc", "eval_acc", "best_acc", "max", "masked-token acc.", 100.0, "%", " pp", ".2f"),
    # image tokenizers (the VQGAN): reconstruction quality
    Extra("psnr", "eval_psnr", "best_psnr", "max", "PSNR", 1.0, " dB", " dB", ".2f"),
)
