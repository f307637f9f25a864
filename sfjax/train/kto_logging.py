"""What a KTO run shows while it trains: TensorBoard events and the progress bar.

:class:`sfjax.train.kto.KTOTrainer` writes every logged step's metrics under TRL's tag names
(``train/loss``, ``train/rewards/chosen`` …) to the writer :func:`open_writer` returns, and
shows :func:`progress_postfix` on its :func:`sfjax.console.progress_bar`, both on process 0 only.
"""

from __future__ import annotations

import numpy as np


def open_writer(writer):
    """``(writer, owned)``: a ``SummaryWriter`` (or None) as given, or one opened on a log
    directory, which the caller then owns and closes; None off process 0."""
    if writer is None or hasattr(writer, "add_scalar"):
        return writer, False
    from sfjax.parallel.multihost import summary_writer

    # multi-host: only process 0 writes events; the pid in the file name keeps a restart
    # within the same second from truncating the last run's file
    opened = summary_writer(writer)
    return opened, opened is not None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


class RunningRewards:
    """Sums of ``β·r`` per class over the logged steps of one ``train()`` call.

    A logged step's ``rewards/margins`` needs both classes in its own micro-batches, which a
    small or unbalanced batch often lacks; the progress bar shows the margin of the running
    class means instead, defined as soon as each class has been seen once.
    """

    def __init__(self):
        self.sums = {"chosen": 0.0, "rejected": 0.0}
        self.counts = {"chosen": 0.0, "rejected": 0.0}

    def add(self, window: list[dict[str, np.ndarray]], live: np.ndarray) -> None:
        for cls in self.sums:
            means = np.concatenate([w[f"rewards/{cls}"] for w in window])[live]
            counts = np.concatenate([w[f"count/{cls}"] for w in window])[live]
            seen = counts > 0
            self.sums[cls] += float(np.sum(means[seen] * counts[seen]))
            self.counts[cls] += float(np.sum(counts[seen]))

    def mean(self, cls: str) -> float:
        return self.sums[cls] / self.counts[cls] if self.counts[cls] else float("nan")

    def margin(self) -> str:
        if not self.counts["chosen"] or not self.counts["rejected"]:
            missing = "undesirable" if self.counts["chosen"] else "desirable"
            return f"n/a (no {missing} example yet)"
        return f"{self.mean('chosen') - self.mean('rejected'):.3f}"


def progress_postfix(entry: dict[str, float], running: RunningRewards) -> dict[str, str]:
    """The KTO bar's fields: loss of the last logged step, the running reward margin
    (desirable minus undesirable mean of ``β·r`` so far), ``kl`` (z, clamped at 0 as the
    loss uses it) and ``kl_raw`` (the estimate before the clamp; negative means the policy
    sits below the reference on the mismatched pairs)."""
    return {
        "loss": _fmt(entry.get("loss")),
        "margin": running.margin(),
        "kl": _fmt(entry.get("kl")),
        "kl_raw": _fmt(entry.get("kl_unclamped")),
    }
