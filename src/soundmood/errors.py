"""Exceptions a user sees. The CLI turns each into `error: <message>` and exit 2; every layer may
raise them, so they live below everything else (no module imports the CLI for its errors)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a path, an argument, a file); the message names what was wrong."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


class UnsafeFileError(UserError):
    """A path that is not a regular file we may read: a device, a pipe, a socket, a link that
    leaves its tree, or a file over the size we allow."""
