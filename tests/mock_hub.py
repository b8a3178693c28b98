"""A loopback stand-in for the Hugging Face Hub's upload API, for tests only.

Serves `HfApi(endpoint="http://127.0.0.1:PORT")`: repository creation, YAML validation, preupload (every file
"regular", so contents travel inline in the commit) and the NDJSON commit. Each repository keeps its files as bytes
and the list of its commits, so a test can read back what was pushed byte for byte. `fail_commits = N` makes the
next N commit calls fail halfway (the request is read, then a 500 is answered), as a Hub outage mid-upload would.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)


class MockHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.fail_commits = 0
        self.failed = 0
        self.tokens: list[str] = []  # Authorization headers seen (to check the token comes from the environment)
        self.requests: list[dict] = []  # repository creation requests, as sent
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _reply(self, code: int, body: dict | None = None) -> None:
                data = json.dumps(body or {}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_HEAD(self):
                self._reply(404)

            def do_GET(self):
                self._reply(404, {"error": "not served by the mock"})

            def do_POST(self):
                hub.tokens.append(self.headers.get("Authorization", ""))
                body = self._body()
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    hub.requests.append(req)
                    hub.repos.setdefault(repo_id, Repo(private=bool(req.get("private")) or req.get("visibility") == "private"))
                    return self._reply(200, {"url": f"{hub.url}/{repo_id}"})
                if path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                parts = path.split("/")  # /api/models/ORG/NAME/(preupload|commit)/REV
                if len(parts) >= 7 and parts[1] == "api" and parts[2] == "models":
                    repo_id, action = f"{parts[3]}/{parts[4]}", parts[5]
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._reply(404, {"error": f"repository {repo_id} not found"})
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                    if action == "commit":
                        if hub.fail_commits > 0:
                            hub.fail_commits -= 1
                            hub.failed += 1
                            return self._reply(500, {"error": "upstream timed out"})
                        header, files = None, {}
                        for line in body.decode().splitlines():
                            item = json.loads(line)
                            if item["key"] == "header":
                                header = item["value"]
                            elif item["key"] == "file":
                                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        repo.files.update(files)
                        oid = f"{len(repo.commits) + 1:040x}"
                        repo.commits.append({"summary": header["summary"], "files": sorted(files), "oid": oid})
                        return self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})
                self._reply(404, {"error": f"unknown endpoint {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> MockHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
