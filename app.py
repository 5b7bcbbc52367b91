"""The entry point: `gunicorn app:app` (see gunicorn.conf.py), `flask --app app ...`, or
`python app.py` for the development server. The service itself is the sms_status package."""

from sms_status import create_app_or_exit

app = create_app_or_exit()

if __name__ == "__main__":
    app.run(host="0.0.0.0", port=app.config["SERVICE"].port)
