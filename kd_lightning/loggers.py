"""A CSV logger that keeps a run's metrics when the run is resumed."""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        """Keep an earlier ``metrics.csv`` in the directory (Lightning's writer deletes it):
        its header becomes the known columns and new rows go below the old ones."""
        self.replaces_from_first_step = self._fs.isfile(self.metrics_file_path)
        if self.replaces_from_first_step:
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])

    def save(self) -> None:
        """On the first save, drop the earlier rows from the first step this run logs on:
        a run resumed from step s logs steps ≥ s again, and one started afresh, all of them."""
        if self.replaces_from_first_step and self.metrics:
            first_step = min(row["step"] for row in self.metrics)
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                kept = [row for row in csv.DictReader(file) if int(float(row["step"])) < first_step]
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
            self.replaces_from_first_step = False
        super().save()


class ResumableCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger``, except that a run resumed in its own directory
    (``ckpt_path=last``) continues its ``metrics.csv`` instead of starting it again: the
    rows up to the checkpoint stay, those a killed attempt logged after it are replaced."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
