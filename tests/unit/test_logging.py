from __future__ import annotations

import io
import json
import logging

from app.observability import logging as logs


def test_json_lines_and_secret_redaction() -> None:
    buffer = io.StringIO()
    logs.configure("info", stream=buffer)
    logs.register_secrets(["super-secret-value-42"])
    log = logs.get_logger(component="t")
    log.info("something", detail="url wss://x?token=super-secret-value-42", nested={"k": ["super-secret-value-42"]})
    log.debug("hidden")
    logging.getLogger("uvicorn.error").info("from stdlib super-secret-value-42")
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["something", "from stdlib [redacted]"]
    assert lines[0]["component"] == "t" and lines[0]["level"] == "info"
    assert "super-secret-value-42" not in buffer.getvalue()
    assert lines[0]["nested"] == {"k": ["[redacted]"]}
