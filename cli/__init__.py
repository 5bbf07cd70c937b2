"""The command line and the demo: the top layer, above flows, tasks and deployments.

Nothing below imports this package; ``labkeeper`` (the console script) is ``cli.main:main``.
"""
