"""gunicorn settings for `gunicorn app:app` (read automatically from the working directory)."""

import os

# Heroku-style hosts give the port in $PORT; 3000 matches `python app.py`.
bind = f"0.0.0.0:{os.environ.get('PORT', '3000')}"
# Threaded workers: /send-sms waits on Twilio's API, and a waiting thread must not block a worker.
worker_class = "gthread"
# Heroku sets WEB_CONCURRENCY from the dyno size.
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Threads per worker: how many Twilio calls one worker can wait on at once.
threads = int(os.environ.get("GUNICORN_THREADS", "32"))
# Load the app in the master, so a configuration error stops the whole server once,
# instead of every worker failing to boot and being restarted forever.
preload_app = True
# Below the 30 s a Heroku-style host waits between SIGTERM and SIGKILL.
timeout = 25
graceful_timeout = 20
# No control socket: one default path would be shared by every instance on the host.
control_socket_disable = True
# Access log to stdout with the other logs.
accesslog = "-"


def worker_exit(server, worker):
    """Closes the worker's kept SQLite connections cleanly."""
    import db

    db.close_all()
