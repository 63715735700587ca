"""The history of a training run, and how ``fit`` builds it: records that average the training
metrics between log points, evaluations, images/s, and a progress bar."""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import numpy as np

from fnlayers import _plot

__all__ = ["GRAD_NORM", "LOSS_SCALE", "SKIPPED_STEPS", "History", "Progress", "Recorder"]

#: The key of the per-layer gradient norms in a step's metrics (a dict ``{layer: norm}``); in
#: ``fit``'s history the records carry them flat, as ``"grad_norm/<layer>"``.
GRAD_NORM = "grad_norm"

#: A dynamic loss scale's metrics: the scale after the step, and 1 for a skipped step (else 0).
#: A record holds the scale after its last step and the number of steps skipped since the
#: record before, not their means.
LOSS_SCALE = "loss_scale"
SKIPPED_STEPS = "skipped_steps"
_LAST = (LOSS_SCALE,)
_SUMMED = (SKIPPED_STEPS,)


@dataclasses.dataclass
class History:
    """Per-iteration records of a run: a list of dicts with ``iteration``, ``epoch``, ``loss``,
    ``lr``, ``images_per_s``, the training metrics, ``test_*`` entries where an evaluation
    ran, and with a dynamic loss scale ``loss_scale`` (the current scale) and
    ``skipped_steps`` (steps skipped since the record before). ``save_json``/``save_csv``
    write it; :meth:`column` reads one quantity."""

    records: list[dict[str, float]] = dataclasses.field(default_factory=list)

    def column(self, name: str) -> tuple[list[int], list[float]]:
        """``(iterations, values)`` of the records that have ``name``."""
        rows = [r for r in self.records if name in r]
        return [int(r["iteration"]) for r in rows], [float(r[name]) for r in rows]

    def save_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.records, f, indent=1)

    def save_csv(self, path) -> None:
        names: list[str] = []
        for r in self.records:
            names += [k for k in r if k not in names]
        with open(path, "w") as f:
            f.write(",".join(names) + "\n")
            for r in self.records:
                f.write(",".join("" if k not in r else repr(r[k]) for k in names) + "\n")

    def plot(self, path, *, title: str = "") -> None:
        """Saves loss and accuracy curves as a PNG (needs matplotlib, the ``examples`` extra)."""
        plt = _plot.pyplot()

        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
        for name, ax in (("loss", ax_loss), ("test_loss", ax_loss)):
            it, v = self.column(name)
            if it:
                ax.plot(it, v, label=name, marker="o" if name.startswith("test") else None)
        for name in ("accuracy", "test_accuracy"):
            it, v = self.column(name)
            if it:
                ax_acc.plot(it, v, label=name, marker="o" if name.startswith("test") else None)
        ax_loss.set_xlabel("iteration")
        ax_loss.set_ylabel("loss")
        ax_loss.set_yscale("log")
        ax_acc.set_xlabel("iteration")
        ax_acc.set_ylabel("accuracy")
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.legend()
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)


class Recorder:
    """Builds the history: averages the training metrics between records, measures images/s
    (evaluation time excluded), adds evaluations, and updates the progress bar."""

    def __init__(self, history, steps_per_epoch, bar):
        self.history, self.steps_per_epoch, self.bar = history, steps_per_epoch, bar
        self.record = None
        self._reset_window()

    def add_step(self, iteration, out, images, norms):
        for name, value in out.items():
            self.window.setdefault(name, []).append(float(value))
        self.images += images
        if norms:
            self._current(iteration).update(
                {f"{GRAD_NORM}/{k}": float(v) for k, v in norms.items()}
            )

    def log(self, iteration):
        elapsed = time.perf_counter() - self.t_window
        record = self._current(iteration)
        record |= {k: _summary(k, v) for k, v in self.window.items()}
        record["images_per_s"] = self.images / max(elapsed, 1e-9)
        self._reset_window()

    def add_evaluation(self, iteration, result):
        self._current(iteration).update({f"test_{k}": v for k, v in result.items()})
        self.t_window = time.perf_counter()  # evaluation time is not training throughput

    def flush(self, iteration):
        if self.record is not None:
            self.history.records.append(self.record)
            self.bar.update(iteration, self.record)
            self.record = None

    def close(self):
        self.bar.close()

    def _current(self, iteration):
        if self.record is None:
            self.record = {"iteration": iteration}
            if self.steps_per_epoch:
                self.record["epoch"] = iteration / self.steps_per_epoch
        return self.record

    def _reset_window(self):
        self.window, self.images, self.t_window = {}, 0, time.perf_counter()


def _summary(name, values):
    """A record's value of a training metric over the steps of its window."""
    if name in _LAST:
        return float(values[-1])
    if name in _SUMMED:
        return int(np.sum(values))
    return float(np.mean(values))


class Progress:
    """tqdm when available, else one printed line per record."""

    def __init__(self, total, start, *, enabled):
        self.bar = None
        self.enabled = enabled
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True, leave=True)

    def update(self, it, record):
        if not self.enabled:
            return
        shown = {
            k: f"{record[k]:.4g}"
            for k in ("loss", "accuracy", "lr", LOSS_SCALE, "test_accuracy", "images_per_s")
            if k in record
        }
        if self.bar is not None:
            self.bar.n = it
            self.bar.set_postfix(shown, refresh=True)
        else:
            print(
                f"iteration {it}: " + " ".join(f"{k}={v}" for k, v in shown.items()),
                file=sys.stderr,
            )

    def close(self):
        if self.bar is not None:
            self.bar.close()
