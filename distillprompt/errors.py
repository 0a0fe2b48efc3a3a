"""The one exception type for mistakes a user can fix, and the one for endpoints that give up."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix.

    The message is a single line that names the problem and the fix; the CLI prints it
    without a traceback and exits with code 2.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class EndpointUnavailable(Exception):
    """The endpoint kept failing after every retry (rate limits, 5xx, lost connections)."""


class CostLimitReached(EndpointUnavailable):
    """``--max-cost`` is spent: no new request goes out; the run stops as it does when the
    endpoint gives up (the unfinished round is set aside), with the stop reason ``max_cost``."""
