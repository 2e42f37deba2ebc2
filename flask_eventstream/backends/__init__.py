"""Brokers' engines: :mod:`.memory` (the default) and :mod:`.redis`.

Nothing outside :mod:`flask_eventstream.backends.redis` imports redis, and that
module is imported only when a Redis URL is configured.
"""
