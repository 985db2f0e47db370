"""An OpenAI-compatible server on 127.0.0.1 for tests: chat completions, files, batches.

The answer to a chat request comes from `responder(body) -> str | dict` (a dict may carry
"content" and "logprobs"). Failures are injected by `fail(body, attempt) -> status | None`
(attempt counts this body's requests from 0) and slowed by `delay(body, attempt)`
seconds; `max_in_flight` records the most chat requests served at once. A batch whose id is in `held` stays
`in_progress` (with `hold_from = k`, so is every batch created as the k-th or later); `expire_after = k` makes the next batch answer k requests and then expire, writing
the rest to its error file as `batch_expired`. Every answered request is counted per body
hash in `paid`, whichever endpoint answered it. `garble` answers 200 with a malformed body,
`usage_factor` inflates the reported usage, `create_delay` makes batch creation slow.
"""
from __future__ import annotations

import email.parser
import email.policy
import hashlib
import itertools
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


def body_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class FakeOpenAI:
    def __init__(self, responder: Callable[[dict], Any]):
        self.responder = responder
        self.fail: Callable[[dict, int], int | None] = lambda body, attempt: None
        self.delay: Callable[[dict, int], float] = lambda body, attempt: 0.0
        # A 200 whose body is `garble(body, attempt)` instead of a completion (None: a real
        # answer); it is paid for all the same, with the usage of a real answer.
        self.garble: Callable[[dict, int], Any] = lambda body, attempt: None
        self.usage_factor = 1  # reported usage = real usage x this (an inflating server)
        self.create_delay = 0.0  # seconds batches.create waits after making the batch
        self.in_flight = self.max_in_flight = 0
        self.held: set[str] = set()
        self.hold_from: int | None = None
        self.expire_after: int | None = None
        self.paid: Counter[str] = Counter()
        self.attempts: Counter[str] = Counter()
        self.chat_calls = 0
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_inputs: dict[str, list[str]] = {}  # batch id -> custom_ids
        self.cancelled: list[str] = []
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> "FakeOpenAI":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- behaviour -------------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        with self._lock:
            return f"{prefix}-{next(self._ids)}"

    def complete(self, body: dict) -> dict:
        """A chat.completion object for `body`; counts it as paid."""
        n = int(body.get("n", 1))
        choices = []
        for i in range(n):
            answer = self.responder(body)
            if not isinstance(answer, dict):
                answer = {"content": answer}
            choices.append({"index": i, "finish_reason": "stop", "logprobs": answer.get("logprobs"),
                            "message": {"role": "assistant", "content": answer["content"]}})
        with self._lock:
            self.paid[body_hash(body)] += 1
        prompt = sum(len(m["content"]) for m in body["messages"]) // 4 * self.usage_factor
        out = sum(len(c["message"]["content"] or "") for c in choices) // 4 * self.usage_factor
        return {"id": self._new_id("chatcmpl"), "object": "chat.completion",
                "created": int(time.time()), "model": body["model"], "choices": choices,
                "usage": {"prompt_tokens": prompt, "completion_tokens": out,
                          "total_tokens": prompt + out}}

    def _batch_view(self, b: dict) -> dict:
        return {k: v for k, v in b.items() if not k.startswith("_")}

    def _advance(self, b: dict) -> None:
        if b["status"] == "cancelling":
            b["status"] = "cancelled"
            return
        if b["status"] != "in_progress" or b["id"] in self.held:
            return
        lines = [json.loads(x) for x in self.files[b["input_file_id"]].decode().splitlines() if x]
        keep = len(lines) if self.expire_after is None else self.expire_after
        self.expire_after = None
        out, err = [], []
        for line in lines[:keep]:
            out.append({"id": self._new_id("batch_req"), "custom_id": line["custom_id"],
                        "response": {"status_code": 200, "request_id": "r",
                                     "body": self.complete(line["body"])}, "error": None})
        for line in lines[keep:]:
            err.append({"id": self._new_id("batch_req"), "custom_id": line["custom_id"],
                        "response": None,
                        "error": {"code": "batch_expired", "message": "not done in time"}})
        for name, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                fid = self._new_id("file")
                self.files[fid] = "".join(json.dumps(r) + "\n" for r in rows).encode()
                b[name] = fid
        b["status"] = "completed" if keep == len(lines) else "expired"
        b["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}

    # -- HTTP ------------------------------------------------------------------------

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, obj: Any, raw: bytes | None = None,
                      headers: dict | None = None):
                data = raw if raw is not None else json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if raw is None
                                 else "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_POST(self):
                path = self.path.split("?")[0]
                if path == "/v1/chat/completions":
                    body = json.loads(self._body())
                    key = body_hash(body)
                    with fake._lock:
                        fake.chat_calls += 1
                        attempt = fake.attempts[key]
                        fake.attempts[key] += 1
                        fake.in_flight += 1
                        fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    try:
                        time.sleep(fake.delay(body, attempt))
                        status = fake.fail(body, attempt)
                        if status:
                            return self._send(status, {"error": {
                                "message": f"injected {status}", "type": "server_error",
                                "code": None}}, headers={"retry-after": "0"})
                        answer = fake.complete(body)
                        garbled = fake.garble(body, attempt)
                        if garbled is not None:
                            if isinstance(garbled, dict):
                                garbled = {**garbled, "usage": answer["usage"]}
                            return self._send(200, garbled)
                        return self._send(200, answer)
                    finally:
                        with fake._lock:
                            fake.in_flight -= 1
                if path == "/v1/files":
                    msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(
                        b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n"
                        + self._body())
                    fields = {p.get_param("name", header="content-disposition"): p
                              for p in msg.iter_parts()}
                    data = fields["file"].get_payload(decode=True)
                    purpose = fields["purpose"].get_content().strip()
                    fid = fake._new_id("file")
                    fake.files[fid] = data
                    return self._send(200, {"id": fid, "object": "file", "bytes": len(data),
                                            "created_at": int(time.time()),
                                            "filename": "input.jsonl", "purpose": purpose,
                                            "status": "processed"})
                if path == "/v1/batches":
                    body = json.loads(self._body())
                    bid = fake._new_id("batch")
                    lines = fake.files[body["input_file_id"]].decode().splitlines()
                    fake.batch_inputs[bid] = [json.loads(x)["custom_id"] for x in lines if x]
                    if fake.hold_from is not None and len(fake.batches) + 1 >= fake.hold_from:
                        fake.held.add(bid)
                    fake.batches[bid] = {
                        "id": bid, "object": "batch", "endpoint": body["endpoint"],
                        "input_file_id": body["input_file_id"],
                        "completion_window": body["completion_window"],
                        "status": "in_progress", "created_at": int(time.time()),
                        "output_file_id": None, "error_file_id": None, "errors": None,
                        "request_counts": {"total": len(fake.batch_inputs[bid]),
                                           "completed": 0, "failed": 0}}
                    time.sleep(fake.create_delay)
                    return self._send(200, fake._batch_view(fake.batches[bid]))
                m = re.fullmatch(r"/v1/batches/([^/]+)/cancel", path)
                if m and m.group(1) in fake.batches:
                    b = fake.batches[m.group(1)]
                    fake.cancelled.append(b["id"])
                    b["status"] = "cancelling"
                    return self._send(200, fake._batch_view(b))
                self._send(404, {"error": {"message": f"no route {path}"}})

            def do_GET(self):
                path = self.path.split("?")[0]
                if path == "/v1/batches":
                    return self._send(200, {"object": "list", "has_more": False, "data": [
                        fake._batch_view(b) for b in reversed(list(fake.batches.values()))]})
                m = re.fullmatch(r"/v1/batches/([^/]+)", path)
                if m and m.group(1) in fake.batches:
                    b = fake.batches[m.group(1)]
                    with fake._lock:
                        fake._advance(b)
                    return self._send(200, fake._batch_view(b))
                m = re.fullmatch(r"/v1/files/([^/]+)/content", path)
                if m and m.group(1) in fake.files:
                    return self._send(200, None, raw=fake.files[m.group(1)])
                self._send(404, {"error": {"message": f"no route {path}"}})

        return Handler
