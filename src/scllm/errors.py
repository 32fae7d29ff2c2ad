"""The project's error types. A refusal says what is wrong, where, and the fix that works.

Every entry point (the rule scripts through ``setup_logging``'s hook, ``scllm``, ``python -m
scllm.train``) prints these as one paragraph, never as a traceback. They subclass ValueError so
callers that caught ValueError before still do.
"""


class ScllmError(Exception):
    """Base of the errors this project raises on purpose."""


class InputError(ScllmError, ValueError):
    """Input data or settings the pipeline cannot use as they are."""


class CorruptArtifactError(InputError):
    """A file the pipeline wrote (or expects it wrote) failed the check where it is read."""


class UnsafeFileError(CorruptArtifactError):
    """A file that is not one of this project's and must not be loaded.

    E.g. a pickle that holds code.
    """


class DiskFullError(ScllmError, OSError):
    """A file could not be written for want of space (the earlier file at its name is kept)."""


class UnsafeOutputError(InputError):
    """An output path where writing would delete or replace what the command did not write.

    Its own earlier output counts too, unless it was asked to replace it.
    """


class OutputBusyError(ScllmError):
    """Another process is writing the same output now."""


# What entry points print as a message: the project's own errors, and the standard types its
# code raises for input and configuration problems. Anything else is a bug: full traceback.
REFUSALS = (ScllmError, ValueError, RuntimeError, FileNotFoundError)
