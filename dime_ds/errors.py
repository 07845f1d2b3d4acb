"""Errors that describe a problem with the user's input or machine (a config, a missing file, weights
that cannot be had). Entry points print their message, no traceback, and exit with status 2."""


class UserError(Exception):
    """Base of every error whose message alone tells the user what to fix."""
