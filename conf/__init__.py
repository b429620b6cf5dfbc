"""Hydra configs of kd_lightning (conf/ in the source tree), importable as kd_lightning.conf.

Importing it registers the resolvers the configs use, so every command and test that
composes them (through Hydra's ``pkg://kd_lightning.conf``) has them."""

from kd_lightning.sweep_dirs import register_resolvers

register_resolvers()
