from example_app import create_app
from flask_eventstream.testing import read_events


def test_publish_reaches_subscriber():
    app = create_app()
    client = app.test_client()
    response = client.get("/stream/lobby", buffered=False)
    sent = client.post("/publish/lobby", json={"data": "hi", "event": "chat"})
    assert sent.status_code == 202
    [event] = read_events(response, 1)
    assert (event.event, event.data, event.id) == ("chat", "hi", sent.get_json()["id"])
