"""User-facing errors: each carries one actionable line, printed by the CLI without a traceback."""


class DiffusionGemmaError(Exception):
    """Base class of every error this package reports to users as a single line."""


class CheckpointError(DiffusionGemmaError):
    """A checkpoint folder, repo id or its files cannot be used (missing, corrupt, mismatched)."""


class DrafterConfigError(DiffusionGemmaError):
    """A drafter config file or preset is missing or invalid."""


class UsageError(DiffusionGemmaError):
    """A command-line value is invalid (bad JSON, an option that needs another)."""


class ContextLengthError(DiffusionGemmaError):
    """The prompt and the canvases asked for do not fit in the model's context."""


class ChatTemplateError(CheckpointError):
    """A checkpoint's chat template is missing, fails to render, or breaks the template sandbox."""


class ConversionOptionError(DiffusionGemmaError, ValueError):
    """An invalid combination of conversion options (dtype, bits, group size, mode, recipe)."""
