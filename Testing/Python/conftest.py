"""Shared test fixtures: reference data from ../shared and models made from it.

The tests are grouped by part: ``engine/``, ``slicer_module/`` (not ``slicer/``: a folder of
that name would join slicer-core's ``slicer`` namespace package) and ``training/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("SYNTHSEG_MONAI_SHARED", REPO.parent / "shared"))
KERAS_REF = SHARED / "reference" / "keras-synthseg"
#: the trained default model that ships in the repository
DEFAULT_MODEL = REPO / "Resources" / "Models" / "synthseg_monai_default.safetensors"

# the Slicer-side packages live beside the engine in the module folders
for folder in (REPO / "SynthSegMONAI", REPO / "SynthSegMONAITraining"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def keras_ref() -> Path:
    if not KERAS_REF.is_dir():
        pytest.fail(f"reference fixtures not found at {KERAS_REF} (set SYNTHSEG_MONAI_SHARED)")
    return KERAS_REF


@pytest.fixture(scope="session")
def imported_models(keras_ref, tmp_path_factory) -> dict[str, Path]:
    """The random-weight reference Keras files converted to model files: {'2.0': path, '1.0': path}."""
    from SynthSegMONAILib.keras_import import import_keras

    out = tmp_path_factory.mktemp("models")
    return {v: import_keras(keras_ref / f"synthseg_{v}_random.h5", out / f"synthseg_{v}.safetensors")
            for v in ("2.0", "1.0")}


def random_unet(cfg, seed: int = 0):
    """A random :class:`SynthSegUNet` in eval mode whose BatchNorms have non-trivial statistics."""
    import torch

    from SynthSegMONAILib.network import SynthSegUNet

    torch.manual_seed(seed)
    model = SynthSegUNet(cfg).eval()
    with torch.no_grad():
        for level in [*model.encoder, *model.decoder]:
            level.bn.running_mean.uniform_(-0.2, 0.2)
            level.bn.running_var.uniform_(0.5, 1.5)
            level.bn.weight.uniform_(0.5, 1.5)
            level.bn.bias.uniform_(-0.2, 0.2)
    return model


def make_tiny_model(path: Path, min_pad: int = 32, background_bias: float = 0.0) -> Path:
    """A random 2-level, 4-feature SynthSeg 2.0 model (quick to run; its output means nothing).

    ``min_pad`` 32 instead of SynthSeg's 128 keeps command-line tests quick; a large
    ``background_bias`` makes every voxel background.
    """
    import torch

    from SynthSegMONAILib.labels import synthseg_labels
    from SynthSegMONAILib.model_file import DEFAULT_PREPROCESSING, ModelInfo, save_model
    from SynthSegMONAILib.network import SynthSegUNet, UNetConfig

    labels = synthseg_labels("2.0")
    torch.manual_seed(0)
    cfg = UNetConfig(out_channels=len(labels), levels=2, features=4)
    net = SynthSegUNet(cfg)
    if background_bias:
        with torch.no_grad():
            head = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)][-1]
            head.bias[0] += background_bias
    pre = dict(DEFAULT_PREPROCESSING, min_pad=min_pad)
    return save_model(path, net, ModelInfo(network=cfg, labels=labels, name=path.stem, preprocessing=pre))
