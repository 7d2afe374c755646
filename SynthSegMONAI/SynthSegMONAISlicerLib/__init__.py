"""Qt-free logic of the SynthSegMONAI Slicer module.

Everything here imports only ``slicer`` (MRML classes), ``vtk``, ``numpy`` and the engine's
public Python API, so it runs in Slicer's Python console, in other modules, and under the
``slicer-core`` wheel in tests. The Qt widget in ``SynthSegMONAI.py`` stays thin.
"""
