"""The test suite, a package so that its modules import shared builders as `tests.helpers` under any runner."""
