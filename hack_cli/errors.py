"""User-facing errors: each prints as one line and exits with code 2 (see `hack_cli.cli`)."""


class HackError(Exception):
    """A problem the user can fix (bad config, missing file, unsupported model). One line, no traceback."""


class ConfigError(HackError):
    """A config value is not allowed. Message names the key, the bad value and what is allowed."""

    def __init__(self, key: str, value, allowed: str):
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed
