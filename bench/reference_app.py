"""The fixed reference that webhooks.py measures the service against: Flask's own floor.

A status-callback receiver of a few lines that checks Twilio's signature with
RequestValidator and answers as the service does, storing nothing, logging nothing and
importing nothing of the service, so that no change to the service moves it. webhooks.py
serves it with gunicorn's gthread worker and the service's default workers and threads.
Settings come from REFERENCE_URL (the URL Twilio signs) and REFERENCE_TOKEN.
"""

import os

from flask import Flask, request
from twilio.request_validator import RequestValidator

URL = os.environ["REFERENCE_URL"]
validator = RequestValidator(os.environ["REFERENCE_TOKEN"])
app = Flask(__name__)


@app.post("/message-status")
def message_status():
    if not validator.validate(URL, request.form, request.headers.get("X-Twilio-Signature", "")):
        return {"error": "Invalid Twilio signature"}, 403
    return {"received": True, "duplicate": False}


@app.get("/healthz")
def healthz():
    return {"status": "ok"}
