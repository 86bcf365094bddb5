"""What the emulator refuses to guess."""


class NotEmulated(AssertionError):
    """A call or behaviour NVIDIA's sources do not document (or leave UNCONFIRMED): the emulator
    will not invent it, so a test that reaches it fails loudly instead of passing on a guess.
    An AssertionError, so no `except UserError` / `except RuntimeError` of the code under test
    swallows it."""
