"""Signals that applications can connect to for presence, logging or metrics.

Every signal is sent with the Flask application as the sender, following
Flask's own convention. Receivers run synchronously on the hot path of the
stream or broker: keep them short and never block in them.
"""

from __future__ import annotations

from blinker import Namespace

__all__ = ["client_connected", "client_disconnected", "event_published"]

_signals = Namespace()

event_published = _signals.signal("eventstream.event-published")
"""Sent on every process for every event its broker delivers to local
subscribers, once per event (not once per subscriber).

:sender: the Flask application.
:param channel: the channel name.
:param event: the :class:`~flask_eventstream.Event`, with its assigned ``id``.
"""

client_connected = _signals.signal("eventstream.client-connected")
"""Sent when a stream starts, after the view produced its first event.

:sender: the Flask application.
:param channels: tuple of the channel names the stream is subscribed to so
    far (empty for a stream that subscribes to none).
:param connection_id: an int that identifies the stream within the process.
:param remote_addr: the client address as the WSGI server saw it.
:param user: the stream's user (from a grant or ``subscribe(user=...)``),
    or ``None``.
"""

client_disconnected = _signals.signal("eventstream.client-disconnected")
"""Sent once when a stream has ended and everything held for it was released.

:sender: the Flask application.
:param channels: tuple of every channel the stream subscribed to.
:param connection_id: the same id as in :data:`client_connected`.
:param remote_addr: the client address.
:param reason: why it ended: ``"closed"`` (the view finished), ``"client"``
    (the client went away), ``"overflow"`` (it fell too far behind),
    ``"lifetime"`` (including the expiry of its grant), ``"shutdown"``,
    ``"timeout"`` (a write blocked too long), ``"revoked"``
    (:meth:`~flask_eventstream.EventStream.revoke` or
    :meth:`~flask_eventstream.EventStream.disconnect`) or ``"error"``.
:param user: the stream's user, or ``None``.
"""
