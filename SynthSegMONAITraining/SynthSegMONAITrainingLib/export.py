"""Export trained networks to the engine's model file (safetensors with metadata)."""

from __future__ import annotations

from pathlib import Path

import torch

from SynthSegMONAILib import ModelInfo, SynthSegUNet, save_model

from .config import Config


def export_model(path: str | Path, model: SynthSegUNet, cfg: Config, labels: list[int], provenance: dict,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write ``model`` with its labels, architecture and training provenance (tensors stored as ``dtype``)."""
    prov = {"origin": "synthseg-monai training", "config": cfg.to_dict(), **provenance}
    info = ModelInfo(network=model.config, labels=list(labels), name=cfg.training.name,
                     description=cfg.training.description,
                     synthseg_version=cfg.training.synthseg_version, provenance=prov)
    was_training = model.training
    model.eval()
    try:
        return save_model(path, model, info, dtype=dtype)
    finally:
        model.train(was_training)
