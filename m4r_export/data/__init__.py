"""Interaction data: readers, MovieLens download, synthetic generator and the RecBole protocol.

See ``docs/data.md``. The trainer needs only :func:`load_dataset` (or :func:`build_dataset`) and
the :class:`SequenceDataset` / :class:`Split` containers; serving code uses
:func:`encode_histories` / :func:`pad_sequences`.
"""

from __future__ import annotations

from .download import MOVIELENS, convert_archive, default_cache_dir, download_movielens
from .protocol import (
    PAD_TOKEN,
    SequenceDataset,
    Split,
    build_dataset,
    encode_histories,
    load_dataset,
    pad_sequences,
)
from .readers import Interactions, detect_format, read_interactions
from .synthetic import synthetic_interactions, write_inter_file

__all__ = [
    "MOVIELENS",
    "PAD_TOKEN",
    "Interactions",
    "SequenceDataset",
    "Split",
    "build_dataset",
    "convert_archive",
    "default_cache_dir",
    "detect_format",
    "download_movielens",
    "encode_histories",
    "load_dataset",
    "pad_sequences",
    "read_interactions",
    "synthetic_interactions",
    "write_inter_file",
]
