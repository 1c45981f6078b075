"""Serving on Triton Inference Server: model repositories from an export (``m4r triton``).

Modules:
  * :mod:`.repository` -- export directory -> checked, atomically written repository
  * :mod:`.config`     -- config.pbtxt as Triton's ModelConfig protobuf, schema-checked
  * :mod:`.readme`     -- the README.md written into each repository
  * :mod:`.local`      -- run the ``tritonserver`` bundled in the nvidia-pytriton wheel (tests, CPU hosts)
  * ``python_models/`` -- Python-backend models copied into repositories
"""

from __future__ import annotations

from .repository import BACKENDS, TritonOptions, write_repository

__all__ = ["BACKENDS", "TritonOptions", "write_repository"]
