"""The exceptions of dact_lib. Every message names the problem *and* the fix."""
from __future__ import annotations


class DactLabError(Exception):
    """Base class of every error dact_lib raises on purpose."""


class DataError(DactLabError, ValueError):
    """Bad input data (a CSV that cannot be used as it is). The message says what is wrong and how to fix it."""


class ConfigError(DactLabError, ValueError):
    """An invalid configuration value. The message names the field, the bad value and what is allowed."""


class EncoderError(DactLabError, ValueError):
    """An encoder that cannot be loaded or whose architecture dact_lib does not know."""


class Cancelled(DactLabError):
    """Raised inside a job when its cancellation token was set; the run is recorded as 'cancelled'."""
