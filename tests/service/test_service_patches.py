"""service/patches.py's bookkeeping: every workaround is listed with its upstream report, and a
BentoML of another minor release is reported at start-up."""
from __future__ import annotations

import logging

from service import patches


def test_every_patch_function_is_listed_with_its_upstream_report():
    public = {name for name in dir(patches) if name.startswith(("patch_", "mark_"))}
    assert public <= set(patches.WORKAROUNDS), public - set(patches.WORKAROUNDS)
    assert all(patches.WORKAROUNDS.values())


def test_another_bentoml_release_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="bentoml.classifier"):
        assert patches.check_bentoml_version(patches.TESTED_BENTOML)
        assert patches.check_bentoml_version("1.4.99")  # a patch release: same internals, no warning
        assert not caplog.records
        assert not patches.check_bentoml_version("1.5.0")
    assert "1.5.0" in caplog.text and "patch_timeout_middleware" in caplog.text


def test_the_installed_bentoml_is_the_tested_one():
    import bentoml

    assert patches.check_bentoml_version(bentoml.__version__), (
        f"BentoML {bentoml.__version__} is installed, the workarounds were written for {patches.TESTED_BENTOML}")
