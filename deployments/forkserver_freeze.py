"""Imported last by the forkserver of deployments/warm_start.py, after the flows.

The forkserver's Prefect settings are remembered first (a run whose settings are the
same keeps them instead of building them again), and the TLS context Prefect's clients
share is made (flows/prefect_tls.py): each run inherits it.

Everything the forkserver imported is moved out of the garbage collector's reach
(``gc.freeze``), as the command line's runner does before it forks: a served run's
collections then do not walk Prefect's and the flows' module objects again, and the
pages holding them stay shared with the forkserver instead of being copied.
"""

import gc

from deployments import warm_start
from flows import prefect_tls

warm_start.remember_forkserver_settings()
prefect_tls.warm()
gc.freeze()
