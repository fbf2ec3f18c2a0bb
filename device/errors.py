"""The one exception type users see: a single line that says what, where and how to fix."""


class JetyoloError(Exception):
    """A user-facing error. The CLI prints ``jetyolo: error: <message>`` and exits non-zero.

    Raise it for bad input (files, flags, config, bundles), never for programming errors.
    """

    exit_code = 2
