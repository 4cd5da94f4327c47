"""Transfer learning for nnU-Net v2: fine-tuning trainers, freezing, L2-SP and representation analysis."""

__version__ = "0.1.0"
