"""Who may call what: bearer tokens with roles, and the server's TLS credentials."""

from __future__ import annotations

import hmac
import ssl
from pathlib import Path

import grpc

from lifelong_memory.server.errors import PermissionDenied, Unauthenticated

READ_ONLY = "read-only"  # query without update, inspect, export
READ_WRITE = "read-write"  # everything
ROLES = (READ_ONLY, READ_WRITE)


class TokenAuth:
    """Bearer tokens (``authorization: Bearer <token>`` metadata), each with a role.

    The token file has one ``ROLE TOKEN`` pair per line; blank lines and lines
    starting with # are skipped. Tokens never appear in errors or logs.
    """

    def __init__(self, tokens: dict[str, str]):
        bad = {role for role in tokens.values() if role not in ROLES}
        if bad:
            raise ValueError(f"unknown roles {sorted(bad)}; roles are {ROLES}")
        if not tokens:
            raise ValueError("no tokens given")
        self._tokens = [(token.encode(), role) for token, role in tokens.items()]

    @classmethod
    def from_file(cls, path: Path | str) -> TokenAuth:
        tokens = {}
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or parts[0] not in ROLES:
                raise ValueError(f"{path}:{number}: expected 'ROLE TOKEN' with ROLE one of {ROLES}")
            if parts[1] in tokens:  # which line would win is no way to change a token's role
                raise ValueError(f"{path}:{number}: this token is on line {tokens[parts[1]][1]} already")
            tokens[parts[1]] = parts[0], number
        return cls({token: role for token, (role, _) in tokens.items()})

    def authorize(self, metadata, write: bool) -> str:
        """The caller's role; Unauthenticated without a known token, PermissionDenied for a write it may not do."""
        role = self.authenticate(metadata)
        if write and role != READ_WRITE:
            raise PermissionDenied("this token is read-only: it may query without update and inspect, not write")
        return role

    def authenticate(self, metadata) -> str:
        """The caller's role; Unauthenticated without a known token."""
        values = [value for key, value in metadata or () if key == "authorization"]
        if not values:
            raise Unauthenticated("this server requires a token: send metadata 'authorization: Bearer <token>'")
        scheme, _, token = values[0].partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("the authorization metadata must read 'Bearer <token>'")
        found = None
        for known, role in self._tokens:  # compare against every token, in constant time each
            if hmac.compare_digest(known, token.strip().encode()):
                found = role
        if found is None:
            raise Unauthenticated("unknown token")
        return found


def server_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    """TLS with this server's PEM certificate and key; with ``client_ca``, clients must present a
    certificate that CA signed (mutual TLS)."""
    try:  # gRPC would only fail to bind the port, without saying why
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ValueError(f"--tls-cert {cert} and --tls-key {key}: not a PEM certificate and its key ({exc})") from None
    if client_ca:
        try:
            ssl.create_default_context(cafile=client_ca)
        except ssl.SSLError as exc:
            raise ValueError(f"--tls-client-ca {client_ca}: no PEM certificate ({exc})") from None
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=Path(client_ca).read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )
