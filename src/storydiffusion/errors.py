"""The project's error types: every user mistake surfaces as one of these, with a message that says
what is wrong and how to fix it."""


class StoryDiffusionError(ValueError):
    """Bad input to storydiffusion (a setting, a story, a bank file...)."""


class BankMismatchError(StoryDiffusionError):
    """An identity bank was made under settings (model, size, steps...) that differ from this run's."""
