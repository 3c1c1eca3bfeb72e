"""The one exception type for bad input: it names the file or option and says how to fix it."""


class InputDataError(ValueError):
    """A problem with the user's inputs (folders, images, prompts, options), with what to do about it."""
