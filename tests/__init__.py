import os

import pytest

# gRPC core logs through absl, and with GRPC_VERBOSITY unset it leaves absl's threshold
# at INFO: every connection a stopping server cuts prints "Got goaway". ERROR is what
# `make run` and the image set too (README "Settings"). Read once, when grpc is first
# imported: this package is imported before any test module or conftest.py, and the
# processes the tests start inherit it.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

# The shared helpers assert too: rewritten like the tests, so that their failures show the values compared.
pytest.register_assert_rewrite("tests.support")
