"""What Twilio's error codes mean, in one sentence a sender can act on.

Only the codes a sender of alerts and one-time codes really meets are listed, each with
its page in Twilio's error dictionary; any other code is described as None, so an answer
never guesses.
"""

DOCS_URL = "https://www.twilio.com/docs/api/errors/{code}"

# code -> (what happened and what to do, Twilio's page for the code)
ERRORS = {
    code: (sentence, DOCS_URL.format(code=code))
    for code, sentence in {
        30001: "Queue overflow: more messages were sent than the sender's queue holds; "
               "send more slowly, then retry.",
        30002: "Account suspended: Twilio suspended the account between send and delivery; "
               "check the account's status in the Twilio Console.",
        30003: "Unreachable handset: the phone is off or out of coverage; "
               "retry later or reach the person another way.",
        30004: "Message blocked: the recipient or their carrier blocks messages from this "
               "sender; do not retry, check the recipient's consent.",
        30005: "Unknown handset: the number does not exist or is no longer in service; "
               "check the number with the recipient.",
        30006: "Landline or unreachable carrier: the number cannot receive SMS; "
               "use a mobile number or a voice call.",
        30007: "Carrier filtering: the carrier filtered the message as unwanted; register "
               "the sender (10DLC or toll-free verification) and review the content.",
        30008: "Unknown error: the carrier gave no reason; retry once, and contact "
               "Twilio support with the message SID if it keeps happening.",
        30032: "Toll-free number not verified: complete toll-free verification in the "
               "Twilio Console before sending from it to the US or Canada.",
        30034: "Unregistered 10DLC number: register the number with an A2P 10DLC campaign "
               "before sending from it to the US.",
        21610: "Recipient unsubscribed: they replied STOP; do not message them until they "
               "reply START.",
        21211: "Invalid 'To' number: write the recipient in E.164 format, like +15558675309.",
        21408: "Region not enabled: allow the recipient's country in the Twilio Console's "
               "Messaging Geo Permissions.",
        21612: "Cannot route to this number: Twilio cannot reach it from this sender; "
               "check that the sender can message the recipient's country and carrier.",
        21614: "Not a mobile number: the number is a landline or cannot receive SMS; "
               "use a mobile number.",
        63016: "Outside WhatsApp's 24-hour window: the recipient has not written in 24 hours; "
               "send an approved template instead of free-form text.",
    }.items()
}


def description(code):
    """The sentence and docs link for a Twilio error code, or None when unknown or absent."""
    entry = ERRORS.get(code) if isinstance(code, int) else None
    return None if entry is None else f"{entry[0]} {entry[1]}"
