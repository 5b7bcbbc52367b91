"""The straightforward status-callback receiver that webhooks.py compares the service with.

Flask and sqlite3 as a first version would use them: the Twilio signature checked with
RequestValidator, a new connection per request, the default rollback journal, one INSERT
and one commit per callback. webhooks.py serves it with `gunicorn -k sync -w 2`.
Settings come from BASELINE_DB, BASELINE_URL (the URL Twilio signs) and BASELINE_TOKEN.
"""

import os
import sqlite3

from flask import Flask, request
from twilio.request_validator import RequestValidator

DATABASE = os.environ["BASELINE_DB"]
URL = os.environ["BASELINE_URL"]
validator = RequestValidator(os.environ["BASELINE_TOKEN"])
app = Flask(__name__)


@app.post("/message-status")
def message_status():
    if not validator.validate(URL, request.form, request.headers.get("X-Twilio-Signature", "")):
        return {"error": "Invalid Twilio signature"}, 403
    conn = sqlite3.connect(DATABASE, timeout=5)
    try:
        conn.execute(
            "INSERT INTO status_events (message_sid, status, received_at)"
            " VALUES (?, ?, datetime('now'))",
            (request.form["MessageSid"], request.form["MessageStatus"]),
        )
        conn.commit()
    finally:
        conn.close()
    return {"received": True}


@app.get("/healthz")
def healthz():
    return {"status": "ok"}
