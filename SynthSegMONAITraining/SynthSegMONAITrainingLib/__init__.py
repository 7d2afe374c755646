"""Synthesis-based training of SynthSeg-MONAI networks (Cornucopia + MONAI + DDP)."""
