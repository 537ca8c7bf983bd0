"""TOML parsing on every supported Python (3.10+): the standard library's `tomllib` from 3.11 on,
else `tomli`, the backport it was taken from (same API; a dependency on 3.10 only, pyproject.toml).

    from tandem.tomlcompat import tomllib

This module imports nothing else from tandem, so it can be checked on its own.
"""

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

__all__ = ["tomllib"]
