"""What the agent loads (issue 19): nothing it does not use."""

import subprocess
import sys


def test_an_agent_on_files_never_loads_the_kubernetes_client() -> None:
    """Issue 19: kubernetes_asyncio's generated models cost the agent 39 MiB; only the Kubernetes source needs
    them."""
    probe = (
        "import sys, sidecarless.cli.main, sidecarless.cli.agent, sidecarless.agent.agent, sidecarless.agent.config\n"
        "assert 'kubernetes_asyncio' not in sys.modules, 'loaded'\n"
        "import sidecarless.sources.kubernetes\n"
        "assert 'kubernetes_asyncio' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)
