"""The HTTP server under the REST API: bounded connections, socket timeout, TLS, graceful stop."""

import http.server
import json
import logging
import select
import socket
import sys
import threading
import time

logger = logging.getLogger("serving.rest")


def make_handler(api, max_body_bytes):
    """The `BaseHTTPRequestHandler` class serving `api` (bodies up to `max_body_bytes`)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, status, body):
            data = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.server.closing:
                self.close_connection = True
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def _serve(self, method, body):
            if self.server.closing:
                self._reply(503, {"error": "The server is shutting down; retry elsewhere."})
                return
            with self.server.in_flight():
                self._reply(*api.handle(method, self.path, body))

        def do_GET(self):
            self._serve("GET", None)

        def do_POST(self):
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > max_body_bytes:
                self.close_connection = True
                self._reply(
                    413,
                    {"error": f"Request body must be 0..{max_body_bytes} bytes; "
                     f"Content-Length is {str(self.headers.get('Content-Length'))[:40]}."},
                )
                return
            body = self.rfile.read(length)
            if len(body) < length:  # the client went away mid-body
                self.close_connection = True
                return
            self._serve("POST", body)

        def log_message(self, fmt, *args):
            logger.debug("REST %s - %s", self.address_string(), fmt % args)

    return Handler


_TOO_MANY = json.dumps(
    {"error": "Too many open connections to the REST endpoint; retry later."}
).encode()


class RestServer(http.server.ThreadingHTTPServer):
    """A thread-per-connection HTTP server with a bound on connections and a socket timeout.

    Beyond `max_connections` open connections a new one is answered 429 at once and closed
    (without TLS; with TLS it is closed, since answering would need a handshake first); every
    connection times out after `timeout` seconds without progress, so a slow client cannot hold
    a thread forever. `begin_shutdown` stops accepting (the listening socket closes) and
    `wait_idle` waits for the requests in flight.

    Args:
        address: (host, port).
        handler: the request handler class (`make_handler`).
        max_connections: connections served at once.
        timeout: seconds of socket inactivity before a connection is dropped.
        ssl_context: optional `ssl.SSLContext` (server side) for HTTPS.
        reuse_port: set SO_REUSEPORT, so that several processes can listen on the port.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, max_connections=64, timeout=30.0, ssl_context=None,
                 reuse_port=False):
        self.reuse_port = bool(reuse_port)
        super().__init__(address, handler)
        self.max_connections = int(max_connections)
        self.connection_timeout = float(timeout)
        self.ssl_context = ssl_context
        self.closing = False
        self.num_refused = 0
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._active = 0
        self._idle = threading.Condition()

    def server_bind(self):
        if self.reuse_port:  # socketserver's own `allow_reuse_port` needs Python >= 3.11
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def in_flight(self):
        server = self

        class _InFlight:
            def __enter__(self):
                with server._idle:
                    server._active += 1

            def __exit__(self, *exc):
                with server._idle:
                    server._active -= 1
                    server._idle.notify_all()

        return _InFlight()

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.num_refused += 1
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def _refuse(self, request):
        try:
            if self.ssl_context is None:
                # Read what the client already sent, so that closing does not reset the
                # connection before it reads the answer.
                if select.select([request], [], [], 0.05)[0]:
                    request.recv(65536)
                request.sendall(
                    b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\nContent-Length: " + str(len(_TOO_MANY)).encode()
                    + b"\r\n\r\n" + _TOO_MANY
                )
                request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request, client_address):
        request.settimeout(self.connection_timeout)
        if self.ssl_context is not None:
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (OSError, ValueError) as e:
                logger.debug("TLS handshake with %s failed: %s", client_address, e)
                return
            try:
                super().finish_request(request, client_address)
            finally:
                request.close()
            return
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address):
        # A client that disconnects or times out mid-request is routine, not a server error.
        logger.debug("REST connection from %s ended: %s", client_address, sys.exc_info()[1])

    def begin_shutdown(self):
        """Stop accepting connections; requests on open connections get 503."""
        self.closing = True
        self.shutdown()
        self.server_close()

    def wait_idle(self, timeout):
        """Wait up to `timeout` seconds for the requests in flight; True when none is left."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._active:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True
