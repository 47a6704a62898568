"""Bearer tokens with roles, TLS and mutual TLS, over the client library and the CLI."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import subprocess
import sys

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lifelong_memory.client import PermissionDenied, Unauthenticated, Unavailable, connect
from lifelong_memory.server.admission import PROBE_CALLS_PER_PEER
from lifelong_memory.server.auth import TokenAuth, server_credentials
from lifelong_memory.server.registry import MemoryRegistry
from lifelong_memory.server.service import ServerLimits, _is_loopback, build_server

LMEM = [sys.executable, "-m", "lifelong_memory.client.cli"]
WRITER, READER = "writer-token-5f1c", "reader-token-9a7e"
CONFIG = dict(key_dim=8, memory_size=32, choose_k=4)


def unit_batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.nn.functional.normalize(torch.randn(3, 8, generator=generator), dim=1)
    return queries, torch.tensor([1, 2, 3])


@pytest.fixture(scope="module")
def token_server():
    auth = TokenAuth({WRITER: "read-write", READER: "read-only"})
    server, port = build_server("127.0.0.1:0", MemoryRegistry(), auth=auth)
    server.start()
    yield f"grpc://127.0.0.1:{port}"
    server.stop(grace=None)


def state(url: str, name: str):
    with connect(url, token=WRITER) as store:
        return store.memory(name).read_slots(range(CONFIG["memory_size"]))


def test_tokens_and_roles(token_server, caplog):
    caplog.set_level(logging.DEBUG)
    with connect(token_server, token=WRITER) as writer:
        memory = writer.create_memory("guarded", **CONFIG)
        memory.query(*unit_batch(0), update=True)
    before = state(token_server, "guarded")

    for token, error, message in ((None, Unauthenticated, "requires a token"), ("nope", Unauthenticated, "unknown")):
        with connect(token_server, token=token) as store, pytest.raises(error, match=message):
            store.list_memories()

    with connect(token_server, token=READER) as reader:
        assert [info.name for info in reader.list_memories()] == ["guarded"]
        memory = reader.memory("guarded")
        memory.query(unit_batch(1)[0])  # query without update: allowed
        memory.inspect()
        for attempt in (
            lambda: memory.query(*unit_batch(2), update=True),
            lambda: memory.update(*unit_batch(3), memory.query(*unit_batch(3))),
            lambda: memory.clear(),
            lambda: reader.create_memory("other", **CONFIG),
            lambda: reader.delete_memory("guarded"),
        ):
            with pytest.raises(PermissionDenied, match="read-only"):
                attempt()
        with memory.stream() as stream:
            stream.query(unit_batch(4)[0])
            with pytest.raises(PermissionDenied):
                stream.query(*unit_batch(5), update=True)

    after = state(token_server, "guarded")
    assert all(
        torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(before[:-1], after[:-1], strict=True)
    )
    assert before.writers == after.writers
    assert WRITER not in caplog.text and READER not in caplog.text


def test_health_needs_no_token(token_server):
    with grpc.insecure_channel(token_server.removeprefix("grpc://")) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_token_file_format(tmp_path):
    good = tmp_path / "tokens"
    good.write_text("# role token\nread-write abc\n\nread-only def\n")
    auth = TokenAuth.from_file(good)
    assert auth.authorize([("authorization", "Bearer def")], write=False) == "read-only"
    bad = tmp_path / "bad"
    bad.write_text("admin xyz\n")
    with pytest.raises(ValueError, match=":1: expected 'ROLE TOKEN'"):
        TokenAuth.from_file(bad)
    twice = tmp_path / "twice"  # a demotion appended below the old line: which one would win?
    twice.write_text("read-write abc\nread-only def\nread-only abc\n")
    with pytest.raises(ValueError, match="twice:3: this token is on line 1 already"):
        TokenAuth.from_file(twice)


def test_only_loopback_counts_as_private():
    assert _is_loopback("127.0.0.1") and _is_loopback("localhost") and _is_loopback("[::1]")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("10.1.2.3")


# ------------------------------------------------------------------------ TLS


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(subject: str, key, issuer_name: str, issuer_key, *, ca: bool, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Throwaway CA, server and client certificates, as PEM files."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    files = {}
    certificates = {"ca": (_certificate("test CA", ca_key, "test CA", ca_key, ca=True), ca_key)}
    for name, server in (("server", True), ("client", False)):
        key = _key()
        certificates[name] = (_certificate(name, key, "test CA", ca_key, ca=False, server=server), key)
    for name, (certificate, key) in certificates.items():
        files[f"{name}_cert"] = folder / f"{name}.pem"
        files[f"{name}_cert"].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        files[f"{name}_key"] = folder / f"{name}.key"
        files[f"{name}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return {k: str(v) for k, v in files.items()}


def _tls_server(pki, client_ca: bool):
    credentials = server_credentials(pki["server_cert"], pki["server_key"], pki["ca_cert"] if client_ca else None)
    server, port = build_server("127.0.0.1:0", MemoryRegistry(), credentials=credentials)
    server.start()
    return server, port


def test_tls(pki):
    server, port = _tls_server(pki, client_ca=False)
    try:
        with connect(f"grpcs://127.0.0.1:{port}", ca_cert=pki["ca_cert"], retries=0) as store:
            store.create_memory("secret", **CONFIG).query(*unit_batch(0), update=True)
        with connect(f"grpc://127.0.0.1:{port}", retries=0) as plain, pytest.raises(Unavailable):
            plain.list_memories()  # plaintext to a TLS port
    finally:
        server.stop(grace=None)


def test_mutual_tls_and_cli(pki):
    server, port = _tls_server(pki, client_ca=True)
    url = f"grpcs://127.0.0.1:{port}"
    try:
        with connect(url, ca_cert=pki["ca_cert"], retries=0) as anonymous, pytest.raises(Unavailable):
            anonymous.list_memories()  # no client certificate
        identified = dict(ca_cert=pki["ca_cert"], client_cert=pki["client_cert"], client_key=pki["client_key"])
        with connect(url, retries=0, **identified) as store:
            store.create_memory("mutual", **CONFIG)
        tls_flags = [
            "--ca-cert",
            pki["ca_cert"],
            "--client-cert",
            pki["client_cert"],
            "--client-key",
            pki["client_key"],
        ]
        listed = subprocess.run([*LMEM, "ls", "--url", url, *tls_flags], capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert "mutual" in listed.stdout
    finally:
        server.stop(grace=None)


def test_cli_token_and_exit_codes(token_server):
    def lmem(*args, env_token=None):
        env = {"PATH": "/usr/bin:/bin"} | ({"LMEM_TOKEN": env_token} if env_token else {})
        return subprocess.run(
            [*LMEM, *args, "--url", token_server], capture_output=True, text=True, env=env, timeout=60
        )

    missing = lmem("ls")
    assert missing.returncode == 7 and "UNAUTHENTICATED" in missing.stderr
    denied = lmem("create", "cli-made", "--key-dim", "8", "--memory-size", "16", env_token=READER)
    assert denied.returncode == 6 and "PERMISSION_DENIED" in denied.stderr
    created = lmem("create", "cli-made", "--key-dim", "8", "--memory-size", "16", "--token", WRITER)
    assert created.returncode == 0, created.stderr
    assert WRITER not in created.stdout + created.stderr


def test_a_certificate_or_key_that_is_no_pem_is_named_not_taken_for_a_busy_port(pki, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=f"--tls-cert {junk} and --tls-key {junk}: not a PEM certificate"):
        server_credentials(str(junk), str(junk))
    with pytest.raises(ValueError, match="--tls-cert .* and --tls-key .*: not a PEM certificate and its key"):
        server_credentials(pki["server_cert"], pki["client_key"])  # another certificate's key
    with pytest.raises(ValueError, match=f"--tls-client-ca {junk}: no PEM certificate"):
        server_credentials(pki["server_cert"], pki["server_key"], str(junk))
    assert server_credentials(pki["server_cert"], pki["server_key"], pki["ca_cert"]) is not None


def test_health_watches_without_a_token_cannot_take_the_calls_token_holders_need():
    """A health Watch lasts as long as its client wants and needs no token: in the MemoryService's pool, 16 of
    them took every call of this server and refused the token holder."""
    server, port = build_server(
        "127.0.0.1:0", MemoryRegistry(), ServerLimits(max_calls=16), auth=TokenAuth({WRITER: "read-write"})
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watches = [stub.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(PROBE_CALLS_PER_PEER)]
            for watch in watches:  # each serving, and held
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as refused:
                stub.Check(health_pb2.HealthCheckRequest(service=""))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"at most {PROBE_CALLS_PER_PEER} health or reflection calls at once" in refused.value.details()
            with connect(f"grpc://127.0.0.1:{port}", token=WRITER, retries=0) as store:
                for _ in range(2 * 16):
                    assert store.list_memories() == []
            for watch in watches:
                watch.cancel()
    finally:
        server.stop(grace=None)
