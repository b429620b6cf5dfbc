"""Hydra configs of kd_lightning (conf/ in the source tree), importable as kd_lightning.conf."""
