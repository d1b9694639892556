"""Imported once by the pool's fork server, so that every forked worker starts with elastix already loaded."""

import os

from registration.elastix import warm_up

warm_up(int(os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")))
