"""A receiver of status webhooks that prints each verified event: `flask --app app
receive-webhooks`, for trying the webhooks out on this machine (in simulation, say) and for
seeing what an application receives. It verifies each request with the `standardwebhooks`
package, as an application should, and refuses what does not verify."""

import logging
import sys
import time

import click
from flask import Flask, request
from standardwebhooks import Webhook, WebhookVerificationError
from werkzeug.serving import run_simple


def receiver_app(secrets, out=sys.stdout):
    """A WSGI app that takes events on any path: 204 for each verified one (printed as one
    line), 401 for anything else."""
    app = Flask(__name__)
    verifiers = [Webhook(secret) for secret in secrets]

    @app.post("/", defaults={"path": ""})
    @app.post("/<path:path>")
    def receive(path):
        body, headers = request.get_data(), dict(request.headers)
        for verifier in verifiers:
            try:
                event = verifier.verify(body, headers)
                break
            except WebhookVerificationError as error:
                refusal = str(error)
        else:
            click.echo(f"{time.strftime('%H:%M:%S')} REFUSED: {explained(refusal)}", file=out)
            return {"error": "no valid signature"}, 401
        data = event.get("data", {})
        # A message's first event changes its status from nothing.
        previous = data.get("previousStatus") or "(new)"
        click.echo(f"{time.strftime('%H:%M:%S')} {headers.get('Webhook-Id')} {event.get('type')}"
                   f" {data.get('sid')} {previous} -> {data.get('status')}"
                   f" reference={data.get('reference')} errorCode={data.get('errorCode')}",
                   file=out)
        return "", 204

    return app


def explained(refusal):
    """What a person should know about a refusal the standardwebhooks package gave."""
    if refusal == "No matching signature found":
        return ("the signature did not verify: this receiver's STATUS_WEBHOOK_SECRET must "
                "equal the service's")
    return refusal


def serve(secrets, host, port):
    # Only the events' lines: no line per request, no development-server banner.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    run_simple(host, port, receiver_app(secrets), threaded=True)
