"""``python -m tests.apps.serve [MODULE:FACTORY]``: serve an app on gevent's
WSGIServer through :func:`flask_eventstream.serving.run`, monkey-patched, at
``EXAMPLE_HOST``:``EXAMPLE_PORT``. The default app is
``tests.apps.streams:create_app``."""

from gevent import monkey

monkey.patch_all()

import importlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from flask_eventstream.serving import run  # noqa: E402


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    spec = sys.argv[1] if len(sys.argv) > 1 else "tests.apps.streams:create_app"
    module_name, _, factory = spec.partition(":")
    module = importlib.import_module(module_name)
    app = getattr(module, factory or "create_app")()
    host = os.environ.get("EXAMPLE_HOST", "127.0.0.1")
    port = int(os.environ.get("EXAMPLE_PORT", "5000"))
    print(f" * serving {spec} on http://{host}:{port}/", flush=True)
    run(app, host, port)


if __name__ == "__main__":
    main()
