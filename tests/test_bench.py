"""The benchmarks' own servers run the service's code, not a copy that drifts from it."""

import requests

from support import ROOT, Service, free_port, procfile_command, service_environment, sign

BENCH = ROOT / "bench"


def test_the_no_storage_floor_serves_the_services_own_routes(tmp_path):
    """bench/webhooks.py serves the floor with bench/ on the path: the service's modules must
    still be its own (a bench module once shadowed one, and GET /messages answered 500)."""
    port = free_port()
    env = service_environment(port, f"sqlite:///{tmp_path}/floor.db", simulate=False,
                              GUNICORN_THREADS=4)
    argv = [procfile_command()[0], "-c", "gunicorn.conf.py", "--pythonpath", str(BENCH),
            "floor_app:app"]
    floor = Service(env, tmp_path / "floor.log", argv).start()
    try:
        auth = {"Authorization": f"Bearer {env['API_KEY']}"}
        listing = requests.get(floor.url + "/messages", headers=auth, timeout=10)
        assert listing.status_code == 200, listing.text
        assert listing.json() == {"messages": [], "nextCursor": None}
        params = {"MessageSid": "SM" + "f" * 32, "MessageStatus": "delivered"}
        callback = requests.post(floor.url + "/message-status", data=params, timeout=10,
                                 headers={"X-Twilio-Signature": sign(
                                     env["BASE_URL"] + "/message-status", params)})
        assert callback.json() == {"received": True, "duplicate": False}
    finally:
        floor.kill()
