"""Which chromium the browser tests drive, and what happens where there is none: a user's run skips with the
reason, CI (CIRCOT_REQUIRE_BROWSER=1) fails."""

import stat

import pytest

from tests.conftest import chromium_path


def test_circot_chromium_names_the_executable(tmp_path, monkeypatch):
    exe = tmp_path / "my-chromium"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CIRCOT_CHROMIUM", str(exe))
    assert chromium_path() == str(exe)


def test_without_chromium_a_user_run_skips_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.delenv("CIRCOT_CHROMIUM", raising=False)
    monkeypatch.delenv("CIRCOT_REQUIRE_BROWSER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))   # no chromium on it
    with pytest.raises(pytest.skip.Exception, match="chromium not found: apt-get install chromium"):
        chromium_path()


def test_without_chromium_ci_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCOT_REQUIRE_BROWSER", "1")
    monkeypatch.setenv("CIRCOT_CHROMIUM", str(tmp_path / "absent"))
    with pytest.raises(pytest.fail.Exception, match="CIRCOT_REQUIRE_BROWSER=1"):
        chromium_path()
    monkeypatch.delenv("CIRCOT_CHROMIUM")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="apt-get install chromium"):
        chromium_path()


def test_a_named_file_that_cannot_run_is_not_chromium(tmp_path, monkeypatch):
    monkeypatch.delenv("CIRCOT_REQUIRE_BROWSER", raising=False)
    exe = tmp_path / "chromium"
    exe.write_text("not a program")
    exe.chmod(0o644)   # no execute bit: refused, by root too
    monkeypatch.setenv("CIRCOT_CHROMIUM", str(exe))
    with pytest.raises(pytest.skip.Exception, match=f"CIRCOT_CHROMIUM={exe}"):
        chromium_path()
