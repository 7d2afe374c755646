"""The oldest Slicer the extension runs on, and a clear refusal on older ones.

Slicer 5.10 brought Python 3.12 (the packages need >= 3.10) and ``vtkSegment::SetTerminology``.
This file is imported before anything else of the module, so it keeps to Python 3.9 syntax:
on an older Slicer the user gets this message instead of a syntax or attribute error.
"""

from __future__ import annotations

import logging

try:
    from slicer.i18n import tr as _
except ImportError:  # slicer-core, plain Python or Slicer < 5.4: no translations
    def _(text):
        return text

MINIMUM_SLICER_VERSION = (5, 10)


def running_version(app) -> tuple | None:
    """(major, minor) of the Slicer application ``app``; None outside the application."""
    try:
        return int(app.majorVersion), int(app.minorVersion)
    except (AttributeError, TypeError, ValueError):
        return None


def too_old_message(app, module_title: str = "SynthSeg MONAI") -> str:
    """'' when ``app`` is recent enough (or is not the Slicer application), else a message."""
    version = running_version(app)
    if version is None or tuple(version) >= MINIMUM_SLICER_VERSION:
        return ""
    return _("{module} needs 3D Slicer {minimum} or later; this is Slicer {version}. Install a current "
             "Slicer from https://download.slicer.org.").format(
                 module=module_title, minimum=".".join(map(str, MINIMUM_SLICER_VERSION)),
                 version=".".join(map(str, version)))


def refuse_old_slicer(slicer_module, module_title: str = "SynthSeg MONAI") -> None:
    """Raise ImportError with a clear message on a Slicer older than the minimum.

    The message is logged, and shown in a dialog once the application has started, because
    a module that fails to load is otherwise only reported in the error log.
    """
    app = getattr(slicer_module, "app", None)
    message = too_old_message(app, module_title)
    if not message:
        return
    logging.error(message)
    try:
        app.connect("startupCompleted()", lambda: slicer_module.util.errorDisplay(message))
    except AttributeError:
        pass
    raise ImportError(message)
