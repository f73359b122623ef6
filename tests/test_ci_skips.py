"""In CI (`CI` set), a test that `pytest.importorskip`s a module scripts/setup.sh installs fails, and so does a test
module that does it at its top, instead of skipping: the install is broken. Outside CI, and in CI for modules setup
does not install or for other reasons (no GPU), they still skip."""
import pytest

import tests.conftest

pytest_plugins = ["pytester"]

ABSENT = "absent_setup_module"
TESTS = {
    "test_module_level": f"import pytest\npytest.importorskip({ABSENT!r})\n\ndef test_it():\n    pass\n",
    "test_in_test": f"import pytest\n\ndef test_it():\n    pytest.importorskip({ABSENT!r}, reason='setup installs it')\n",
    "test_others": ("import pytest\n\n"
                    "def test_optional():\n    pytest.importorskip('absent_optional_module')\n\n"
                    "def test_gpu():\n    pytest.skip('needs a GPU')\n\n"
                    "def test_present():\n    assert pytest.importorskip('json').dumps(1) == '1'\n"),
}


@pytest.fixture
def project(pytester, monkeypatch):
    """The tests above, run with the hooks of tests/conftest.py, `ABSENT` counted among what setup installs."""
    monkeypatch.setattr(tests.conftest, "SETUP_INSTALLS", tests.conftest.SETUP_INSTALLS | {ABSENT})
    pytester.makeconftest("from tests.conftest import pytest_configure, pytest_unconfigure\n")
    pytester.makepyfile(**TESTS)
    return pytester


@pytest.mark.parametrize("ci", ["true", "1"])
def test_in_ci_a_missing_setup_module_fails_where_it_would_skip(project, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    result = project.runpytest("-rs", "--continue-on-collection-errors")
    result.assert_outcomes(passed=1, failed=1, errors=1, skipped=2)
    result.stdout.fnmatch_lines([f"*CI={ci}: {ABSENT} does not import (*), yet scripts/setup.sh installs it*"])
    result.stdout.fnmatch_lines(["*SKIPPED*needs a GPU*"])


@pytest.mark.parametrize("ci", [None, "", "false"])
def test_outside_ci_every_such_test_skips(project, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    result = project.runpytest("-rs", "--continue-on-collection-errors")
    result.assert_outcomes(passed=1, skipped=4)
    result.stdout.fnmatch_lines(["*SKIPPED*test_in_test.py:4: setup installs it"])  # the test's line, not the hook's
