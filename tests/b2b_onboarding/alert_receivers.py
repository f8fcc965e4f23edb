"""Local receivers for the failure alerts: a minimal SMTP server and an HTTP(S) webhook, each in a
thread, keeping what they receive. Standard library only (no aiosmtpd, no smtpd)."""

from __future__ import annotations

import email
import email.header
import json
import socketserver
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Mail:
    sender: str
    recipients: list[str]
    message: Message

    @property
    def subject(self) -> str:
        return str(email.header.make_header(email.header.decode_header(self.message["Subject"])))

    @property
    def html(self) -> str:
        part = next(part for part in self.message.walk() if part.get_content_type() == "text/html")
        return part.get_payload(decode=True).decode(part.get_content_charset() or "utf-8")


@dataclass
class Inbox:
    host: str
    port: int
    mails: list[Mail] = field(default_factory=list)


class _SmtpHandler(socketserver.StreamRequestHandler):
    """RFC 5321 as far as smtplib's sendmail needs it: EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT."""

    def reply(self, text: str) -> None:
        self.wfile.write(text.encode() + b"\r\n")

    def handle(self) -> None:
        inbox: Inbox = self.server.inbox  # type: ignore[attr-defined]
        self.reply("220 localhost test SMTP receiver")
        sender, recipients = "", []
        while line := self.rfile.readline():
            command = line.decode("utf-8", "replace").strip()
            verb = command.split(" ", 1)[0].upper()
            if verb == "EHLO":
                self.reply("250-localhost\r\n250 8BITMIME")
            elif verb in ("HELO", "NOOP", "RSET"):
                sender, recipients = (sender, recipients) if verb == "NOOP" else ("", [])
                self.reply("250 OK")
            elif command.upper().startswith("MAIL FROM:"):
                sender = command[10:].split()[0].strip("<>")
                self.reply("250 OK")
            elif command.upper().startswith("RCPT TO:"):
                recipients.append(command[8:].split()[0].strip("<>"))
                self.reply("250 OK")
            elif verb == "DATA":
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                lines = []
                while (data := self.rfile.readline()) not in (b".\r\n", b".\n", b""):
                    lines.append(data[1:] if data.startswith(b"..") else data)
                inbox.mails.append(Mail(sender, recipients, email.message_from_bytes(b"".join(lines))))
                sender, recipients = "", []
                self.reply("250 OK: queued")
            elif verb == "QUIT":
                self.reply("221 Bye")
                return
            else:
                self.reply("502 Command not implemented")


class _ThreadingTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextmanager
def smtp_receiver() -> Iterator[Inbox]:
    server = _ThreadingTCPServer(("127.0.0.1", 0), _SmtpHandler)
    server.inbox = Inbox("127.0.0.1", server.server_address[1])  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.inbox  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Posted:
    path: str
    headers: dict[str, str]
    body: dict


@dataclass
class Webhook:
    url: str
    posts: list[Posted] = field(default_factory=list)
    status: int = 200  # what the receiver answers


@contextmanager
def webhook_receiver(path: str = "/hooks/b2b-alerts", tls: tuple[Path, Path] | None = None) -> Iterator[Webhook]:
    """An HTTP webhook; with `tls` (a server certificate and its key), an HTTPS one."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            hook.posts.append(Posted(self.path, dict(self.headers.items()), json.loads(body)))
            self.send_response(hook.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        # A client that refuses the certificate fails the handshake at accept(): the server drops it.
        server.socket = context.wrap_socket(server.socket, server_side=True)
    hook = Webhook(f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}{path}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hook
    finally:
        server.shutdown()
        server.server_close()


def smtp_connection(inbox: Inbox, to: list[str], from_email: str = "airflow@b2b.example") -> str:
    """`AIRFLOW_CONN_B2B_ALERTS` for the receiver: plain SMTP, no TLS (a local test server)."""
    return json.dumps({"conn_type": "smtp", "host": inbox.host, "port": inbox.port, "extra": {
        "to": to, "from_email": from_email, "disable_ssl": True, "disable_tls": True, "timeout": 10,
        "retry_limit": 0}})  # fmt: skip


def webhook_connection(hook: Webhook, token: str | None = None) -> str:
    """`AIRFLOW_CONN_B2B_ALERTS` for the receiver: the whole URL in the host."""
    return json.dumps({"conn_type": "http", "host": hook.url, **({"password": token} if token else {})})
