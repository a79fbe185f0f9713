from tests.support.processes import run_traced


def test_version():
    result = run_traced(["--version"])
    assert result.returncode == 0
    assert "autotrace" in result.stdout
