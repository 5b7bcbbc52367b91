"""The entry point: `gunicorn app:app` (see gunicorn.conf.py), `flask --app app ...`, or
`python app.py` for the development server. The service itself is the sms_status package."""

from sms_status import create_app_or_exit
from sms_status.services import services

app = create_app_or_exit()

if __name__ == "__main__":
    config = app.config["SERVICE"]
    # Simulating without API_KEY every endpoint is open: this machine alone may reach it.
    local_only = config.simulate and not config.api_key
    if services(app).webhooks is not None:
        services(app).webhooks.start()
    app.run(host="127.0.0.1" if local_only else "0.0.0.0", port=config.port)
