"""SynthSeg-MONAI engine: SynthSeg brain MRI segmentation in PyTorch, free of Slicer and Qt."""

__version__ = "0.1.0"
