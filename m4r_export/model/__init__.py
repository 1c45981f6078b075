"""Mamba4Rec and its Mamba block (reference parameter names) plus the selective-scan backends."""

from .mamba import Mamba
from .mamba4rec import FeedForward, Mamba4Rec, Mamba4RecConfig, MambaLayer
from .scan import register_scan_backend, scan_backends, selective_scan, selective_scan_ref

__all__ = [
    "FeedForward",
    "Mamba",
    "Mamba4Rec",
    "Mamba4RecConfig",
    "MambaLayer",
    "register_scan_backend",
    "scan_backends",
    "selective_scan",
    "selective_scan_ref",
]
