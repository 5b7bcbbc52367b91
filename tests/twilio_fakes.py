"""Stand-ins for Twilio's HTTP API. Only the transport is replaced: the real twilio library
builds every request and parses every answer."""

import json

from twilio.http import HttpClient
from twilio.http.response import Response

from sms_status.simulator import SimulatedTwilio


def twilio_error(status, code, message="error"):
    """An error answer in Twilio's JSON shape."""
    body = {"code": code, "message": message, "more_info": "", "status": status}
    return Response(status, json.dumps(body), {"Content-Type": "application/json"})


class FakeTwilio(HttpClient):
    """Records every API request; answers with scripted responses or exceptions, and otherwise
    like Twilio (through the simulator's transport, without sending callbacks)."""

    def __init__(self, account_sid, auth_token):
        super().__init__(logger=None, is_async=False)
        self.simulated = SimulatedTwilio(account_sid, auth_token, send_callbacks=False)
        self.requests = []
        self.script = []

    def answer_next(self, *answers):
        """Queues answers for the next requests: a Response, an exception to raise, or a
        function called first (to hold the request), then answered like Twilio."""
        self.script.extend(answers)

    @property
    def creates(self):
        return [r for r in self.requests if r["method"] == "POST"]

    def request(self, method, uri, params=None, data=None, headers=None, auth=None,
                timeout=None, allow_redirects=False):
        self.requests.append({"method": method, "uri": uri, "data": dict(data or {}),
                              "timeout": timeout})
        if self.script:
            answer = self.script.pop(0)
            if isinstance(answer, BaseException):
                raise answer
            if not callable(answer):
                return answer
            answer()
        return self.simulated.request(method, uri, params, data, headers, auth, timeout,
                                      allow_redirects)
