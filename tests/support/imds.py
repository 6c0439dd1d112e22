#!/usr/bin/env python3
"""A stand-in for the EC2 instance metadata service (169.254.169.254) in IMDSv2-only mode,
for the tests: the real one cannot run off EC2, and moto's omits the token TTL header that the
AWS SDK for Rust requires. It follows the documented contract:

- PUT /latest/api/token needs X-aws-ec2-metadata-token-ttl-seconds (1..21600), answers a
  token and echoes the TTL header;
- every GET needs X-aws-ec2-metadata-token with a token it issued, else 401 (IMDSv1 refused);
- /latest/meta-data/iam/security-credentials/ names the role, .../<role> gives temporary
  credentials as JSON, /latest/meta-data/placement/region the region.

Each request is logged on stderr as: METHOD PATH STATUS.
Usage: imds.py PORT ROLE REGION
"""
import datetime
import json
import secrets
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, ROLE, REGION = int(sys.argv[1]), sys.argv[2], sys.argv[3]
TOKENS = set()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, status, body="", headers=()):
        data = body.encode()
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        sys.stderr.write(f"{self.command} {self.path} {status}\n")
        sys.stderr.flush()

    def log_message(self, *args):
        pass

    def do_PUT(self):
        if self.path != "/latest/api/token":
            return self.reply(404)
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return self.reply(400)
        token = secrets.token_urlsafe(32)
        TOKENS.add(token)
        self.reply(200, token, [("X-aws-ec2-metadata-token-ttl-seconds", ttl)])

    def do_GET(self):
        if self.headers.get("X-aws-ec2-metadata-token") not in TOKENS:
            return self.reply(401)
        now = datetime.datetime.now(datetime.timezone.utc)
        creds = {
            "Code": "Success",
            "LastUpdated": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "Type": "AWS-HMAC",
            "AccessKeyId": "ASIAIMDSSTANDIN",
            "SecretAccessKey": "imds-stand-in-secret",
            "Token": "imds-stand-in-session-token",
            "Expiration": (now + datetime.timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        pages = {
            "/latest/meta-data/iam/security-credentials/": ROLE,
            f"/latest/meta-data/iam/security-credentials/{ROLE}": json.dumps(creds),
            "/latest/meta-data/placement/region": REGION,
        }
        if self.path not in pages:
            return self.reply(404)
        self.reply(200, pages[self.path])


ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
