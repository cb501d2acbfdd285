"""The Kubernetes API over aiohttp: GET (list and watch) and merge-patch by path, with the credentials of the
pod's service account or of a kubeconfig. The agent needs five list/watch paths and one status patch; a generated
client (kubernetes_asyncio: 39 MiB of RSS for its models) was most of what the agent held in Kubernetes mode.

Credentials, as client-go reads them: in a pod, the service account's token (re-read, since the kubelet rotates
bound tokens) and CA, and the API server from KUBERNETES_SERVICE_HOST/PORT; else a kubeconfig's current context:
the cluster's server and CA (file or data, or insecure-skip-tls-verify) and the user's token, tokenFile, client
certificate and key (file or data), username and password, or an exec plugin (client.authentication.k8s.io
ExecCredential). A field the agent cannot use is an error naming the file and the field.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import ssl
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from sidecarless.sources.kubernetes_config import KubeConfigError

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REREAD_S = 60.0  # client-go re-reads a token file this often: the kubelet rotates bound tokens
EXEC_TIMEOUT_S = 30.0
MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass
class Credentials:
    server: str
    ssl_context: ssl.SSLContext | None = None  # None: aiohttp's default verification (or none for http://)
    token: str | None = None
    token_file: Path | None = None
    basic_auth: tuple[str, str] | None = None
    exec_plugin: Mapping[str, Any] | None = None  # users[].user.exec
    server_name: str | None = None  # clusters[].cluster.tls-server-name: the name the certificate is checked for
    source: str = ""  # where they were read, for errors
    _token_read: tuple[float, str] = field(default=(0.0, ""), repr=False)
    _exec_token: tuple[float, str] = field(default=(0.0, ""), repr=False)  # (expires, token)

    def headers(self) -> dict[str, str]:
        token = self._bearer()
        if token:
            return {"Authorization": f"Bearer {token}"}
        if self.basic_auth is not None:
            encoded = base64.b64encode(":".join(self.basic_auth).encode()).decode()
            return {"Authorization": f"Basic {encoded}"}
        return {}

    def _bearer(self) -> str | None:
        if self.token_file is not None:
            read_at, token = self._token_read
            if time.monotonic() - read_at > TOKEN_REREAD_S or not token:
                try:
                    token = self.token_file.read_text().strip()
                except OSError as error:
                    raise KubeConfigError(f"{self.source}: token file {self.token_file}: {error.strerror}") from None
                self._token_read = (time.monotonic(), token)
            return token
        if self.exec_plugin is not None:
            expires, token = self._exec_token
            if not token or time.time() >= expires:
                self._exec_token = run_exec_plugin(self.exec_plugin, self.source)
            return self._exec_token[1]
        return self.token


def in_cluster_credentials(
    directory: Path = SERVICE_ACCOUNT_DIR, environ: Mapping[str, str] = os.environ
) -> Credentials:
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise KubeConfigError(
            "not in a pod (KUBERNETES_SERVICE_HOST/PORT unset): give --k8s-kubeconfig-path or --k8s-api-server"
        )
    ca_file, token_file = directory / "ca.crt", directory / "token"
    for needed in (ca_file, token_file):
        if not needed.exists():
            raise KubeConfigError(f"in-cluster: {needed} is missing (is the service account token mounted?)")
    context = ssl.create_default_context(cafile=str(ca_file))
    server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    return Credentials(server, context, token_file=token_file, source="in-cluster service account")


def kubeconfig_credentials(path: Path) -> Credentials:
    """The current context of the kubeconfig at `path` (a single file; relative paths are from its folder)."""
    where = str(path)
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as error:
        raise KubeConfigError(f"{where}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise KubeConfigError(f"{where}: not YAML: {error}") from None
    if not isinstance(document, dict):
        raise KubeConfigError(f"{where}: not a kubeconfig (a mapping with clusters, users and contexts)")
    context_name = document.get("current-context")
    if not context_name:
        raise KubeConfigError(f"{where}: current-context: not set")
    context = _named(document, "contexts", context_name, "context", where)
    cluster = _named(document, "clusters", context.get("cluster"), "cluster", where)
    user = _named(document, "users", context.get("user"), "user", where) if context.get("user") else {}
    folder = path.parent
    server = cluster.get("server")
    if not isinstance(server, str) or not server:
        raise KubeConfigError(f"{where}: clusters[{context['cluster']}].cluster.server: not set")
    credentials = Credentials(server, source=where)
    user_where = f"{where}: users[{context.get('user')}].user"
    if server.startswith("https://"):
        cluster_where = f"{where}: clusters[{context['cluster']}].cluster"
        credentials.ssl_context = _ssl_context(cluster, user, folder, cluster_where, user_where)
        credentials.server_name = cluster.get("tls-server-name") or None
    for unsupported in ("auth-provider",):
        if unsupported in user:
            raise KubeConfigError(f"{user_where}.{unsupported}: not supported (use exec, a token or a certificate)")
    if "token" in user:
        credentials.token = str(user["token"])
    elif "tokenFile" in user:
        credentials.token_file = folder / str(user["tokenFile"])
    elif "exec" in user:
        if not isinstance(user["exec"], dict) or not user["exec"].get("command"):
            raise KubeConfigError(f"{user_where}.exec.command: not set")
        credentials.exec_plugin = {**user["exec"], "_folder": str(folder)}
    elif "username" in user:
        credentials.basic_auth = (str(user["username"]), str(user.get("password", "")))
    return credentials


def _named(document: dict[str, Any], section: str, name: Any, key: str, where: str) -> dict[str, Any]:
    for entry in document.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(key)
            if not isinstance(value, dict):
                raise KubeConfigError(f"{where}: {section}[{name}].{key}: not a mapping")
            return value
    raise KubeConfigError(f"{where}: {section}: no entry named {name!r}")


def _ssl_context(
    cluster: dict[str, Any], user: dict[str, Any], folder: Path, cluster_where: str, user_where: str
) -> ssl.SSLContext:
    if cluster.get("insecure-skip-tls-verify"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif "certificate-authority-data" in cluster:
        pem = _decoded(cluster["certificate-authority-data"], f"{cluster_where}.certificate-authority-data")
        context = _loaded(lambda: ssl.create_default_context(cadata=pem.decode()), cluster_where)
    elif "certificate-authority" in cluster:
        ca_file = folder / str(cluster["certificate-authority"])
        context = _loaded(lambda: ssl.create_default_context(cafile=str(ca_file)), cluster_where)
    else:
        context = ssl.create_default_context()
    certificate = _pem(user, "client-certificate", folder, user_where)
    key = _pem(user, "client-key", folder, user_where)
    if certificate is not None and key is not None:
        # ssl loads a chain from files only: written to a private temporary folder, read, removed.
        with tempfile.TemporaryDirectory(prefix="sidecarless-kube-") as private:
            cert_path, key_path = Path(private, "cert.pem"), Path(private, "key.pem")
            cert_path.write_bytes(certificate)
            key_path.write_bytes(key)
            _loaded(lambda: context.load_cert_chain(str(cert_path), str(key_path)), f"{user_where}.client-certificate")
    elif (certificate is None) != (key is None):
        raise KubeConfigError(f"{user_where}: a client certificate needs both client-certificate and client-key")
    return context


def _pem(user: dict[str, Any], name: str, folder: Path, where: str) -> bytes | None:
    if f"{name}-data" in user:
        return _decoded(user[f"{name}-data"], f"{where}.{name}-data")
    if name in user:
        try:
            return (folder / str(user[name])).read_bytes()
        except OSError as error:
            raise KubeConfigError(f"{where}.{name}: {user[name]}: {error.strerror}") from None
    return None


def _decoded(value: Any, where: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except ValueError:
        raise KubeConfigError(f"{where}: not base64") from None


def _loaded(load: Any, where: str) -> Any:
    try:
        return load()
    except (ssl.SSLError, OSError) as error:
        raise KubeConfigError(f"{where}: {error}") from None


def run_exec_plugin(plugin: Mapping[str, Any], where: str) -> tuple[float, str]:
    """client-go's exec credential plugin: the command prints an ExecCredential; returns (expires, token)."""
    command = [str(plugin["command"]), *(str(arg) for arg in plugin.get("args") or [])]
    environment = {**os.environ, **{str(e["name"]): str(e["value"]) for e in plugin.get("env") or []}}
    api_version = str(plugin.get("apiVersion", "client.authentication.k8s.io/v1"))
    info = {"apiVersion": api_version, "kind": "ExecCredential", "spec": {"interactive": False}}
    environment["KUBERNETES_EXEC_INFO"] = json.dumps(info)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=EXEC_TIMEOUT_S, env=environment,
                              cwd=str(plugin.get("_folder", ".")), check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as error:
        raise KubeConfigError(f"{where}: exec plugin {command[0]}: {error}") from None
    if done.returncode != 0:
        raise KubeConfigError(f"{where}: exec plugin {command[0]} exited {done.returncode}: {done.stderr.strip()}")
    try:
        status = json.loads(done.stdout)["status"]
        token = str(status["token"])
    except (ValueError, KeyError, TypeError):
        raise KubeConfigError(f"{where}: exec plugin {command[0]}: no status.token in its output") from None
    expires = status.get("expirationTimestamp")
    until = datetime.fromisoformat(expires.replace("Z", "+00:00")).timestamp() - 10 if expires else float("inf")
    return until, token


class KubeApi:
    """Requests to one API server; open it on the event loop that uses it."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self.credentials.ssl_context or True)
            self._session = aiohttp.ClientSession(self.credentials.server.rstrip("/"), connector=connector)
        return self._session

    @contextlib.asynccontextmanager
    async def get(
        self, path: str, params: Mapping[str, str], timeout: aiohttp.ClientTimeout
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        headers = {"Accept": "application/json", **await self._auth_headers()}
        session, name = self._open(), self.credentials.server_name
        async with session.get(path, params=params, headers=headers, timeout=timeout, server_hostname=name) as response:
            yield response

    async def merge_patch(self, path: str, body: Mapping[str, Any], timeout: aiohttp.ClientTimeout) -> None:
        headers = {"Content-Type": MERGE_PATCH, "Accept": "application/json", **await self._auth_headers()}
        data = json.dumps(body).encode()
        session, name = self._open(), self.credentials.server_name
        async with session.patch(path, data=data, headers=headers, timeout=timeout, server_hostname=name) as response:
            if response.status >= 300:
                raise ApiError(response.status, message_of(await response.read()))

    async def _auth_headers(self) -> dict[str, str]:
        """An exec plugin runs for up to seconds when its token expires: in a thread, never on the event loop
        (which serves Envoy's xDS stream)."""
        if self.credentials.exec_plugin is not None:
            return await asyncio.to_thread(self.credentials.headers)
        return self.credentials.headers()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def message_of(body: bytes) -> str:
    """The message of an API server's Status body, or the start of whatever came back."""
    try:
        return str(json.loads(body).get("message", ""))
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace")
