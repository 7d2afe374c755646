"""Exceptions the engine raises for bad input, with messages meant for users."""


class SynthSegError(Exception):
    """Base class: a problem with the user's input that the engine explains."""


class InputImageError(SynthSegError):
    """The input image cannot be segmented (missing, unreadable, wrong shape, bad values)."""


class ModelFileError(SynthSegError):
    """A model file is not a valid SynthSeg-MONAI model, or it has been altered."""


class OutputPathError(SynthSegError):
    """An output cannot be written where the user asked."""


class ResourceLimitError(SynthSegError):
    """A run would need more memory than is available, or exceeds a size limit of the engine."""


class OptionError(SynthSegError):
    """An option's value cannot be used (e.g. a zero or negative ``--crop``)."""
