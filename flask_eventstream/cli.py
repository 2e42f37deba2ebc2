"""The ``flask eventstream`` commands, added to an app by
:meth:`EventStream.init_app <flask_eventstream.EventStream.init_app>`."""

from __future__ import annotations

import json
import sys
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


@cli.command("tail")
@click.argument("channels", nargs=-1, required=True)
@click.option(
    "--last-event-id",
    default=None,
    metavar="ID",
    help="Resume after this event id: print what was missed first.",
)
def _tail_command(channels: tuple[str, ...], last_event_id: str | None) -> None:
    """Print the events of CHANNELS as they arrive, one SSE block each,
    until Ctrl-C.

    Events come through the app's broker: with EVENTSTREAM_REDIS_URL set,
    those published by every worker and host. With --last-event-id, the
    events after that id are printed first (or an eventstream-reset event
    when they are no longer in history).
    """
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    state = state_for(app)
    if not state.settings.redis_url:
        click.echo(
            "Warning: EVENTSTREAM_REDIS_URL is not set; the in-memory broker of"
            " this command sees only events published by this command's"
            " process.",
            err=True,
        )
    try:
        sub = app.extensions["eventstream"].subscribe(
            *channels, last_event_id=last_event_id
        )
    except (ValueError, TypeError) as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"Tailing {', '.join(sub.channels)}; Ctrl-C to stop.", err=True)
    out = sys.stdout.buffer
    try:
        for frame in sub:
            if frame is not None:
                out.write(frame.data)
                out.flush()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except BrokenPipeError:
        # The reader went away (| head): nothing more to print.
        pass
    finally:
        sub.close()
        state.broker.close()
