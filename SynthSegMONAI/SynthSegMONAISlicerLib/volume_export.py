"""Volume node -> NIfTI file for the engine, keeping the geometry exactly.

The voxel array is written as it is (no resampling, no reorientation) with the node's
IJK-to-world matrix as the NIfTI affine (NIfTI and Slicer both use RAS), so left-handed and
oblique grids survive unchanged. A linear parent transform is applied to the affine; a
non-linear one is refused (harden it first).
"""

from __future__ import annotations

import os

import numpy as np
import vtk


class InputVolumeError(ValueError):
    """The selected node cannot be segmented; the message says why, for the user."""


def check_input_volume(volume_node) -> None:
    """Raise :class:`InputVolumeError` unless ``volume_node`` is a 3D single-component scalar volume."""
    if volume_node is None:
        raise InputVolumeError("No input volume selected: choose a brain MRI volume to segment.")
    if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputVolumeError(
            f"'{volume_node.GetName()}' is not a scalar volume ({volume_node.GetClassName()}): "
            "select a grey-scale brain MRI volume.")
    image = volume_node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise InputVolumeError(f"'{volume_node.GetName()}' has no image data.")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputVolumeError(
            f"'{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} components per "
            "voxel (a colour or vector volume): SynthSeg needs a single-component grey-scale "
            "volume. Convert it first (e.g. Vector to Scalar Volume module).")
    dims = image.GetDimensions()
    if min(dims) < 2:
        raise InputVolumeError(
            f"'{volume_node.GetName()}' is a 2D image ({dims[0]} x {dims[1]} x {dims[2]} voxels): "
            "SynthSeg segments 3D volumes.")
    transform = volume_node.GetParentTransformNode()
    if transform is not None and not transform.IsTransformToWorldLinear():
        raise InputVolumeError(
            f"'{volume_node.GetName()}' is under a non-linear transform: harden the transform "
            "first (Data module, right-click > Harden transform).")


def ijk_to_world(volume_node) -> np.ndarray:
    """4x4 matrix from voxel (i, j, k) to world RAS, parent linear transforms included."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    transform = volume_node.GetParentTransformNode()
    if transform is not None:
        to_world = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(to_world)
        vtk.vtkMatrix4x4.Multiply4x4(to_world, m, m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_array(volume_node) -> np.ndarray:
    """The voxel values indexed [i, j, k] (a copy)."""
    from vtk.util import numpy_support

    image = volume_node.GetImageData()
    dims = image.GetDimensions()
    flat = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return np.array(flat.reshape(dims[2], dims[1], dims[0]).transpose(2, 1, 0))


def export_volume(volume_node, path: str | os.PathLike) -> np.ndarray:
    """Write ``volume_node`` to ``path`` (.nii or .nii.gz); returns the affine written."""
    import nibabel as nib

    check_input_volume(volume_node)
    data = volume_array(volume_node)
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    elif data.dtype in (np.int64, np.uint64):
        data = data.astype(np.float32)
    affine = ijk_to_world(volume_node)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, os.fspath(path))
    return affine
