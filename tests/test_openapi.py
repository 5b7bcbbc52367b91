import json
import re

from openapi_spec_validator import validate

from sms_status.web.routes import OPENAPI_DOCUMENT

ROUTES = {("/", "get"), ("/healthz", "get"), ("/openapi.json", "get"), ("/send-sms", "post"),
          ("/message-status", "post"), ("/get-status/{sid}", "get"), ("/messages", "get"),
          ("/stats", "get"), ("/webhook-events", "get"),
          ("/webhook-events/{event_id}/retry", "post"), ("/metrics", "get"),
          ("/inbound-sms", "post"), ("/inbound-messages", "get"), ("/opt-outs", "get"),
          ("/opt-outs/{number}", "get"), ("/opt-outs/{number}", "put"),
          ("/opt-outs/{number}", "delete")}


def test_openapi_document_is_served_without_a_key_and_is_valid_openapi_3_1(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    document = response.get_json()
    validate(document)
    assert document["openapi"].startswith("3.1")


def test_openapi_document_describes_every_route_of_the_app(app):
    """Every route but the dashboard's HTML pages for people (tests/test_dashboard.py)."""
    with open(OPENAPI_DOCUMENT) as source:
        documented = {(path, method) for path, item in json.load(source)["paths"].items()
                      for method in item}
    served = {(re.sub(r"<(\w+)>", r"{\1}", rule.rule), method.lower())
              for rule in app.url_map.iter_rules()
              if rule.endpoint != "static" and not rule.endpoint.startswith("dashboard.")
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert documented == served == ROUTES
