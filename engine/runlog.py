"""A run's metrics log (``<run_dir>/metrics.jsonl``) and its plot (``metrics.png``).

One JSON row per logged step (``"kind": "train"``) and per evaluation (``"eval"``). Under torchrun
only rank 0 writes (``main=False`` on the other ranks makes every method a no-op). On resume the
rows logged after the checkpoint are dropped, so the log reads like one uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ember import EmberError


def format_scores(scores: dict) -> str:
    if not scores:
        return ("nothing evaluated (no validation or test data: set data.validation, "
                "data.val_fraction or data.test)")
    out = []
    for k, v in scores.items():
        # Fractions (task metrics, DPO's reward accuracy) as percentages; losses, perplexity and
        # DPO rewards / margins (log-ratios, any sign) as numbers. Per-source names end "/<file>".
        name = k.split("/")[0].removeprefix("val_")
        if name.endswith(("accuracy", "accuracy_norm", "exact_match", "f1", "json_match")):
            out.append(f"{k} {100 * v:.1f}%")
        elif name == "perplexity":
            out.append(f"{k} {v:.3f}")
        else:
            out.append(f"{k} {v:.4f}")
    return ", ".join(out)


class MetricsLog:
    """``tensorboard=True`` mirrors every number to TensorBoard event files in
    ``<run_dir>/tensorboard`` (tags ``train/loss``, ``eval/val_loss`` ...; needs the
    ``tensorboard`` package), with the same resume rule as the JSON log."""

    def __init__(self, run_dir: Path, *, main: bool = True, tensorboard: bool = False):
        self.run_dir, self.path, self.main = run_dir, run_dir / "metrics.jsonl", main
        self.tensorboard, self._tb = tensorboard and main, None
        if self.tensorboard:
            try:
                import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
            except ImportError:
                raise EmberError("tensorboard = true needs the tensorboard package: pip install "
                                 "tensorboard (or set tensorboard = false)") from None

    def write(self, row: dict) -> None:
        if self.main:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("kind", "step") and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{row['kind']}/{k}", v, row["step"])
            self._tb.flush()

    def start(self, step: int, *, drop_stop_row: bool = False) -> None:
        """A fresh run (``step`` 0) starts an empty log; a resumed one keeps rows up to ``step``
        (TensorBoard: events after ``step`` are purged). ``drop_stop_row``: the train row at
        ``step`` is a stop's, written between two ``log_every`` rows (the mean of its window so
        far, which the checkpoint still holds): dropped too, as the resumed run logs that
        window's row where the uninterrupted run does."""
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = self.run_dir / "tensorboard"
            if step == 0 and tb_dir.exists():
                shutil.rmtree(tb_dir)
            purge = step + (not drop_stop_row)  # (a stop row's step has no other events)
            self._tb = SummaryWriter(str(tb_dir), purge_step=purge if step else None)
        if not self.main or not self.path.exists():
            return
        if step == 0:
            self.path.unlink()
            return
        keep = [json.dumps(r) for r in self.rows() if r["step"] < step or (
            r["step"] == step and not (drop_stop_row and r["kind"] == "train"))]
        self.path.write_text("".join(r + "\n" for r in keep))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def last_eval(self, step: int) -> dict | None:
        """The scores of the evaluation logged at ``step`` (None: none; or not the main rank)."""
        if not self.main or not self.path.exists():
            return None
        found = [r for r in self.rows() if r.get("kind") == "eval" and r.get("step") == step]
        return {k: v for k, v in found[-1].items() if k not in ("kind", "step")} if found else None

    def rows(self) -> list[dict]:
        """The logged rows; a line torn by a kill in the middle of a write is left out."""
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def plot(self, echo) -> None:
        """Loss and metric curves to ``metrics.png`` (needs matplotlib)."""
        if not self.main:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            echo("note: matplotlib is not installed, skipped metrics.png "
                 "(pip install matplotlib)")
            return
        rows = self.rows()
        train = [r for r in rows if r["kind"] == "train"]
        evals = [r for r in rows if r["kind"] == "eval"]
        names = [k for k in (evals[-1] if evals else {}) if k not in ("kind", "step")]
        fig, axes = plt.subplots(1, 1 + bool(names), figsize=(6 + 5 * bool(names), 4))
        axes = axes if names else [axes]
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        val = [r for r in evals if "val_loss" in r]
        if val:
            axes[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-",
                         label="validation loss")
        axes[0].set_xlabel("step")
        axes[0].set_yscale("log")
        axes[0].legend()
        for name in names:
            if name.startswith("val_loss/"):  # per-source validation loss (data.validation)
                axes[0].plot([r["step"] for r in evals if name in r],
                             [r[name] for r in evals if name in r], "o--", label=name)
                axes[0].legend()
                continue
            if name in ("val_loss", "perplexity"):
                continue
            pts = [r for r in evals if name in r]
            axes[1].plot([r["step"] for r in pts], [r[name] for r in pts], "o-", label=name)
        if names:
            axes[1].set_xlabel("step")
            if axes[1].lines:  # (only val_loss / perplexity: they are on the left plot)
                axes[1].legend()
        fig.tight_layout()
        fig.savefig(self.run_dir / "metrics.png", dpi=100)
        plt.close(fig)
