from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


@pytest.fixture
def billing_policy_text() -> str:
    return (EXAMPLES / "billing-api" / "policies" / "billing-api.yaml").read_text()
