"""User-facing errors.

Everything a user can get wrong (a path, a field, a model name, a config value) raises a subclass of
`SptError` whose message names the problem and says what was expected. The CLI prints such an error
as one line on stderr and exits with status 2; anything else is a bug and keeps its traceback.
"""


class SptError(Exception):
    """A problem with the user's input, explained in the message."""


class ConfigError(SptError, ValueError):
    """A configuration value, config file or model architecture that spt_jax cannot use."""


class WeightsError(SptError, ValueError):
    """A checkpoint that is missing, truncated, of the wrong shape or in a refused format."""


class DataError(SptError, ValueError):
    """A dataset, split, record or template that cannot produce examples."""


class MissingPackageError(SptError, ImportError):
    """An optional package (an embedded model, a benchmark backend) that is not installed."""


def close_names(name: str, choices, n: int = 3) -> str:
    """A ' (did you mean ...?)' hint listing the choices closest to a misspelled name."""
    import difflib

    matches = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" (did you mean {', '.join(repr(m) for m in matches)}?)" if matches else ""
