"""Fixtures shared by several integration modules, registered once for the directory.

A fixture imported into several test modules is a separate definition in each, so even a
session-scoped one ran once per importing module: the drill modules each started their
own moto server and made their own backup of appdb. Registered here, they run once.
"""

from tests.integration.test_drill_support import (  # noqa: F401 - fixtures
    backed_up_fixture,
    drill_env_fixture,
)
