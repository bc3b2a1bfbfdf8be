import pytest

# The shared helpers assert too: rewritten like the tests, so that their failures show the values compared.
pytest.register_assert_rewrite("tests.support")
