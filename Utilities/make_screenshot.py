"""Make the extension's screenshot: slices of a scan with its segmentation, and a 3D view.

    python Utilities/make_screenshot.py --image Testing/Data/sample_t1_colin27.nii.gz \\
        --seg seg.nii.gz --output Screenshots/SynthSegMONAI.png \\
        [--thumbnail SynthSegMONAI/Resources/Icons/SynthSegMONAISampleColin27.png]
    python Utilities/make_screenshot.py --image scan.nii.gz --model MODEL.safetensors --output shot.png

With ``--model`` the scan is segmented first by the engine's command line (``--fast``).

The picture is laid out like Slicer's four-up view: axial (red), 3D and sagittal (yellow),
coronal (green) panels. The slices show the scan's own voxels (radiological convention, as
Slicer shows them) with the segmentation in FreeSurfer colours, filled at half opacity and
outlined; the 3D view is rendered offscreen with VTK from the segmentation's surfaces, the
left hemisphere's cortex and white matter left out so that the deep structures show. The PNG
is written with a 256-colour palette to stay small. ``--thumbnail`` also writes the 260x280
Sample Data thumbnail of the scan alone.

Needs the engine installed (``pip install -e .``), and vtk and Pillow (``pip install vtk pillow``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HIDDEN_IN_3D = (2, 3, 24)  # left cerebral white matter and cortex, CSF
SLICE_COLOURS = {"axial": (242, 77, 77), "sagittal": (237, 213, 76), "coronal": (110, 176, 75)}
BACKGROUND_3D = ((0.76, 0.76, 0.87), (1.0, 1.0, 1.0))  # Slicer's 3D view gradient, bottom and top


def label_colours() -> dict[int, tuple[int, int, int]]:
    """FreeSurfer colour of each label of the engine's label table."""
    from SynthSegMONAILib import all_structures

    return {s.label: tuple(int(c) for c in s.color) for s in all_structures()}


def segment(image: Path, model: Path, output: Path) -> Path:
    """Segment ``image`` with the engine's command line (fast mode); returns the label map."""
    subprocess.run([sys.executable, "-m", "SynthSegMONAILib.cli", "--i", str(image), "--o", str(output),
                    "--model", str(model), "--fast"], check=True)
    return output


def load_pair(image_path: Path, seg_path: Path):
    """Scan and labels as RAS-ordered arrays on the scan's grid, and the voxel size (mm)."""
    import nibabel as nib
    from scipy import ndimage

    image = nib.as_closest_canonical(nib.load(str(image_path)))
    seg = nib.as_closest_canonical(nib.load(str(seg_path)))
    data = np.asarray(image.dataobj, dtype=np.float32)
    labels = np.rint(np.asarray(seg.dataobj)).astype(np.int16)
    data = data[..., 0] if data.ndim == 4 else data
    labels = labels[..., 0] if labels.ndim == 4 else labels
    if labels.shape != data.shape or not np.allclose(seg.affine, image.affine, atol=1e-3):
        # Labels on another grid (e.g. SynthSeg's 1 mm one): nearest neighbour onto the scan's.
        to_seg = np.linalg.inv(seg.affine) @ image.affine
        labels = ndimage.affine_transform(labels, to_seg[:3, :3], to_seg[:3, 3], output_shape=data.shape,
                                          order=0, mode="constant", cval=0)
    return data, labels, np.asarray(image.header.get_zooms()[:3], float), image.affine


def grey(data: np.ndarray) -> np.ndarray:
    """Scan intensities mapped to 0..1 (window from the 0.5 and 99.5 percentiles of the head)."""
    inside = data[data > np.percentile(data, 20)]
    lo, hi = np.percentile(inside if inside.size else data, (0.5, 99.5))
    return np.clip((data - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def slice_positions(labels: np.ndarray) -> dict[str, int]:
    """Slices through the deep structures: thalamus/putamen (axial), hippocampi (coronal, sagittal)."""
    def centre(values) -> np.ndarray:
        idx = np.argwhere(np.isin(labels, values))
        return idx.mean(axis=0) if len(idx) else np.asarray(labels.shape) / 2.0

    deep, hippocampus = centre([10, 49, 12, 51]), centre([17, 53])
    left_hippocampus = centre([17])
    return {"axial": int(round(deep[2])), "coronal": int(round(hippocampus[1])),
            "sagittal": int(round(left_hippocampus[0]))}


def slice_arrays(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """2D array as shown on screen (rows top to bottom), radiological convention like Slicer."""
    if view == "axial":  # screen right = patient left, up = anterior
        plane = volume[:, :, index]
        return plane[::-1, ::-1].T
    if view == "coronal":  # screen right = patient left, up = superior
        plane = volume[:, index, :]
        return plane[::-1, ::-1].T
    plane = volume[index, :, :]  # sagittal: screen right = posterior, up = superior
    return plane[::-1, ::-1].T


def overlay_panel(grey_2d: np.ndarray, labels_2d: np.ndarray, spacing: tuple[float, float], size: int,
                  colours: dict[int, tuple[int, int, int]], opacity: float = 0.5) -> np.ndarray:
    """RGB panel ``size`` x ``size``: the slice scaled to fit, segments filled and outlined."""
    from PIL import Image

    height_mm, width_mm = grey_2d.shape[0] * spacing[0], grey_2d.shape[1] * spacing[1]
    scale = size / max(height_mm, width_mm)
    h, w = max(1, int(round(height_mm * scale))), max(1, int(round(width_mm * scale)))
    g = np.asarray(Image.fromarray((grey_2d * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
    lab = np.asarray(Image.fromarray(labels_2d.astype(np.int32)).resize((w, h), Image.NEAREST))
    rgb = np.repeat(g[..., None], 3, axis=2)
    table = np.full((max(max(colours), int(lab.max())) + 1, 3), 128.0, np.float32)  # grey: unknown label
    for value, colour in colours.items():
        table[value] = colour
    fill = lab > 0
    rgb[fill] = (1 - opacity) * rgb[fill] + opacity * table[lab[fill]]
    edge = np.zeros_like(fill)
    for axis in (0, 1):
        for shift in (1, -1):
            edge |= (lab != np.roll(lab, shift, axis=axis)) & fill
    rgb[edge] = table[lab[edge]]
    panel = np.zeros((size, size, 3), np.float32)
    top, left = (size - h) // 2, (size - w) // 2
    panel[top:top + h, left:left + w] = rgb
    return np.clip(panel, 0, 255).astype(np.uint8)


def render_3d(labels: np.ndarray, affine: np.ndarray, size: int,
              colours: dict[int, tuple[int, int, int]]) -> np.ndarray:
    """Surfaces of the segments (smoothed), rendered offscreen with VTK; RGB array."""
    import vtk
    from vtk.util import numpy_support

    shown = [int(v) for v in np.unique(labels) if v and v not in HIDDEN_IN_3D]
    image = vtk.vtkImageData()
    image.SetDimensions(*labels.shape)
    image.SetSpacing(*np.linalg.norm(affine[:3, :3], axis=0))
    image.SetOrigin(*affine[:3, 3])
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(labels.transpose(2, 1, 0)).ravel(), deep=True,
                                         array_type=vtk.VTK_SHORT)
    image.GetPointData().SetScalars(scalars)

    surfaces = vtk.vtkDiscreteFlyingEdges3D()
    surfaces.SetInputData(image)
    for i, value in enumerate(shown):
        surfaces.SetValue(i, value)
    smoother = vtk.vtkWindowedSincPolyDataFilter()
    smoother.SetInputConnection(surfaces.GetOutputPort())
    smoother.SetNumberOfIterations(20)
    smoother.SetPassBand(0.05)
    smoother.NonManifoldSmoothingOn()
    smoother.NormalizeCoordinatesOn()
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputConnection(smoother.GetOutputPort())
    normals.SetFeatureAngle(100)

    lut = vtk.vtkLookupTable()
    lut.SetNumberOfTableValues(max(shown) + 1)
    lut.SetTableRange(0, max(shown))
    lut.Build()
    for value in range(max(shown) + 1):
        r, g, b = colours.get(value, (128, 128, 128))
        lut.SetTableValue(value, r / 255, g / 255, b / 255, 1.0)
    mapper = vtk.vtkPolyDataMapper()
    mapper.SetInputConnection(normals.GetOutputPort())
    mapper.SetLookupTable(lut)
    mapper.SetScalarRange(0, max(shown))
    mapper.SetScalarModeToUsePointData()
    actor = vtk.vtkActor()
    actor.SetMapper(mapper)
    actor.GetProperty().SetSpecular(0.2)
    actor.GetProperty().SetSpecularPower(20)

    renderer = vtk.vtkRenderer()
    renderer.AddActor(actor)
    renderer.GradientBackgroundOn()
    renderer.SetBackground(*BACKGROUND_3D[0])
    renderer.SetBackground2(*BACKGROUND_3D[1])
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetMultiSamples(8)
    window.AddRenderer(renderer)
    window.SetSize(size, size)
    # From the patient's left, a little in front and above, so that the structures behind the
    # removed left cortex show.
    bounds = np.asarray(actor.GetBounds()).reshape(3, 2)
    centre = bounds.mean(axis=1)
    camera = renderer.GetActiveCamera()
    camera.SetFocalPoint(*centre)
    camera.SetPosition(*(centre + np.array([-1.0, 0.55, 0.45]) * 600))
    camera.SetViewUp(0, 0, 1)
    renderer.ResetCamera()
    camera.Zoom(1.35)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    out = grab.GetOutput()
    width, height, _ = out.GetDimensions()
    rgb = numpy_support.vtk_to_numpy(out.GetPointData().GetScalars()).reshape(height, width, 3)
    window.Finalize()
    return rgb[::-1].copy()


def label_panel(panel: np.ndarray, text: str, colour: tuple[int, int, int] | None) -> np.ndarray:
    """Slicer-like view bar with ``text`` on top of ``panel``."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(panel)
    draw = ImageDraw.Draw(img)
    bar = 26
    draw.rectangle([0, 0, img.width, bar], fill=colour or (74, 85, 110))
    font = ImageFont.load_default(size=17)
    draw.text((8, 4), text, fill=(0, 0, 0) if colour else (255, 255, 255), font=font)
    return np.asarray(img)


def compose(image_path: Path, seg_path: Path, panel: int = 600) -> np.ndarray:
    """The four-up picture as an RGB array (2 x ``panel`` pixels square)."""
    data, labels, zooms, affine = load_pair(image_path, seg_path)
    colours = label_colours()
    g = grey(data)
    # Crop to the head (with a margin), so that it fills the slice panels.
    inside = np.argwhere((labels > 0) | (g > 0.05))
    lo = np.maximum(inside.min(axis=0) - 6, 0)
    hi = np.minimum(inside.max(axis=0) + 7, labels.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    g, cropped = g[box], labels[box]
    where = slice_positions(cropped)
    spacing = {"axial": (zooms[1], zooms[0]), "coronal": (zooms[2], zooms[0]), "sagittal": (zooms[2], zooms[1])}
    panels = {}
    for view, index in where.items():
        p = overlay_panel(slice_arrays(g, view, index), slice_arrays(cropped, view, index), spacing[view], panel,
                          colours)
        panels[view] = label_panel(p, view.capitalize(), SLICE_COLOURS[view])
    panels["3d"] = label_panel(render_3d(labels, affine, panel, colours), "3D", None)
    top = np.concatenate([panels["axial"], panels["3d"]], axis=1)
    bottom = np.concatenate([panels["sagittal"], panels["coronal"]], axis=1)
    picture = np.concatenate([top, bottom], axis=0)
    picture[panel - 1:panel + 1, :] = 40  # thin separators, as between Slicer's views
    picture[:, panel - 1:panel + 1] = 40
    return picture


def save_png(rgb: np.ndarray, path: Path, colours: int = 256) -> Path:
    """Write ``rgb`` as a palette PNG (small, and visually the same for this kind of picture)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).quantize(colors=colours, method=Image.Quantize.MEDIANCUT,
                                  dither=Image.Dither.NONE).save(path, optimize=True)
    return path


def thumbnail(image_path: Path, path: Path, size: tuple[int, int] = (260, 280)) -> Path:
    """Sample Data thumbnail: an axial slice of the scan, on black."""
    import nibabel as nib
    from PIL import Image

    img = nib.as_closest_canonical(nib.load(str(image_path)))
    data = grey(np.asarray(img.dataobj, np.float32))
    zooms = img.header.get_zooms()[:3]
    plane = slice_arrays(data, "axial", int(data.shape[2] * 0.55))
    scale = min(size[0] / (plane.shape[1] * zooms[0]), size[1] / (plane.shape[0] * zooms[1]))
    w, h = int(plane.shape[1] * zooms[0] * scale), int(plane.shape[0] * zooms[1] * scale)
    scaled = Image.fromarray((plane * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    canvas = Image.new("L", size, 0)
    canvas.paste(scaled, ((size[0] - w) // 2, (size[1] - h) // 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", type=Path, required=True, help="the scan (NIfTI)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--seg", type=Path, help="its segmentation (label map, NIfTI)")
    source.add_argument("--model", type=Path, help="segment the scan with this model first")
    p.add_argument("--output", type=Path, required=True, help="PNG to write")
    p.add_argument("--panel", type=int, default=600, help="size of one view in pixels (default 600)")
    p.add_argument("--thumbnail", type=Path, help="also write the Sample Data thumbnail of the scan here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        seg = args.seg or segment(args.image, args.model, Path(folder) / "seg.nii.gz")
        out = save_png(compose(args.image, seg, args.panel), args.output)
    print(f"{out}: {out.stat().st_size / 1024:.0f} KB")
    if args.thumbnail:
        print(thumbnail(args.image, args.thumbnail))
    return 0


if __name__ == "__main__":
    sys.exit(main())
