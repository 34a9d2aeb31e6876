"""Displays: what the person at the device sees while it signs in.

`screens` decides what to show for each state (pure data); a `Display` only renders a
`Screen`. Implementations are imported from their own modules, so that a console-only
device never loads PIL, luma or qrcode for a panel it does not have.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from agent.display.screens import Screen

__all__ = ["Display"]


class Display(Protocol):
    """A place to show screens. `show` is called on every state change, and every
    second while a code counts down, so it should cheaply skip what is already shown.
    A failing `show` is logged by the caller and the agent goes on without it."""

    async def start(self) -> None: ...

    async def show(self, screen: Screen) -> None: ...

    async def close(self) -> None: ...
