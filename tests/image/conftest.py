"""`make test-image`: the image `make image` built, run in the lab. The e2e tier's prerequisites hold here too."""

from tests.e2e.conftest import _children_take_sigint, _require_prerequisites

__all__ = ["_children_take_sigint", "_require_prerequisites"]
