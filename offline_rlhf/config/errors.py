"""Configuration errors: one line a user can act on."""


class ConfigError(ValueError):
    """A config value is wrong. The message names the key and the fix."""

    def __init__(self, key: str, problem: str, fix: str = ""):
        self.key = key
        message = f"{key}: {problem}"
        if fix:
            message += f"; {fix}"
        super().__init__(message)


class ResumeRefused(ConfigError):
    """A rerun's config differs from the one a stage's outputs were made under. Raised
    before the stage writes anything, so the outputs (and their DONE) stand as they were."""
