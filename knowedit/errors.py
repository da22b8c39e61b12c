"""The one base class of knowedit's own errors.

Every error that describes the user's input or environment (a bad prompt, a
damaged checkpoint or ledger, an unknown edit id, a busy ledger, ...) is a
:class:`KnoweditError`; the command line shows those as one line and exits 1.
Most also stay :class:`ValueError` subclasses, as they always were, so code
that catches ``ValueError`` keeps working.
"""

from __future__ import annotations


class KnoweditError(Exception):
    """A problem with the input or the environment, explained by its message."""
