"""TLS for the MQTT connections (``[mqtt.tls]``): no paho here, so ``check-config`` can test the files."""

from __future__ import annotations

import ssl
from typing import Any

from agent.config import Config
from agent.errors import ConfigError


class TlsContext(ssl.SSLContext):
    """An SSLContext that remembers the socket it wrapped last: paho leaves a socket whose TLS handshake
    failed (untrusted certificate, wrong host name) unclosed, so the link closes it after a failed connect."""

    last_socket: ssl.SSLSocket | None = None

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        self.last_socket = sock
        return sock

    def close_failed_socket(self) -> None:
        sock, self.last_socket = self.last_socket, None
        if sock is not None:
            sock.close()


def build_tls_context(config: Config) -> TlsContext | None:
    """The TLS context for ``[mqtt.tls]`` (None without it). ConfigError names the key and the file that
    cannot be read or loaded."""
    tls = config.mqtt.tls
    if tls is None:
        return None
    files = {"ca_file": tls.ca_file, "cert_file": tls.cert_file, "key_file": tls.key_file}
    for key, path in files.items():
        if path is None:
            continue
        try:
            with path.open("rb"):
                pass
        except OSError as err:
            raise ConfigError(f"mqtt.tls.{key}: cannot read {path}: {err.strerror or err}") from err
    # As ssl.create_default_context(): certificate and host name verified, TLS >= 1.2.
    context = TlsContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if tls.ca_file is not None:
            context.load_verify_locations(cafile=str(tls.ca_file))
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"mqtt.tls.ca_file: cannot load CA certificates from {tls.ca_file}: {err}") from err
    if tls.cert_file is not None:
        try:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
        except (OSError, ssl.SSLError) as err:
            key = f" with key {tls.key_file}" if tls.key_file else ""
            raise ConfigError(f"mqtt.tls.cert_file: cannot load the client certificate {tls.cert_file}{key}: "
                              f"{err}") from err
    if tls.insecure_skip_hostname_check:
        context.check_hostname = False  # MqttLink warns about it (not check-config: it runs it too)
    return context
