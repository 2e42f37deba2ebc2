"""``python -m example_app``: serve the example on gevent at http://127.0.0.1:5000."""

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import os  # noqa: E402

from flask_eventstream.serving import run  # noqa: E402

from . import create_app  # noqa: E402


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    host = os.environ.get("EXAMPLE_HOST", "127.0.0.1")
    port = int(os.environ.get("EXAMPLE_PORT", "5000"))
    app = create_app()
    print(
        f" * flask-eventstream example on http://{host}:{port}/ (Ctrl+C to stop)",
        flush=True,
    )
    run(app, host, port)


if __name__ == "__main__":
    main()
