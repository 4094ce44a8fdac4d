"""The on-device runtime: numpy + one backend, nothing else."""

from __future__ import annotations
