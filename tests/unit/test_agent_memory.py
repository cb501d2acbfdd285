"""What the agent loads (issue 19): nothing it does not use."""

import subprocess
import sys


def test_the_agent_loads_neither_bcc_nor_a_generated_kubernetes_client() -> None:
    """Issue 19: BCC and LLVM cost the agent about 100 MiB (a short-lived child compiles the programs,
    redirect/compile_programs.py, and the agent opens them pinned); kubernetes_asyncio's generated models cost it
    39 MiB in Kubernetes mode (sources/kubernetes_api.py makes the few requests it needs)."""
    probe = (
        "import sys, sidecarless.cli.main, sidecarless.cli.agent, sidecarless.agent.agent, sidecarless.agent.config\n"
        "import sidecarless.redirect.bpf, sidecarless.sources.kubernetes\n"
        "loaded = sorted({'bcc', 'kubernetes_asyncio', 'kubernetes'} & set(sys.modules))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)
