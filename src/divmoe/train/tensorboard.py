"""TensorBoard scalars beside ``metrics.jsonl`` (optional: ``pip install divmoe[tensorboard]``).

Each evaluation row becomes scalars in ``RUN/tensorboard/``: ``loss/train``, ``val_bpb/all``
and ``val_bpb/<domain>``, ``max_vio/layer<i>``, ``expert_load/layer<i>/expert<e>``,
``tokens_per_s``, ``lr``. A resumed run purges the events past its checkpoint step, so the
curves show what ``metrics.jsonl`` holds. Without the package nothing is written.
"""

from __future__ import annotations

from pathlib import Path


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class ScalarLog:
    """Writes one evaluation row at a time; opened on the first row."""

    def __init__(self, run_dir: Path, first_step: int):
        self.path, self.first_step = Path(run_dir) / "tensorboard", first_step
        self.writer = None

    def write(self, row: dict) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.path), purge_step=self.first_step)
        w, step = self.writer, row["step"]
        scalars = {"loss/train": row.get("train_loss"), "val_bpb/all": row.get("val_bpb"),
                   "tokens_per_s": row.get("tokens_per_s"), "lr": row.get("lr"),
                   "all_to_all_bytes_per_token": row.get("all_to_all_bytes_per_token")}
        for domain, bpb in (row.get("val_bpb_by_domain") or {}).items():
            scalars[f"val_bpb/{domain}"] = bpb
        for i, vio in enumerate(row.get("max_vio_by_layer") or []):
            scalars[f"max_vio/layer{i}"] = vio
        for i, load in enumerate(row.get("expert_load") or []):
            for e, share in enumerate(load):
                scalars[f"expert_load/layer{i}/expert{e}"] = share
        for tag, value in scalars.items():
            if value is not None:
                w.add_scalar(tag, value, step)
        w.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
