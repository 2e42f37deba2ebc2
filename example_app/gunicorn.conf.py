"""gunicorn settings for the example app (or any flask-eventstream app) with
Prometheus metrics summed over several workers.

    mkdir -p /run/example-metrics
    PROMETHEUS_MULTIPROC_DIR=/run/example-metrics EVENTSTREAM_METRICS=1 \\
    EVENTSTREAM_REDIS_URL=redis://localhost:6379/0 \\
        gunicorn -c example_app/gunicorn.conf.py -w 3 'example_app:create_app()'
"""

import glob
import os

# Event streams are long-lived: each needs a greenlet, not a whole worker.
worker_class = "gevent"
# A stream ends at once on SIGTERM; this bounds a worker that does not.
graceful_timeout = 10


def on_starting(server):
    """Start from an empty metrics directory: files left by an earlier run
    would be counted again."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
        for name in glob.glob(os.path.join(path, "*.db")):
            os.remove(name)


def child_exit(server, worker):
    """A worker exited (or was killed): drop its open-stream gauge from the
    sums. Its counters stay, as counters should."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
