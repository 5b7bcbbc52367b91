import threading

import psycopg
import pytest
import requests
from twilio.http.response import Response

from support import (
    ACCOUNT_SID,
    API_KEY,
    AUTH,
    SENDER,
    app_database_url,
    callback,
    database_text,
    sql_rows,
    wait_until,
)
from twilio_fakes import twilio_error


class Clock:
    def __init__(self, now=1_800_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def make_app(make_app, clock):
    """The shared make_app, with this module's clock."""
    return lambda **variables: make_app(clock=clock, **variables)


def keyed(client, key, to="+15558675309", body="Your code is 123456", headers=AUTH):
    return client.post("/send-sms", json={"to": to, "body": body},
                       headers={**headers, "Idempotency-Key": key})


def test_repeat_with_same_key_replays_the_answer_and_sends_nothing(client, fake_twilio):
    first = keyed(client, "order-1")
    again = keyed(client, "order-1")
    assert first.status_code == again.status_code == 200
    assert again.get_json() == first.get_json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert len(fake_twilio.creates) == 1


def test_same_key_with_a_different_request_is_422(client, fake_twilio):
    keyed(client, "order-1", body="one")
    for changed in ({"body": "two"}, {"to": "+15558670000", "body": "one"}):
        response = keyed(client, "order-1", **changed)
        assert response.status_code == 422
        assert "different request" in response.get_json()["error"]
    assert len(fake_twilio.creates) == 1


def test_keys_are_separate_per_api_key(make_app, fake_twilio):
    keyed(make_app().test_client(), "order-1")
    other_key = "another-api-key-987654321"
    other = make_app(API_KEY=other_key).test_client()
    response = keyed(other, "order-1", headers={"Authorization": f"Bearer {other_key}"})
    assert "Idempotent-Replayed" not in response.headers
    assert len(fake_twilio.creates) == 2


@pytest.mark.parametrize("key", ["", "k" * 256])
def test_key_length_is_checked(client, fake_twilio, key):
    response = keyed(client, key)
    assert response.status_code == 400
    assert "Idempotency-Key" in response.get_json()["error"]
    assert fake_twilio.creates == []


@pytest.mark.parametrize("answer, status", [
    pytest.param(twilio_error(400, 21211), 400, id="twilio-400"),
    pytest.param(requests.ReadTimeout("slow"), 504, id="timeout-unknown-outcome"),
    pytest.param(requests.ConnectionError("reset"), 502, id="connection-unknown-outcome"),
    pytest.param(twilio_error(500, 20500), 502, id="twilio-5xx-unknown-outcome"),
])
def test_final_and_unknown_answers_are_kept_and_never_resent(client, fake_twilio, answer,
                                                              status):
    fake_twilio.answer_next(answer)
    first = keyed(client, "k")
    again = keyed(client, "k")
    assert first.status_code == again.status_code == status
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json() == first.get_json()
    assert len(fake_twilio.creates) == 1


def test_validation_400_is_kept(client, fake_twilio):
    first = keyed(client, "k", to="12345")
    again = keyed(client, "k", to="12345")
    assert first.status_code == again.status_code == 400
    assert again.headers["Idempotent-Replayed"] == "true"
    assert fake_twilio.creates == []


@pytest.mark.parametrize("answer, status", [
    pytest.param(twilio_error(429, 20429), 503, id="twilio-rate-limit"),
    pytest.param(twilio_error(401, 20003), 502, id="credentials"),
])
def test_try_again_later_answers_are_not_kept(client, fake_twilio, answer, status):
    fake_twilio.answer_next(answer)
    assert keyed(client, "k").status_code == status
    retry = keyed(client, "k")
    assert retry.status_code == 200
    assert "Idempotent-Replayed" not in retry.headers
    assert len(fake_twilio.creates) == 2


def test_in_flight_key_gets_409_then_stale_key_is_an_unknown_outcome(make_app, fake_twilio,
                                                                      clock):
    app = make_app(TWILIO_TIMEOUT="10")
    entered, release = threading.Event(), threading.Event()
    fake_twilio.answer_next(lambda: (entered.set(), release.wait(10)))
    answers = {}
    first = threading.Thread(target=lambda: answers.update(first=keyed(app.test_client(), "k")))
    first.start()
    assert entered.wait(10)

    busy = keyed(app.test_client(), "k")
    assert busy.status_code == 409 and "still being processed" in busy.get_json()["error"]

    clock.now += 21  # past twice TWILIO_TIMEOUT: the first request counts as dead
    stale = keyed(app.test_client(), "k")
    assert stale.status_code == 504
    assert "may or may not have been sent" in stale.get_json()["details"]
    assert keyed(app.test_client(), "k").status_code == 504

    release.set()
    first.join(10)
    assert answers["first"].status_code == 200
    assert len(fake_twilio.creates) == 1, "a stale key is never re-sent"


def test_keys_expire_after_24_hours(client, fake_twilio, clock):
    keyed(client, "k")
    clock.now += 24 * 3600 - 1
    assert keyed(client, "k").headers.get("Idempotent-Replayed") == "true"
    clock.now += 2
    fresh = keyed(client, "k")
    assert fresh.status_code == 200 and "Idempotent-Replayed" not in fresh.headers
    assert len(fake_twilio.creates) == 2


def test_destination_rule_refuses_with_403_and_sends_nothing(make_app, fake_twilio, caplog):
    client = make_app(ALLOWED_DESTINATIONS="+1,+44").test_client()
    response = client.post("/send-sms", json={"to": "+2348012345678", "body": "hi"},
                           headers=AUTH)
    assert response.status_code == 403
    assert "ALLOWED_DESTINATIONS=+1,+44" in response.get_json()["error"]
    assert fake_twilio.creates == []
    assert "Refused send to +*********5678: outside ALLOWED_DESTINATIONS" in caplog.text
    ok = client.post("/send-sms", json={"to": "+447700900123", "body": "hi"}, headers=AUTH)
    assert ok.status_code == 200


def test_per_recipient_limit_answers_429_with_retry_after(make_app, fake_twilio, clock, caplog):
    client = make_app(MAX_SENDS_PER_RECIPIENT_PER_HOUR="2").test_client()
    send = lambda to="+15558675309": client.post(  # noqa: E731
        "/send-sms", json={"to": to, "body": "hi"}, headers=AUTH)
    assert send().status_code == 200
    clock.now += 600
    assert send().status_code == 200
    clock.now += 600
    refused = send()
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "2400"
    assert "MAX_SENDS_PER_RECIPIENT_PER_HOUR=2" in refused.get_json()["error"]
    assert len(fake_twilio.creates) == 2
    assert "Refused send to +*******5309: MAX_SENDS_PER_RECIPIENT_PER_HOUR" in caplog.text
    assert send("+15558670000").status_code == 200, "other recipients are not limited"
    clock.now += 2400
    assert send().status_code == 200


def test_limit_counts_only_messages_this_service_sent(make_app, fake_twilio, post_callback):
    app = make_app(MAX_SENDS_PER_RECIPIENT_PER_HOUR="1")
    client = app.test_client()
    from support import CALLBACK_URL, sign
    params = callback("SM" + "f6" * 16, "delivered", To="+15558675309")
    client.post("/message-status", data=params,
                headers={"X-Twilio-Signature": sign(CALLBACK_URL, params)})
    fake_twilio.answer_next(twilio_error(400, 21612))
    assert client.post("/send-sms", json={"to": "+15558675309", "body": "hi"},
                       headers=AUTH).status_code == 400
    assert client.post("/send-sms", json={"to": "+15558675309", "body": "hi"},
                       headers=AUTH).status_code == 200


def test_limit_0_turns_it_off(make_app, fake_twilio):
    client = make_app(MAX_SENDS_PER_RECIPIENT_PER_HOUR="0").test_client()
    for _ in range(12):
        assert client.post("/send-sms", json={"to": "+15558675309", "body": "hi"},
                           headers=AUTH).status_code == 200


def test_per_recipient_429_is_not_kept_and_replays_skip_the_limits(make_app, fake_twilio, clock):
    client = make_app(MAX_SENDS_PER_RECIPIENT_PER_HOUR="1").test_client()
    assert keyed(client, "a").status_code == 200
    assert keyed(client, "a").headers["Idempotent-Replayed"] == "true"
    assert keyed(client, "b", body="other").status_code == 429
    clock.now += 3600
    assert keyed(client, "b", body="other").status_code == 200
    assert len(fake_twilio.creates) == 2


def test_api_key_is_never_stored(client, app):
    keyed(client, "k")
    dump = database_text(app)
    assert API_KEY not in dump and "Your code is 123456" not in dump


def test_key_is_released_when_the_send_fails_before_reaching_twilio(app, client, fake_twilio):
    url = app_database_url(app)
    sql_rows(url, "ALTER TABLE send_reservations RENAME TO away")  # the limit check will fail
    failed = keyed(client, "k")
    assert failed.status_code == 503
    assert fake_twilio.creates == []
    sql_rows(url, "ALTER TABLE away RENAME TO send_reservations")
    retry = keyed(client, "k")
    assert retry.status_code == 200 and "Idempotent-Replayed" not in retry.headers
    assert len(fake_twilio.creates) == 1


def test_a_send_with_unknown_outcome_keeps_counting_against_the_limit(make_app, fake_twilio,
                                                                       clock):
    client = make_app(MAX_SENDS_PER_RECIPIENT_PER_HOUR="1").test_client()
    fake_twilio.answer_next(requests.ReadTimeout("slow"))
    assert keyed(client, "a").status_code == 504
    refused = keyed(client, "b", body="other")
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "3600"
    clock.now += 3601
    assert keyed(client, "b", body="other").status_code == 200
    assert len(fake_twilio.creates) == 2


def test_a_send_twilio_refused_gives_its_place_back(make_app, fake_twilio):
    client = make_app(MAX_SENDS_PER_RECIPIENT_PER_HOUR="1").test_client()
    fake_twilio.answer_next(twilio_error(400, 21612))
    assert keyed(client, "a").status_code == 400
    assert keyed(client, "b", body="other").status_code == 200


def test_a_send_whose_request_died_keeps_counting_for_the_hour(make_app, fake_twilio, clock):
    """A worker SIGKILLed mid-send never settles its reservation; the message may have gone
    out, so it counts for the hour. Here the first request is still hanging in Twilio while
    the clock passes twice TWILIO_TIMEOUT, as a dead one would be."""
    app = make_app(MAX_SENDS_PER_RECIPIENT_PER_HOUR="1", TWILIO_TIMEOUT="10")
    entered, release = threading.Event(), threading.Event()
    fake_twilio.answer_next(lambda: (entered.set(), release.wait(10)))
    first = threading.Thread(target=lambda: keyed(app.test_client(), "a"))
    first.start()
    try:
        assert entered.wait(10)
        refused = keyed(app.test_client(), "b", body="other")
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "3600"
        clock.now += 600
        refused = keyed(app.test_client(), "b", body="other")
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "3000"
        assert keyed(app.test_client(), "a").status_code == 504, "its key: unknown outcome"
    finally:
        release.set()
        first.join(10)


def test_the_service_wide_hourly_limit(make_app, fake_twilio, clock, caplog):
    client = make_app(MAX_SENDS_PER_HOUR="3").test_client()
    assert keyed(client, "a", to="+15558670001").status_code == 200
    clock.now += 600
    fake_twilio.answer_next(requests.ReadTimeout("slow"))  # unknown outcome: counts
    assert keyed(client, "b", to="+15558670002").status_code == 504
    fake_twilio.answer_next(twilio_error(400, 21612))  # certainly not sent: does not count
    assert keyed(client, "c", to="+15558670003").status_code == 400
    assert keyed(client, "d", to="+15558670004").status_code == 200
    clock.now += 600
    refused = keyed(client, "e", to="+15558670005")
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "2400"
    assert "MAX_SENDS_PER_HOUR=3" in refused.get_json()["error"]
    assert "Refused send to +*******0005: MAX_SENDS_PER_HOUR=3" in caplog.text
    assert keyed(client, "e", to="+15558670005").status_code == 429, "a 429 is not kept"
    clock.now += 2400
    assert keyed(client, "e", to="+15558670005").status_code == 200
    assert len(fake_twilio.creates) == 5


def test_the_service_wide_limit_defaults_to_1000_and_0_turns_it_off(make_app, fake_twilio):
    assert make_app().config["SERVICE"].max_sends_per_hour == 1000
    client = make_app(MAX_SENDS_PER_HOUR="0", MAX_SENDS_PER_RECIPIENT_PER_HOUR="0").test_client()
    for n in range(5):
        assert keyed(client, str(n), to=f"+1555867000{n}").status_code == 200


def test_the_service_wide_limit_holds_for_concurrent_sends_of_two_instances(make_app,
                                                                            fake_twilio):
    instances = [make_app(MAX_SENDS_PER_HOUR="4") for _ in range(2)]
    barrier = threading.Barrier(12)
    statuses = []

    def post(n):
        client = instances[n % 2].test_client()
        barrier.wait(10)
        statuses.append(keyed(client, str(n), to=f"+155586701{n:02d}").status_code)

    threads = [threading.Thread(target=post, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(statuses) == [200] * 4 + [429] * 8
    assert len(fake_twilio.creates) == 4


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_the_per_recipient_limit_holds_for_concurrent_sends_of_two_instances(make_app,
                                                                             fake_twilio):
    """With the service-wide limit off, only the recipient's advisory lock keeps concurrent
    sends to one number from counting the same free places. Another connection holds the
    reservations until every send waits for them, then lets them all go at once."""
    instances = [make_app(MAX_SENDS_PER_HOUR="0", MAX_SENDS_PER_RECIPIENT_PER_HOUR="3",
                          DATABASE_POOL_SIZE="12", storage_settings={"lock_timeout": 60})
                 for _ in range(2)]
    statuses = []

    def post(n):
        statuses.append(instances[n % 2].test_client().post(
            "/send-sms", json={"to": "+15558675309", "body": "hi"}, headers=AUTH).status_code)

    threads = [threading.Thread(target=post, args=(n,)) for n in range(16)]
    with psycopg.connect(app_database_url(instances[0])) as gate:
        gate.execute("LOCK TABLE send_reservations IN ACCESS EXCLUSIVE MODE")
        for thread in threads:
            thread.start()
        waiting = ("SELECT count(*) FROM pg_locks WHERE NOT granted AND database ="
                   " (SELECT oid FROM pg_database WHERE datname = current_database())")
        wait_until(lambda: gate.execute(waiting).fetchone()[0] >= 16, 30,
                   "every send waiting for its reservation")
    for thread in threads:
        thread.join(60)
    assert sorted(statuses) == [200] * 3 + [429] * 13
    assert len(fake_twilio.creates) == 3


def test_live_start_without_allowed_destinations_warns(make_app, caplog):
    make_app()
    assert "ALLOWED_DESTINATIONS is unset" in caplog.text
    caplog.clear()
    make_app(ALLOWED_DESTINATIONS="+1")
    assert "ALLOWED_DESTINATIONS is unset" not in caplog.text


def test_a_raw_array_and_an_object_with_the_same_values_are_different_requests(client,
                                                                              fake_twilio):
    raw = client.post("/send-sms", data='["+15558675309", "hi"]', content_type="application/json",
                      headers={**AUTH, "Idempotency-Key": "k"})
    assert raw.status_code == 400
    response = keyed(client, "k", body="hi")
    assert response.status_code == 422 and "Idempotent-Replayed" not in response.headers
    assert fake_twilio.creates == []


def test_the_limit_counts_the_number_it_checked_even_if_twilio_answers_another_form(
        make_app, fake_twilio):
    client = make_app(MAX_SENDS_PER_RECIPIENT_PER_HOUR="1").test_client()
    fake_twilio.answer_next(Response(201, (
        '{"sid": "SM%s", "status": "queued", "to": "+15558675300", "from": "%s",'
        ' "account_sid": "%s", "date_created": "Thu, 26 Nov 2026 20:00:00 +0000"}'
    ) % ("d4" * 16, SENDER, ACCOUNT_SID)))
    assert keyed(client, "a").status_code == 200
    assert keyed(client, "b", body="other").status_code == 429
    assert len(fake_twilio.creates) == 1


def test_an_unsendable_body_is_400_and_takes_no_place_under_the_limit(make_app, fake_twilio):
    client = make_app(MAX_SENDS_PER_RECIPIENT_PER_HOUR="1").test_client()
    response = client.post("/send-sms", data='{"to": "+15558675309", "body": "\\ud800"}',
                           content_type="application/json", headers=AUTH)
    assert response.status_code == 400 and "'body'" in response.get_json()["error"]
    assert fake_twilio.creates == []
    assert keyed(client, "b").status_code == 200
