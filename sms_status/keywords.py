"""What a reply means: Twilio's default opt-out, opt-in and help keywords, matched against
the whole body (trimmed, any case), and Twilio's own OptOutType, which wins when present.

Pure functions, no Flask or database: the inbound webhook (web/inbound.py) asks `kind_of`.
"""

OPT_OUT_KEYWORDS = ("STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT",
                    "REVOKE")
OPT_IN_KEYWORDS = ("START", "YES", "UNSTOP")
HELP_KEYWORDS = ("HELP", "INFO")

# A reply's kind, and the OptOutType Twilio's Advanced Opt-Out gives each.
KINDS = ("message", "opt_out", "opt_in", "help")
KIND_OF_OPT_OUT_TYPE = {"STOP": "opt_out", "START": "opt_in", "HELP": "help"}
OPT_OUT_TYPE_OF_KIND = {kind: name for name, kind in KIND_OF_OPT_OUT_TYPE.items()}


def word_kind(word):
    """The kind of reply a word (upper case) makes on its own."""
    if word in OPT_OUT_KEYWORDS:
        return "opt_out"
    if word in OPT_IN_KEYWORDS:
        return "opt_in"
    if word in HELP_KEYWORDS:
        return "help"
    return "message"


def kind_of(body, opt_out_type=None):
    """(kind, keyword): "opt_out", "opt_in", "help" or "message", and the keyword that made
    it so (the body's word when it is one of that kind, else Twilio's OptOutType; None for
    a message).

    An OptOutType Twilio sends (STOP, START, HELP, any case) wins over the words: Twilio
    knows the sender's custom keywords too. An unknown OptOutType is ignored.
    """
    word = (body or "").strip().upper()
    given = (opt_out_type or "").strip().upper()
    kind = KIND_OF_OPT_OUT_TYPE.get(given) or word_kind(word)
    if kind == "message":
        return kind, None
    return kind, word if word_kind(word) == kind else given
