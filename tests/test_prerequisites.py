"""Programs some tests need (wrk, nginx): outside CI their tests skip and name the package to
install; in CI, which installs them, a missing one fails the run."""

import pytest

from support import required_program


def test_a_missing_program_skips_outside_ci_naming_its_package(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pytest.skip.Exception, match=r"apt-get install wrk"):
        required_program("wrk", "wrk")


def test_a_missing_program_fails_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pytest.fail.Exception, match=r"nginx is not installed"):
        required_program("nginx", "nginx")


def test_an_installed_program_is_found(monkeypatch, tmp_path):
    program = tmp_path / "wrk"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert required_program("wrk", "wrk") == str(program)
