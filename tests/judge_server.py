"""A local OpenAI-compatible chat server for judge tests (127.0.0.1, a free port).

It grades deterministically (``pred`` yes when the normalised assistant answer equals the correct
answer; criterion prompts get a score from the answer's length) and misbehaves on purpose when the
assistant's answer contains a trigger word:

- ``flaky429`` / ``flaky500``: the first two attempts get HTTP 429 / 500;
- ``slowpoke``: the first attempt hangs past any short client timeout;
- ``mumble``: the first reply is prose, the repair request gets JSON;
- ``gibberish``: every reply is prose (never parses);
- ``badrequest``: always HTTP 400.

A request for a model named in ``unknown_models`` gets HTTP 404 ``model_not_found``, as OpenAI
answers for a retired model. It records every request (attempt counts per prompt, Authorization
headers, the request bodies) for the assertions.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


class JudgeServer:
    def __init__(self, hang_s: float = 2.0, unknown_models: tuple[str, ...] = ()):
        self.hang_s = hang_s
        self.unknown_models = set(unknown_models)
        self.bodies: list[dict] = []
        self.attempts: Counter = Counter()
        self.requests = 0
        self.auth_headers: set[str] = set()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests += 1
                    server.auth_headers.add(self.headers.get("Authorization", ""))
                    server.bodies.append(body)
                if body["model"] in server.unknown_models:
                    status, reply = 404, ""
                else:
                    status, reply = server.respond(body)
                if status == "hang":
                    time.sleep(server.hang_s)
                    status, reply = 200, reply
                if status == 404:
                    payload = json.dumps({"error": {"message": f"The model `{body['model']}` does not exist or you do not "
                                                    "have access to it.", "type": "invalid_request_error",
                                          "code": "model_not_found"}}).encode()
                elif status != 200:
                    payload = json.dumps({"error": {"message": f"injected {status}", "type": "test"}}).encode()
                else:
                    payload = json.dumps({
                        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"] + "-served-0001",
                        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def respond(self, body: dict):
        user = body["messages"][1]["content"]
        repair = len(body["messages"]) > 2
        with self.lock:
            self.attempts[user] += 1
            n = self.attempts[user]
        if "badrequest" in user:
            return 400, ""
        if "flaky429" in user and n <= 2:
            return 429, ""
        if "flaky500" in user and n <= 2:
            return 500, ""
        if "slowpoke" in user and n == 1:
            return "hang", self.grade(user)
        if "gibberish" in user or ("mumble" in user and not repair):
            return 200, "Well, I would say it mostly matches."
        return 200, self.grade(user)

    @staticmethod
    def grade(user: str) -> str:
        if "Does the assistant's answer match" in user:
            ref = re.search(r"Correct answer: (.*)\n", user).group(1)
            pred = re.search(r"Assistant's answer: (.*)\n", user).group(1)
            same = _norm(ref) == _norm(pred)
            return json.dumps({"pred": "yes" if same else "no", "score": 5 if same else 1})
        answer = re.search(r"(?:Assistant's answer|Answer 1): (.*)\n", user).group(1)
        return json.dumps({"score": min(5, len(answer.split()))})
