"""The agent's Kubernetes credentials (sources/kubernetes_api.py) against a real TLS server (aiohttp, certificates
made by openssl): a kubeconfig's CA, token, client certificate, tls-server-name and exec plugin, the pod's service
account (its token re-read as the kubelet rotates it), and a clear error for each kubeconfig it cannot use."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecarless.sources.kubernetes_api import (
    Credentials,
    KubeApi,
    in_cluster_credentials,
    kubeconfig_credentials,
)
from sidecarless.sources.kubernetes_config import KubeConfigError

TIMEOUT = aiohttp.ClientTimeout(total=10)
TOKEN = "secret-token"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _issue(folder: Path, name: str, subject: str, ca: str, extensions: str = "") -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(folder / f"{name}.key"), "-out", str(folder / f"{name}.csr"), "-subj", subject)  # fmt: skip
    command = ["x509", "-req", "-in", str(folder / f"{name}.csr"), "-CA", str(folder / f"{ca}.crt"),
               "-CAkey", str(folder / f"{ca}.key"), "-CAcreateserial", "-days", "1", "-out", str(folder / f"{name}.crt")]  # fmt: skip
    if extensions:
        (folder / f"{name}.ext").write_text(extensions)
        command += ["-extfile", str(folder / f"{name}.ext")]
    _openssl(*command)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(folder / f"{ca}.key"), "-out", str(folder / f"{ca}.crt"), "-days", "1",
                 "-subj", f"/CN={ca}")  # fmt: skip
    _issue(folder, "server", "/CN=kube-apiserver", "ca", "subjectAltName=IP:127.0.0.1\n")
    _issue(folder, "named", "/CN=kube-apiserver", "ca", "subjectAltName=DNS:kubernetes.default.svc\n")
    _issue(folder, "client", "/CN=system:node:node-a", "ca")
    return folder


def _data(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


async def _api_server(pki: Path, certificate: str) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """An HTTPS server that answers a pod list to a bearer token or a client certificate of its CA."""
    seen: list[dict[str, Any]] = []

    async def pods(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        subject = dict(item[0] for item in peer["subject"]) if peer else {}
        seen.append({"authorization": request.headers.get("Authorization"), "subject": subject})
        if request.headers.get("Authorization") != f"Bearer {TOKEN}" and not subject:
            return web.json_response({"kind": "Status", "message": "Unauthorized"}, status=401)
        return web.json_response({"kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": []})

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / f"{certificate}.crt"), str(pki / f"{certificate}.key"))
    context.verify_mode = ssl.CERT_OPTIONAL
    app = web.Application()
    app.router.add_get("/api/v1/pods", pods)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


@pytest.fixture
async def server(pki: Path) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    async for served in _api_server(pki, "server"):
        yield served


def _kubeconfig(folder: Path, cluster: dict[str, Any], user: dict[str, Any]) -> Path:
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "lab",
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "agent"}}],
        "clusters": [{"name": "lab", "cluster": cluster}],
        "users": [{"name": "agent", "user": user}],
    }
    path = folder / "kubeconfig"
    path.write_text(json.dumps(document))  # JSON is YAML
    return path


async def _list_status(credentials: Credentials) -> int:
    api = KubeApi(credentials)
    try:
        async with api.get("/api/v1/pods", {}, TIMEOUT) as response:
            return response.status
    finally:
        await api.close()


async def test_a_kubeconfig_with_ca_data_and_a_token_reaches_the_api_server(
    pki: Path, tmp_path: Path, server: tuple[str, list[dict[str, Any]]]
) -> None:
    url, seen = server
    path = _kubeconfig(tmp_path, {"server": url, "certificate-authority-data": _data(pki / "ca.crt")}, {"token": TOKEN})
    assert await _list_status(kubeconfig_credentials(path)) == 200
    assert seen[-1]["authorization"] == f"Bearer {TOKEN}"


async def test_a_server_certificate_of_another_ca_is_refused(
    pki: Path, tmp_path: Path, server: tuple[str, list[dict[str, Any]]]
) -> None:
    url, seen = server
    path = _kubeconfig(tmp_path, {"server": url, "certificate-authority": str(pki / "other-ca.crt")}, {"token": TOKEN})
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await _list_status(kubeconfig_credentials(path))
    assert seen == []  # the token never left


async def test_a_client_certificate_authenticates_without_a_token(
    pki: Path, tmp_path: Path, server: tuple[str, list[dict[str, Any]]]
) -> None:
    url, seen = server
    user = {"client-certificate-data": _data(pki / "client.crt"), "client-key": str(pki / "client.key")}
    path = _kubeconfig(tmp_path, {"server": url, "certificate-authority": str(pki / "ca.crt")}, user)
    assert await _list_status(kubeconfig_credentials(path)) == 200
    assert seen[-1] == {"authorization": None, "subject": {"commonName": "system:node:node-a"}}


async def test_tls_server_name_checks_the_certificate_for_that_name(pki: Path, tmp_path: Path) -> None:
    async for url, _ in _api_server(pki, "named"):
        cluster = {"server": url, "certificate-authority": str(pki / "ca.crt")}
        without = _kubeconfig(tmp_path, cluster, {"token": TOKEN})
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await _list_status(kubeconfig_credentials(without))
        named = _kubeconfig(tmp_path, {**cluster, "tls-server-name": "kubernetes.default.svc"}, {"token": TOKEN})
        assert await _list_status(kubeconfig_credentials(named)) == 200


async def test_an_exec_plugin_token_is_used_and_kept_until_it_expires(
    pki: Path, tmp_path: Path, server: tuple[str, list[dict[str, Any]]]
) -> None:
    url, seen = server
    runs = tmp_path / "runs"
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        "import json, os, sys\n"
        "info = json.loads(os.environ['KUBERNETES_EXEC_INFO'])\n"
        f"open({str(runs)!r}, 'a').write(info['kind'] + '\\n')\n"
        "print(json.dumps({'apiVersion': info['apiVersion'], 'kind': 'ExecCredential',\n"
        f"                  'status': {{'token': os.environ['TOKEN'], 'expirationTimestamp': '2999-01-01T00:00:00Z'}}}}))\n"
    )
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
                     "args": [str(plugin)], "env": [{"name": "TOKEN", "value": TOKEN}]}}  # fmt: skip
    path = _kubeconfig(tmp_path, {"server": url, "certificate-authority": str(pki / "ca.crt")}, user)
    credentials = kubeconfig_credentials(path)
    assert await _list_status(credentials) == 200
    assert await _list_status(credentials) == 200
    assert seen[-1]["authorization"] == f"Bearer {TOKEN}"
    assert runs.read_text() == "ExecCredential\n"  # run once: its token has not expired


def test_an_exec_plugin_that_fails_says_so(tmp_path: Path) -> None:
    user = {"exec": {"command": sys.executable, "args": ["-c", "import sys; sys.exit('no cloud login')"]}}
    credentials = kubeconfig_credentials(_kubeconfig(tmp_path, {"server": "https://127.0.0.1:1"}, user))
    with pytest.raises(KubeConfigError, match=r"exec plugin .* exited 1: no cloud login"):
        credentials.headers()


async def test_the_service_account_token_is_read_again_as_the_kubelet_rotates_it(
    pki: Path, tmp_path: Path, server: tuple[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, seen = server
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "ca.crt").write_bytes((pki / "ca.crt").read_bytes())
    (account / "token").write_text(TOKEN + "\n")
    port = url.rsplit(":", 1)[1]
    credentials = in_cluster_credentials(
        account, {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}
    )
    assert await _list_status(credentials) == 200
    assert seen[-1]["authorization"] == f"Bearer {TOKEN}"
    (account / "token").write_text("rotated\n")
    assert credentials.headers() == {"Authorization": f"Bearer {TOKEN}"}  # read again only after a while
    monkeypatch.setattr("sidecarless.sources.kubernetes_api.TOKEN_REREAD_S", -1.0)
    assert credentials.headers() == {"Authorization": "Bearer rotated"}


def test_outside_a_pod_without_a_kubeconfig_the_error_says_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match=r"not in a pod .*--k8s-kubeconfig-path or --k8s-api-server"):
        in_cluster_credentials(tmp_path, {})
    with pytest.raises(KubeConfigError, match="token is missing"):
        (tmp_path / "ca.crt").write_text("")
        in_cluster_credentials(tmp_path, {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"})


BAD_KUBECONFIGS = [
    ("", "not a kubeconfig"),
    ("clusters: [", "not YAML"),
    ("apiVersion: v1\nkind: Config\n", "current-context: not set"),
    ("current-context: nowhere\ncontexts: []\n", "contexts: no entry named 'nowhere'"),
    ("current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\nclusters: [{name: k, cluster: {}}]\n"
     "users: [{name: u, user: {}}]\n", "clusters[k].cluster.server: not set"),
    ("current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
     "clusters: [{name: k, cluster: {server: 'https://h', certificate-authority-data: '!!'}}]\n"
     "users: [{name: u, user: {}}]\n", "certificate-authority-data: not base64"),
    ("current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
     "clusters: [{name: k, cluster: {server: 'https://h'}}]\nusers: [{name: u, user: {auth-provider: {name: gcp}}}]\n",
     "users[u].user.auth-provider: not supported"),
    ("current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
     "clusters: [{name: k, cluster: {server: 'https://h'}}]\nusers: [{name: u, user: {client-certificate: c.pem}}]\n",
     "users[u].user.client-certificate: c.pem: No such file"),
    ("current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
     "clusters: [{name: k, cluster: {server: 'https://h'}}]\nusers: [{name: u, user: {client-key-data: QUJD}}]\n",
     "users[u].user: a client certificate needs both"),
    ("current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
     "clusters: [{name: k, cluster: {server: 'https://h', certificate-authority: missing.crt}}]\n"
     "users: [{name: u, user: {}}]\n", "clusters[k].cluster: [Errno 2] No such file"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), BAD_KUBECONFIGS)
def test_a_kubeconfig_the_agent_cannot_use_names_the_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(text)
    with pytest.raises(KubeConfigError) as raised:
        kubeconfig_credentials(path)
    assert str(raised.value).startswith(f"{path}: ") and message in str(raised.value)


def test_a_missing_kubeconfig_says_which() -> None:
    with pytest.raises(KubeConfigError, match="/nonexistent/kubeconfig: No such file"):
        kubeconfig_credentials(Path("/nonexistent/kubeconfig"))
