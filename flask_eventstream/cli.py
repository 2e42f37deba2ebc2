"""The ``flask eventstream`` commands, added to an app by
:meth:`EventStream.init_app <flask_eventstream.EventStream.init_app>`."""

from __future__ import annotations

import json
import typing as t

import click
from flask import current_app
from flask.cli import AppGroup

from ._state import state_for
from .exceptions import EventStreamError

__all__ = ["cli"]


@click.group("eventstream", cls=AppGroup)
def cli() -> None:
    """Server-Sent Events commands."""


@cli.command("publish")
@click.argument("channel")
@click.argument("data")
@click.option("--event", "event_name", default=None, help="The event type.")
@click.option(
    "--string",
    "as_string",
    is_flag=True,
    help="Send DATA as a string even if it parses as JSON.",
)
def _publish_command(
    channel: str, data: str, event_name: str | None, as_string: bool
) -> None:
    """Publish DATA to CHANNEL.

    DATA is parsed as JSON when it is valid JSON ('{"a": 1}', '42', '"text"'),
    and sent as a plain string otherwise; --string always sends it as a string.
    Prints the assigned event id.
    """
    payload: t.Any = data
    if not as_string:
        try:
            payload = json.loads(data)
        except ValueError:
            payload = data
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    state = state_for(app)
    if not state.settings.redis_url:
        click.echo(
            "Warning: EVENTSTREAM_REDIS_URL is not set; the in-memory broker of"
            " this command reaches no server's subscribers.",
            err=True,
        )
    try:
        event = app.extensions["eventstream"].publish(
            channel, payload, event=event_name
        )
    except (ValueError, TypeError) as e:
        raise click.UsageError(str(e)) from None
    except EventStreamError as e:
        raise click.ClickException(str(e)) from None
    click.echo(event.id)
