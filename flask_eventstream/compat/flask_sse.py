"""flask-sse's public API on flask-eventstream.

A flask-sse application moves by changing one import::

    # was: from flask_sse import sse
    from flask_eventstream.compat.flask_sse import sse

    app.config["REDIS_URL"] = "redis://localhost"
    app.register_blueprint(sse, url_prefix="/stream")
    sse.publish({"message": "Hello!"}, type="greeting")

and its streams now resume from ``Last-Event-ID``, send heartbeats, and
release everything held for a client that went away. The differences a
flask-sse user may notice are listed in the migration guide.

.. versionadded:: 0.2
"""

from __future__ import annotations

import logging
import typing as t
import warnings

from flask import abort
from flask import Blueprint
from flask import current_app
from flask import Flask
from flask import request
from flask.blueprints import BlueprintSetupState

from ..extension import EventStream
from ..sse import Event
from ..views import eventstream

__all__ = ["ServerSentEventsBlueprint", "sse"]

log = logging.getLogger(__name__)

#: Configuration keys searched for the Redis URL, in order.
REDIS_URL_KEYS = ("EVENTSTREAM_REDIS_URL", "SSE_REDIS_URL", "REDIS_URL")


def _extension(app: Flask) -> EventStream | None:
    return t.cast("EventStream | None", app.extensions.get("eventstream"))


class ServerSentEventsBlueprint(Blueprint):
    """A :class:`flask.Blueprint` with flask-sse's ``publish()`` and its
    stream view, served by an :class:`~flask_eventstream.EventStream`.

    On its first registration with an application, the blueprint uses the
    application's :class:`~flask_eventstream.EventStream` if it has one, and
    otherwise creates one on the Redis URL of the first of
    ``EVENTSTREAM_REDIS_URL``, ``SSE_REDIS_URL`` and ``REDIS_URL`` that is
    set (read at that moment), or on the in-memory broker if none is.
    """

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self.record_once(self._setup)

    @staticmethod
    def _setup(state: BlueprintSetupState) -> None:
        app = t.cast(Flask, state.app)
        if _extension(app) is not None:
            return
        url = next((app.config[k] for k in REDIS_URL_KEYS if app.config.get(k)), None)
        if url is None:
            log.warning(
                "None of %s is set: server-sent events reach the clients of"
                " this process only (the in-memory broker).",
                ", ".join(REDIS_URL_KEYS),
            )
        EventStream(redis_url=url).init_app(app)

    @property
    def eventstream(self) -> EventStream:
        """The current application's :class:`~flask_eventstream.EventStream`."""
        ext = _extension(current_app)
        if ext is None:
            raise RuntimeError(
                f"The blueprint {self.name!r} is not registered on this app:"
                " call app.register_blueprint() first."
            )
        return ext

    def publish(
        self,
        data: t.Any,
        type: str | None = None,
        id: str | None = None,
        retry: int | None = None,
        channel: str = "sse",
    ) -> Event:
        """Publish ``data`` as a server-sent event to every client of
        ``channel``, on every process that shares the Redis server.

        :param data: a ``str`` is sent as it is; anything else is serialised
            with the application's JSON provider (``app.json.dumps``), as
            flask-sse does.
        :param type: the event type (the ``event:`` field).
        :param id: ignored, with a warning: every event on a channel gets an
            id that the library assigns, which resuming is built on.
        :param retry: the reconnection delay in milliseconds, sent with the
            event.
        :param channel: the channel; clients choose it with ``?channel=``.
        :return: the :class:`~flask_eventstream.Event` as sent, with its id
            (flask-sse returned Redis' count of receivers).
        :raises ValueError: for a bad channel or event type.
        :raises PublishError: if the broker (Redis) could not take the event.
        """
        if id is not None:
            warnings.warn(
                f"sse.publish(id={id!r}) is ignored: flask-eventstream assigns"
                " every event's id itself, so that clients can resume.",
                UserWarning,
                stacklevel=2,
            )
        text = data if isinstance(data, str) else current_app.json.dumps(data)
        event = Event(data=text, event=type or None, retry=retry or None)
        return self.eventstream.publish(channel, event)

    def stream(self) -> t.Any:
        """The view at the blueprint's root: the events of the channel named
        by ``?channel=`` (``sse`` by default), resumed from the client's
        ``Last-Event-ID``."""
        return _stream(self)


@eventstream
def _stream(blueprint: ServerSentEventsBlueprint) -> t.Any:
    channel = request.args.get("channel") or "sse"
    try:
        return blueprint.eventstream.subscribe(channel)
    except ValueError as e:
        abort(400, description=str(e))


sse = ServerSentEventsBlueprint("sse", __name__)
"""The blueprint, with :meth:`~ServerSentEventsBlueprint.stream` at its
root (endpoint ``sse.stream``), as in flask-sse."""
sse.add_url_rule(rule="", endpoint="stream", view_func=sse.stream)
