"""The encoder failures, all `UserError`s: a user can fix each one (other weights, a file, a name), so the CLI
reports them as one line (exit 2) like every other."""

from wsi_pipeline.errors import UserError


class EncoderError(UserError):
    """Base of every encoder failure."""


class WeightsUnavailableError(EncoderError):
    """The requested weights cannot be obtained (offline, unreachable, gated, missing file)."""


class WeightsFormatError(EncoderError):
    """A weights file was found but does not fit the encoder (unreadable, truncated, another model's keys)."""
